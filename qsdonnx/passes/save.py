"""Opset preparation and atomic saving (external data above 2 GB, an IR version ORT reads)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper

from ..errors import ConversionError, OutputError
from .base import Context, Pass

log = logging.getLogger("qsdonnx")

PROTOBUF_LIMIT = 2**31 - 2**24  # stay clear of protobuf's 2 GiB message limit
MAX_ORT_IR = 13  # the newest IR version ONNX Runtime 1.31 reads


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def min_ir_for_opset(opset: int) -> int:
    """The lowest IR version released together with ``opset`` (from onnx's version table)."""
    irs = [row[1] for row in helper.VERSION_TABLE if row[2] >= opset]
    return min(irs) if irs else MAX_ORT_IR


def _changed_ops(model: onnx.ModelProto, current: int, target: int) -> list[str]:
    """Default-domain ops of the main graph (and subgraphs) whose definition changes between
    opset ``current`` and ``target``."""
    from onnx import defs

    from ..graph import all_nodes

    changed = set()
    for n in all_nodes(model.graph):
        if n.domain not in ("", "ai.onnx"):
            continue
        try:
            if defs.get_schema(n.op_type, current, "").since_version != \
                    defs.get_schema(n.op_type, target, "").since_version:
                changed.add(n.op_type)
        except defs.SchemaError:
            changed.add(n.op_type)
    return sorted(changed)


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Brings the default-domain opset to at least ``target``; keeps the input IR version unless
    the new opset needs a newer one.

    When no op of the model changes definition between the two opsets, only the stamp moves.
    Otherwise onnx's version converter runs on the graph without its weights (large
    initializers become graph inputs of the same type for the conversion and are put back
    after), so the weights are neither copied nor serialized.
    """
    current = default_opset(model)
    ir = model.ir_version
    if current < target:
        # Shapes recorded by the exporter may disagree with what the new opset infers.
        del model.graph.value_info[:]
        if _changed_ops(model, current, target):
            _convert_structure(model, current, target)
        else:
            for op in model.opset_import:
                if op.domain in ("", "ai.onnx"):
                    op.version = target
    # Newer writers stamp an IR version ORT cannot read even when nothing in the model needs it.
    model.ir_version = min(max(ir, min_ir_for_opset(max(current, target))), MAX_ORT_IR)
    return model


def _convert_structure(model: onnx.ModelProto, current: int, target: int) -> None:
    from ..store import structure_copy

    light, big = structure_copy(model)
    inputs = {i.name for i in light.graph.input}
    for t in big:
        if t.name not in inputs:
            light.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        converted = onnx.version_converter.convert_version(light, target)
    except Exception as exc:  # the converter raises bare RuntimeError/ValueError/C++ errors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot upgrade the model from opset {current} to {target} "
                              f"(needed for block-wise DequantizeLinear): {msg}") from None
    _drop_stale_output_shapes(converted)
    big_names = {t.name for t in big}
    kept_inputs = [i for i in converted.graph.input if i.name not in big_names or i.name in inputs]
    g = model.graph
    del g.node[:]
    g.node.extend(converted.graph.node)
    # Deleted one by one: rebuilding the list would copy every large tensor.
    for i in reversed(range(len(g.initializer))):
        if g.initializer[i].name not in big_names:
            del g.initializer[i]
    g.initializer.extend(converted.graph.initializer)
    del g.input[:]
    g.input.extend(kept_inputs)
    del g.output[:]
    g.output.extend(converted.graph.output)
    del g.value_info[:]
    del model.opset_import[:]
    model.opset_import.extend(converted.opset_import)


def _infers(model: onnx.ModelProto) -> bool:
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        return True
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return False


def _drop_stale_output_shapes(model: onnx.ModelProto) -> None:
    """Some exports declare graph output shapes their own nodes do not produce (the older opset's
    inference did not notice). Those shapes are replaced by the inferred ones, so the output checks."""
    if _infers(model):
        return
    declared = {}
    for o in model.graph.output:
        declared[o.name] = onnx.TypeProto.Tensor()
        declared[o.name].CopyFrom(o.type.tensor_type)
        o.type.tensor_type.ClearField("shape")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        inferred = None
    got = {o.name: o for o in inferred.graph.output} if inferred is not None else {}
    for o in model.graph.output:
        o.type.tensor_type.CopyFrom(declared[o.name])
        if got.get(o.name) is not None and got[o.name].type.tensor_type.HasField("shape") and not _infers(model):
            o.type.tensor_type.shape.CopyFrom(got[o.name].type.tensor_type.shape)
            log.info("graph output %s: its declared shape disagrees with the graph; the inferred one is kept",
                     o.name)


def check_output_path(output: Path, input_path: Path | None, what: str = "output") -> None:
    """Fails early, before any work, when the output (or report) cannot be written."""
    output = Path(output)
    if input_path is not None and output.resolve() == Path(input_path).resolve():
        raise OutputError(f"{what} path {output} is the input model; choose another path")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {what} {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {what} {output}: directory {parent} is not writable")
    if output.exists() and output.is_dir():
        raise OutputError(f"{what} path {output} is a directory")


EXTERNAL_MIN_BYTES = 1024  # tensors at least this large go to the data file
ALIGN = 4096  # data-file offsets, so each tensor can be memory-mapped on its own


def save_model(model: onnx.ModelProto, output: Path, check: bool = True, base_dir: Optional[Path] = None,
               external_data: Optional[bool] = None, spill=None) -> int:
    """Writes ``output`` atomically (temp files in the same directory, checked, then renamed).

    Tensors go to ``<output>.data`` when the model with all its tensors would pass protobuf's
    2 GB limit, or when ``external_data`` is True: written one at a time, each read from the
    protobuf or from the input's external data (``base_dir``) and released from
    the protobuf once written, so the output is never held in memory as a whole.  Otherwise
    the model is serialized one large tensor at a time (tensors still in the input's external
    data are read one at a time and written inline).  A ``spill`` (``store.TensorSpill``) in the
    output's folder becomes the output's data file, so its tensors are not copied.  Returns
    the bytes written (model + data).
    """
    from ..store import is_external, structure_copy, tensor_array, tensor_nbytes

    output = Path(output)
    parent = output.resolve().parent
    # Counted without serializing the model (protobuf's ByteSize encodes the whole message).
    light, big = structure_copy(model)
    total = light.ByteSize() + sum(tensor_nbytes(t) + 64 + 4 * len(t.dims) for t in big)
    del light, big
    external = total > PROTOBUF_LIMIT if external_data is None else external_data
    if not external and total > PROTOBUF_LIMIT:
        raise OutputError(f"the output would be {total / 2**30:.2f} GiB, over protobuf's 2 GB limit for one "
                          "file: it needs its tensors in external data (drop --no-external-data)")
    data_name = output.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=".qsdonnx-", dir=parent))
    try:
        tmp_model = tmpdir / output.name
        if external:
            adopt = None
            if spill is not None and spill.path.parent == parent:
                spill.close()
                adopt = spill.path
            _write_tensors(model, tmpdir / data_name, data_name, base_dir, adopt)
        with open(tmp_model, "wb") as fh:
            if external:  # only the graph and small tensors are left in the protobuf
                fh.write(model.SerializeToString())
            else:
                _write_streamed(model, fh, base_dir)
        if check:
            try:
                _check_structure(model, tmpdir / "check")
            except onnx.checker.ValidationError as exc:
                raise OutputError(f"the rewritten model fails onnx.checker: {str(exc).splitlines()[0]}") from None
            except onnx.shape_inference.InferenceError as exc:
                raise OutputError(f"the rewritten model fails onnx's shape inference: {str(exc).splitlines()[0]}") from None
        size = tmp_model.stat().st_size
        if external:
            size += (tmpdir / data_name).stat().st_size
            if adopt is not None:  # (made private to this process): the model file's permissions
                os.chmod(tmpdir / data_name, tmp_model.stat().st_mode & 0o777)
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp_model, output)
        return size
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _check_structure(model: onnx.ModelProto, folder: Path) -> None:
    """``onnx.checker``'s full check (with shape inference) of ``model``'s graph, its large
    tensors replaced by external-data references to an empty file: the checker reads no tensor
    data, so the check costs the graph's memory, not a second copy of the weights."""
    from ..store import external_stub, structure_copy, tensor_nbytes

    folder.mkdir()
    (folder / "tensors.data").touch()
    light, big = structure_copy(model)
    light.graph.initializer.extend(external_stub(t, "tensors.data", tensor_nbytes(t)) for t in big)
    path = folder / "model.onnx"
    path.write_bytes(light.SerializeToString())
    del light
    onnx.checker.check_model(str(path), full_check=True)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, size: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(size)


GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _write_streamed(model: onnx.ModelProto, fh, base_dir: Optional[Path]) -> None:
    """Serializes ``model`` into ``fh`` one large tensor at a time, so that the file is never
    built in memory as a whole: the model without its large initializers, then each of them
    as one more ``initializer`` field of the graph (protobuf joins repeated fields in order).
    Tensors in the input's external data are read one at a time and written inline."""
    from ..store import _copy_fields, is_external, stored_bytes, structure_copy, tensor_nbytes

    light, big = structure_copy(model)
    stubs = []
    for t in big:
        if is_external(t):
            stub = onnx.TensorProto()
            stub.name, stub.data_type = t.name, t.data_type
            stub.dims.extend(t.dims)
            n = tensor_nbytes(t)
            size = stub.ByteSize() + len(_field(RAW_DATA_FIELD, n)) + n
            stubs.append((t, stub, size))
        else:
            stubs.append((t, None, t.ByteSize()))
    head = onnx.ModelProto()
    _copy_fields(light, head, skip="graph")
    graph = light.graph.SerializeToString()
    graph_size = len(graph) + sum(len(_field(INITIALIZER_FIELD, size)) + size for _, _, size in stubs)
    fh.write(head.SerializeToString())
    fh.write(_field(GRAPH_FIELD, graph_size))
    fh.write(graph)
    del graph
    for t, stub, size in stubs:
        fh.write(_field(INITIALIZER_FIELD, size))
        if stub is None:
            data = t.SerializeToString()
        else:
            stub.raw_data = stored_bytes(t, base_dir)
            data = stub.SerializeToString()
            stub.ClearField("raw_data")
        if len(data) != size:
            raise RuntimeError(f"tensor {t.name}: serialized {len(data)} bytes, expected {size}")
        fh.write(data)


def _write_tensors(model: onnx.ModelProto, path: Path, location: str, base_dir: Optional[Path],
                   adopt: Optional[Path] = None) -> None:
    """Moves every initializer of at least :data:`EXTERNAL_MIN_BYTES` into ``path``.  ``adopt``
    (a data file on the same file system, see ``store.TensorSpill``) becomes ``path``: the
    tensors already in it stay where they are, and the others are appended."""
    from ..store import external_info, is_external, stored_bytes, tensor_nbytes

    if adopt is not None:
        os.replace(adopt, path)
    with open(path, "r+b" if adopt is not None else "wb") as fh:
        fh.seek(0, os.SEEK_END)
        for t in model.graph.initializer:
            if tensor_nbytes(t) < EXTERNAL_MIN_BYTES and not is_external(t):
                continue
            if adopt is not None and is_external(t) and external_info(t).get("location") == str(adopt):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = location
                continue
            if is_external(t):
                data = stored_bytes(t, base_dir)
            elif t.raw_data:
                data = t.raw_data
            else:
                data = onnx.numpy_helper.to_array(t).tobytes()
            offset = fh.tell()
            pad = (-offset) % ALIGN
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(data)
            del data
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(field)
            t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(fh.tell() - offset))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value


class PrepareOpsetPass(Pass):
    """Upgrades the model's opset when the lowering needs a newer one."""

    name = "prepare-opset"

    def __init__(self, target: int):
        self.target = target

    def run(self, ctx: Context) -> str:
        before = default_opset(ctx.model)
        ctx.model = upgrade_opset(ctx.model, self.target)
        after = default_opset(ctx.model)
        return f"opset {before} -> {after}, IR {ctx.model.ir_version}" if after != before else f"opset {after} kept"
