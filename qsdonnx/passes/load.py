"""Loading a model from disk and lifting Constant-node weights into initializers."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from ..errors import InputError
from .base import Context, Pass

WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}


def load_model(path: Path) -> tuple[onnx.ModelProto, set[str]]:
    """Read an ONNX file and its external data; raise ``InputError`` with one clear line.

    Returns the model and the names of the tensors that were held in external data.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input model {path} does not exist")
    if not path.is_file():
        raise InputError(f"input model {path} is not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"input model {path} is not readable")
    if path.stat().st_size == 0:
        raise InputError(f"input model {path} is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"{path} is not a valid ONNX model (truncated or not ONNX): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not model.graph.node and not model.graph.initializer:
        raise InputError(f"{path} is not a valid ONNX model: it has no graph")
    if not model.opset_import:
        raise InputError(f"{path} is not a valid ONNX model: it declares no opset")
    base = path.parent
    external = set()
    for tensor in _external_tensors(model):
        external.add(tensor.name)
        loc = {e.key: e.value for e in tensor.external_data}.get("location", "")
        data_path = base / loc
        if not loc or not data_path.is_file():
            raise InputError(f"external data file {loc or '?'} for tensor {tensor.name!r} is missing (looked in {base})")
        length = int({e.key: e.value for e in tensor.external_data}.get("length", "0") or 0)
        offset = int({e.key: e.value for e in tensor.external_data}.get("offset", "0") or 0)
        if length and data_path.stat().st_size < offset + length:
            raise InputError(f"external data file {loc} is shorter than tensor {tensor.name!r} needs (truncated)")
    try:
        onnx.load_external_data_for_model(model, str(base))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read external data of {path}: {exc}") from None
    return model, external


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_location == onnx.TensorProto.EXTERNAL:
                yield a.t


class LoadPass(Pass):
    """Reads the input file (when the context has only a path) and notes its size."""

    name = "load"

    def run(self, ctx: Context) -> str:
        if ctx.input_path is not None:
            ctx.original_file_size = _file_size_with_data(ctx.input_path)
        n_ext = sum(1 for _ in _external_tensors(ctx.model))
        return f"{len(ctx.model.graph.node)} nodes, {len(ctx.model.graph.initializer)} initializers" + (
            f", {n_ext} in external data" if n_ext else ""
        )


def _file_size_with_data(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    size = path.stat().st_size
    seen = set()
    for t in _external_tensors(model):
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        if loc and loc not in seen:
            seen.add(loc)
            p = path.parent / loc
            if p.is_file():
                size += p.stat().st_size
    return size


class LiftConstantsPass(Pass):
    """Turns ``Constant`` nodes that hold a candidate weight into initializers.

    Paddle exports (PP-OCR) keep every weight in a Constant node; the rest of the pipeline
    then sees one representation.  Only Constants feeding a weight input are lifted.
    """

    name = "lift-constants"

    def run(self, ctx: Context) -> str:
        graph = ctx.model.graph
        weight_inputs = set()
        for node in graph.node:
            idx = WEIGHT_INPUT.get(node.op_type)
            if idx is not None and len(node.input) > idx:
                weight_inputs.add(node.input[idx])
        lifted = 0
        keep = []
        for node in graph.node:
            if node.op_type == "Constant" and node.output and node.output[0] in weight_inputs:
                attr = {a.name: a for a in node.attribute}
                if "value" in attr:
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr["value"].t)
                    tensor.name = node.output[0]
                    graph.initializer.append(tensor)
                    ctx.lifted.add(tensor.name)
                    lifted += 1
                    continue
            keep.append(node)
        if lifted:
            del graph.node[:]
            graph.node.extend(keep)
        return f"{lifted} Constant-node weights lifted"


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)
