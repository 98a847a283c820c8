"""Round-to-nearest block quantization (no calibration data)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from .quantizers import block_grid, check_bits, quantize_with_grid
from .types import Factorization, QuantizedMatrix


def rtn_quantize(W: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                 scale_dtype: str = "float16", clip_search: bool = True,
                 levels: Optional[int] = None) -> QuantizedMatrix:
    """``codes = clip(round(W / s) + z)`` with one min/max grid per block of ``block_size`` rows
    (see :func:`qsdonnx.factorize.quantizers.scales_from_range`); rounding uses the scale in
    its stored precision, so ``|W - deq| <= s/2`` elementwise for values inside the grid's range.
    ``clip_search`` picks, per block, the clipped range with the least squared error
    (:func:`qsdonnx.factorize.quantizers.mse_grid`); without it the range is the block's min/max
    and the bound holds for every element.  ``levels`` codes an alphabet of that many values
    (``types.LEVEL_WORDS``) instead of ``2^bits``."""
    check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {W.shape}")
    s, z = block_grid(W, bits, block_size, symmetric, scale_dtype, clip_search, levels)
    return quantize_with_grid(W, s, z, bits, block_size, scale_dtype, levels)


def rtn_factorize(W: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                  scale_dtype: str = "float16", clip_search: bool = True,
                  levels: Optional[int] = None) -> Factorization:
    """``W ≈ deq(rtn_quantize(W))`` as a :class:`Factorization` with ``method="rtn"``."""
    q = rtn_quantize(W, bits, block_size, symmetric, scale_dtype, clip_search, levels)
    info = {"bits": bits, "block_size": block_size, "symmetric": symmetric}
    if levels is not None:
        info["levels"] = levels
    return Factorization(method="rtn", shape=tuple(W.shape), q=q, info=info)
