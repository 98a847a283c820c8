"""Peer weight quantizers run on the same models as qsdonnx, and an honest size count for them.

Every peer is a function ``(src, dst) -> PeerOutcome``; it never raises for a model it cannot
handle: the outcome carries a status (``ok``, ``no-op``, ``error``, ``not available``) and a
one-line note.  Bits per weight are counted the way ``qsdonnx`` counts them (DESIGN.md §4):
every byte of the tensors that replaced an original weight (packed codes, scales, zero points)
divided by the number of elements of the weights that were replaced.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from qsdonnx.graph import consumed_names

# Ops whose constant operand is a weight, and which operand that is.
WEIGHT_OPERANDS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "Gather": (0,)}
MIN_WEIGHT_ELEMENTS = 4096

_SUB_BYTE_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
}
for _name, _bits in (("INT2", 2), ("UINT2", 2), ("FLOAT4E2M1", 4)):
    if hasattr(TensorProto, _name):
        _SUB_BYTE_BITS[getattr(TensorProto, _name)] = _bits


@dataclass
class PeerOutcome:
    """What one peer quantizer produced for one model."""

    status: str                      # ok | no-op | error | not available
    note: str = ""
    compile_s: Optional[float] = None
    bpw: Optional[float] = None
    weights_found: int = 0
    weights_compressed: int = 0
    compressed_elements: int = 0
    compressed_bytes_after: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- tensor accounting


def tensor_nbytes(t: TensorProto) -> int:
    """Storage bytes of a tensor's values (sub-byte types packed, as ONNX stores them)."""
    numel = math.prod(t.dims) if t.dims else 1
    if t.data_type in _SUB_BYTE_BITS:
        return math.ceil(numel * _SUB_BYTE_BITS[t.data_type] / 8)
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return numel * itemsize


def constant_tensors(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Every constant tensor of the main graph by the name it is consumed under:
    initializers and the ``value`` of ``Constant`` nodes."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = attr.t
    return out


def weight_names(model: onnx.ModelProto, min_elements: int = MIN_WEIGHT_ELEMENTS) -> dict[str, int]:
    """Float constant weights of MatMul/Gemm/Conv/Gather (name → element count)."""
    consts = constant_tensors(model)
    found: dict[str, int] = {}
    for node in model.graph.node:
        for idx in WEIGHT_OPERANDS.get(node.op_type, ()):
            if idx >= len(node.input):
                continue
            t = consts.get(node.input[idx])
            if t is None or t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
                continue
            numel = math.prod(t.dims) if t.dims else 1
            if numel >= min_elements:
                found[node.input[idx]] = numel
    return found


def replaced_weight_stats(original: onnx.ModelProto, quantized: onnx.ModelProto) -> dict:
    """Compare two models: which original weights are no longer read, and which new constants
    are read in their place.

    ``bpw = 8 · Σ bytes(new constants) / Σ elements(replaced weights)``.  New constants are the
    read ones whose name is absent from the original; this covers packed codes, scales and zero
    points of MatMulNBits, DequantizeLinear and dynamic-quantization rewrites alike.  Original
    weights a tool leaves behind unread (``stale_initializers``) still count in the file size.
    """
    weights = weight_names(original)
    before = constant_tensors(original)
    after = constant_tensors(quantized)
    used = consumed_names(quantized)
    replaced = {n: k for n, k in weights.items() if n not in after or n not in used}
    new = {n: t for n, t in after.items() if n not in before and n in used}
    elements = sum(replaced.values())
    new_bytes = sum(tensor_nbytes(t) for t in new.values())
    return {
        "weights_found": len(weights),
        "weights_compressed": len(replaced),
        "compressed_elements": elements,
        "compressed_bytes_after": new_bytes,
        "bpw": 8.0 * new_bytes / elements if elements else None,
        "constant_node_weights": sum(
            1 for n in weights if n not in {t.name for t in original.graph.initializer}),
        "stale_initializers": sum(1 for n in replaced if n in after),
    }


def drop_unread_constants(model: onnx.ModelProto) -> int:
    """Remove main-graph initializers and ``Constant`` nodes that nothing reads (what a
    ``onnxsim.simplify`` pass afterwards would also do); returns how many were removed."""
    used = consumed_names(model)
    keep = [t for t in model.graph.initializer if t.name in used]
    nodes = [n for n in model.graph.node
             if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output[0] not in used)]
    dropped = len(model.graph.initializer) - len(keep) + len(model.graph.node) - len(nodes)
    if dropped:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return dropped


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _finish(src: Path, dst: Path, seconds: float, counted_op: Optional[str] = None) -> PeerOutcome:
    original = onnx.load(str(src))
    quantized = onnx.load(str(dst))
    stats = replaced_weight_stats(original, quantized)
    extra = {"constant_node_weights": stats.pop("constant_node_weights")}
    stale = stats.pop("stale_initializers")
    if counted_op:
        extra[f"{counted_op}_nodes"] = op_count(quantized, counted_op)
    out = PeerOutcome(status="ok", compile_s=seconds, extra=extra, **stats)
    if out.weights_compressed == 0:
        out.status = "no-op"
        why = ""
        if extra["constant_node_weights"] == out.weights_found and out.weights_found:
            why = ": weights held in Constant nodes"
        out.note = f"quantized 0 of {out.weights_found} weights{why}"
    elif out.weights_compressed < out.weights_found:
        out.note = f"quantized {out.weights_compressed} of {out.weights_found} weights"
    if stale:
        extra["stale_initializers"] = stale
        out.note = "; ".join(filter(None, [out.note, f"{stale} replaced fp32 weights left in the file unused"]))
    return out


# --------------------------------------------------------------------------- the peers


def ort_matmul_nbits(src: Path, dst: Path, bits: int = 4, block_size: int = 32,
                     symmetric: bool = False) -> PeerOutcome:
    """ONNX Runtime's ``MatMulNBitsQuantizer`` with its default (RTN) algorithm.

    In ORT 1.31 the constructor takes ``bits`` / ``block_size`` / ``is_symmetric`` and builds a
    ``DefaultWeightOnlyQuantConfig`` (plain round-to-nearest, bits 2/4/8, fp32 scales and packed
    zero points unless symmetric); ``RTNWeightOnlyQuantConfig`` instead routes to the Intel
    Neural Compressor port, which is 4-bit only.
    """
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except Exception as exc:  # e.g. onnx_ir missing
        return PeerOutcome(status="not available", note=_first_line(exc))
    try:
        t = time.perf_counter()
        model = onnx.load(str(src))
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
        seconds = time.perf_counter() - t
    except Exception as exc:
        return PeerOutcome(status="error", note=_first_line(exc))
    return _finish(src, dst, seconds, "MatMulNBits")


def ort_dynamic_int8(src: Path, dst: Path) -> PeerOutcome:
    """``onnxruntime.quantization.quantize_dynamic``: int8 weights (per tensor), int8 activations
    quantized on the fly (MatMulInteger / DynamicQuantizeLinear)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except Exception as exc:
        return PeerOutcome(status="not available", note=_first_line(exc))
    try:
        t = time.perf_counter()
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)
        seconds = time.perf_counter() - t
    except Exception as exc:
        return PeerOutcome(status="error", note=_first_line(exc))
    return _finish(src, dst, seconds, "MatMulInteger")


def onnxsim_int4(src: Path, dst: Path) -> PeerOutcome:
    """onnxsim's ``quantize_weight_only_int4``: block-32 symmetric int4 + DequantizeLinear
    (opset 21), MatMul / vanilla Gemm / Conv with a reduction size divisible by 32.

    The pass leaves every node of a model below opset 21 untouched, so such models are first
    converted to opset 21 with ``onnx.version_converter`` (as qsdonnx bumps the opset itself).
    """
    try:
        import onnxsim
        fn = onnxsim.quantize_weight_only_int4
    except (ImportError, AttributeError) as exc:
        return PeerOutcome(status="not available", note=_first_line(exc))
    note = ""
    try:
        t = time.perf_counter()
        model = onnx.load(str(src))
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 21:
            from onnx import version_converter

            ir = model.ir_version
            model = version_converter.convert_version(model, 21)
            model.ir_version = max(ir, 10)
            note = f"converted opset {opset} to 21 first"
        out = fn(model)
        stale = drop_unread_constants(out)
        if stale:
            note = "; ".join(filter(None, [note, f"removed {stale} constants it left unread"]))
        onnx.save(out, str(dst))
        seconds = time.perf_counter() - t
    except Exception as exc:
        return PeerOutcome(status="error", note=(note + "; " if note else "") + _first_line(exc))
    result = _finish(src, dst, seconds, "DequantizeLinear")
    result.note = "; ".join(filter(None, [note, result.note]))
    return result


def onnxsim_version() -> Optional[str]:
    try:
        import onnxsim
        return getattr(onnxsim, "__version__", None) or str(getattr(onnxsim, "version", "?"))
    except ImportError:
        return None


@dataclass(frozen=True)
class PeerSpec:
    name: str
    fn: Callable[..., PeerOutcome]
    kwargs: dict
    bits: Optional[int] = None
    block_size: Optional[int] = None


def peer_specs(quick: bool) -> list[PeerSpec]:
    """The peers of a run: one in quick mode, all of them otherwise."""
    if quick:
        return [PeerSpec("ort-nbits 4b b32", ort_matmul_nbits, {"bits": 4, "block_size": 32}, 4, 32)]
    specs = []
    for bits in (2, 4, 8):
        for block in (32, 128):
            specs.append(PeerSpec(f"ort-nbits {bits}b b{block}", ort_matmul_nbits,
                                  {"bits": bits, "block_size": block}, bits, block))
    specs.append(PeerSpec("ort-dynamic int8", ort_dynamic_int8, {}, 8, None))
    specs.append(PeerSpec("onnxsim int4 b32", onnxsim_int4, {}, 4, 32))
    return specs


def quiet_peer_logs() -> None:
    for name in ("onnxruntime", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
