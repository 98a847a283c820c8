"""Opset preparation and atomic saving (external data above 2 GB, an IR version ORT reads)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import helper

from ..errors import ConversionError, OutputError
from .base import Context, Pass

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


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Brings the default-domain opset to at least ``target``; keeps the input IR version unless
    the new opset needs a newer one."""
    current = default_opset(model)
    ir = model.ir_version
    if current < target:
        try:
            model = onnx.version_converter.convert_version(model, target)
        except Exception as exc:  # the converter raises bare RuntimeError/ValueError/C++ errors
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConversionError(f"cannot upgrade the model from opset {current} to {target} "
                                  f"(needed for block-wise DequantizeLinear): {msg}") from None
    # Newer writers stamp an IR version ORT cannot read even when nothing in the model needs it.
    model.ir_version = min(max(ir, min_ir_for_opset(max(current, target))), MAX_ORT_IR)
    return model


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


def save_model(model: onnx.ModelProto, output: Path, check: bool = True) -> int:
    """Writes ``output`` atomically (temp files in the same directory, checked, then renamed);
    tensors go to ``<output>.data`` when the model is above protobuf's 2 GB limit.
    Returns the bytes written (model + data)."""
    output = Path(output)
    parent = output.resolve().parent
    external = model.ByteSize() > PROTOBUF_LIMIT
    data_name = output.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=".qsdonnx-", dir=parent))
    try:
        tmp_model = tmpdir / output.name
        if external:
            onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp_model))
        if check:
            try:
                onnx.checker.check_model(str(tmp_model), full_check=True)
            except onnx.checker.ValidationError as exc:
                raise OutputError(f"the rewritten model fails onnx.checker: {str(exc).splitlines()[0]}") from None
        size = tmp_model.stat().st_size
        if external:
            size += (tmpdir / data_name).stat().st_size
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp_model, output)
        return size
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


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
