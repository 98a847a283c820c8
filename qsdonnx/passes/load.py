"""Loading a model from disk: its graph, with external data left on disk."""
from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import InputError
from ..store import external_info, external_tensors
from .base import Context, Pass

def load_model(path: Path) -> tuple[onnx.ModelProto, set[str]]:
    """Read an ONNX file (its external data stays on disk); raise ``InputError`` with one clear line.

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
    root = base.resolve()
    for tensor in external_tensors(model):
        external.add(tensor.name)
        info = external_info(tensor)
        loc = info.get("location", "")
        data_path = base / loc
        if loc and (Path(loc).is_absolute() or root not in (base / loc).resolve().parents):
            raise InputError(f"external data {loc!r} of tensor {tensor.name!r} lies outside the model's folder "
                             f"{base}; move the data file next to the model")
        if not loc or not data_path.is_file():
            raise InputError(f"external data file {loc or '?'} for tensor {tensor.name!r} is missing (looked in {base})")
        length = int(info.get("length", "0") or 0)
        offset = int(info.get("offset", "0") or 0)
        if length and data_path.stat().st_size < offset + length:
            raise InputError(f"external data file {loc} is shorter than tensor {tensor.name!r} needs (truncated)")
    # The external data stays on disk: passes read each tensor through qsdonnx.store when needed.
    return model, external


class LoadPass(Pass):
    """Reads the input file (when the context has only a path) and notes its size."""

    name = "load"

    def run(self, ctx: Context) -> str:
        if ctx.input_path is not None:
            ctx.original_file_size = _file_size_with_data(ctx.input_path, ctx.model)
        n_ext = sum(1 for _ in external_tensors(ctx.model))
        return f"{len(ctx.model.graph.node)} nodes, {len(ctx.model.graph.initializer)} initializers" + (
            f", {n_ext} in external data" if n_ext else ""
        )


def _file_size_with_data(path: Path, model: onnx.ModelProto) -> int:
    size = path.stat().st_size
    seen = set()
    for t in external_tensors(model):
        loc = external_info(t).get("location", "")
        if loc and loc not in seen:
            seen.add(loc)
            p = path.parent / loc
            if p.is_file():
                size += p.stat().st_size
    return size
