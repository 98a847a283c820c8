"""``--format nbits``: each quantized matrix multiplies through ``com.microsoft.MatMulNBits``.

MatMulNBits fuses dequantization into the matmul (ORT CPU and CUDA kernels).  A matrix it cannot
take (a block that is not a power of two ≥ 16; a dense factor) keeps the portable
DequantizeLinear form, with the reason recorded; Conv and Gather weights always do.  3-bit codes
are stored at 3 bits and widened to the 4-bit layout by constant nodes.
"""
from __future__ import annotations

import onnx
from onnx import numpy_helper

from ..factorize.packing import to_matmulnbits
from ..factorize.types import QuantizedMatrix
from ..factorize.types import container_width
from ..graph import float_tensor
from .lower_qdq import LowerQdqPass, QdqEmitter

MS_DOMAIN = "com.microsoft"


def nbits_unsupported(m) -> str:
    """Why ``m`` cannot be a MatMulNBits weight, or '' if it can."""
    if not isinstance(m, QuantizedMatrix):
        if hasattr(m, "indices"):
            return "sparse factor"
        if hasattr(m, "codebooks") or hasattr(m, "dictionary"):
            return "codebook codes"
        return "dense factor"
    bs = m.block_size
    if bs < 16 or bs & (bs - 1):
        return f"block {bs} is not a power of two >= 16"
    if m.bits not in (2, 3, 4, 8):
        return f"{m.bits}-bit codes"
    return ""


class NbitsEmitter(QdqEmitter):
    accuracy_level = 0

    def matmul(self, x: str, part: str, m, tag: str) -> onnx.NodeProto:
        why = nbits_unsupported(m)
        if why:
            self.rec.extra.setdefault("fallback", []).append(f"{part}: {why} (DequantizeLinear)")
            return super().matmul(x, part, m, tag)
        B, scales, zp = to_matmulnbits(m)
        cbits = container_width(m.bits)
        K, N = m.shape
        b_name = self.nbits_codes(part, m, B)
        s_name = self.edit.add_initializer(float_tensor(f"{self.base}.{part}_scale",
                                                        scales.reshape(N, -1), m.scale_dtype))
        if m.scale_dtype != self.dtype:
            cast = self.edit.node("Cast", [s_name], f"{self.base}.{part}_scale_cast", to=self.onnx_dtype)
            self.prelude.append(cast)
            s_name = cast.output[0]
        inputs = [x, b_name, s_name]
        if not m.symmetric:
            # Symmetric codes use MatMulNBits' default zero point 2^(bits-1): nothing stored.
            inputs.append(self.edit.add_initializer(numpy_helper.from_array(zp, f"{self.base}.{part}_zero_point")))
        return self.edit.node("MatMulNBits", inputs, f"{tag}.qsd.matmulnbits_{part.lower()}", domain=MS_DOMAIN,
                              K=K, N=N, bits=cbits, block_size=m.block_size, accuracy_level=self.accuracy_level)


class LowerNbitsPass(LowerQdqPass):
    name = "lower-nbits"
    left_fallback = "MatMul's first input: MatMulNBits takes its weight second (DequantizeLinear)"

    def __init__(self, accuracy_level: int = 0):
        self.emitter = type("NbitsEmitterL", (NbitsEmitter,), {"accuracy_level": accuracy_level})

    def finish(self, ctx) -> str:
        summary = super().finish(ctx)
        if not any(op.domain == MS_DOMAIN for op in ctx.model.opset_import):
            ctx.model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        return summary
