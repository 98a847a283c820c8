"""Round-to-nearest block quantization (no calibration data)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from .quantizers import block_grid, check_bits, quantize_with_grid
from .types import Factorization, QuantizedMatrix, num_blocks


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
    W = np.ascontiguousarray(W, dtype=np.float32)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {W.shape}")
    return rtn_rows(lambda a, b: W[a:b], W.shape, bits, block_size, symmetric, scale_dtype,
                    clip_search, levels, measure=False)[0]


# Rows read and quantized at a time by :func:`rtn_rows`: near this many values.
ROWS_ELEMENTS = 1 << 22


def rtn_rows(read: Callable[[int, int], np.ndarray], shape: tuple[int, int], bits: int, block_size: int,
             symmetric: bool = True, scale_dtype: str = "float16", clip_search: bool = True,
             levels: Optional[int] = None, measure: bool = True) -> tuple[QuantizedMatrix, float, float]:
    """:func:`rtn_quantize` of the ``(K, N)`` matrix whose rows ``a:b`` ``read(a, b)`` returns,
    read a few whole blocks of rows at a time, so the matrix is never held whole (every block's
    grid is its own).  Also ``‖W − Ŵ‖²`` and ``‖W‖²`` (zeros unless ``measure``)."""
    check_bits(bits)
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    K, N = (int(d) for d in shape)
    codes = np.empty((K, N), np.int8 if symmetric else np.uint8)
    scales = np.empty((num_blocks(K, block_size), N), np.float32)
    zeros = None if symmetric else np.empty(scales.shape, np.uint8)
    step = block_size * max(1, ROWS_ELEMENTS // max(block_size * N, 1))
    err = norm = 0.0
    for r in range(0, K, step):
        W = np.ascontiguousarray(read(r, min(r + step, K)), dtype=np.float32).reshape(-1, N)
        s, z = block_grid(W, bits, block_size, symmetric, scale_dtype, clip_search, levels)
        q = quantize_with_grid(W, s, z, bits, block_size, scale_dtype, levels)
        b = r // block_size
        codes[r:r + W.shape[0]] = q.codes
        scales[b:b + s.shape[0]] = s
        if zeros is not None:
            zeros[b:b + z.shape[0]] = z
        if measure:
            w = torch.from_numpy(W.reshape(-1))
            err, norm = err + q.squared_error(W), norm + float(torch.dot(w, w))
    qm = QuantizedMatrix(codes=codes, scales=scales, zero_points=zeros, bits=bits, block_size=block_size,
                         scale_dtype=scale_dtype, levels=levels)
    return qm, err, norm


def rtn_factorize(W: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                  scale_dtype: str = "float16", clip_search: bool = True,
                  levels: Optional[int] = None) -> Factorization:
    """``W ≈ deq(rtn_quantize(W))`` as a :class:`Factorization` with ``method="rtn"``."""
    return _factorization(rtn_quantize(W, bits, block_size, symmetric, scale_dtype, clip_search, levels))


def rtn_factorize_rows(read: Callable[[int, int], np.ndarray], shape: tuple[int, int], bits: int,
                       block_size: int, symmetric: bool = True, scale_dtype: str = "float16",
                       clip_search: bool = True, levels: Optional[int] = None) -> tuple[Factorization, float]:
    """:func:`rtn_factorize` of a matrix read a few block rows at a time (see :func:`rtn_rows`),
    and its relative error ``‖W − Ŵ‖ / ‖W‖``."""
    q, err, norm = rtn_rows(read, shape, bits, block_size, symmetric, scale_dtype, clip_search, levels)
    return _factorization(q), float(np.sqrt(err) / (np.sqrt(norm) or 1.0))


def _factorization(q: QuantizedMatrix) -> Factorization:
    info = {"bits": q.bits, "block_size": q.block_size, "symmetric": q.symmetric}
    if q.levels is not None:
        info["levels"] = q.levels
    return Factorization(method="rtn", shape=q.shape, q=q, info=info)
