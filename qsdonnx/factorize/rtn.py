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
            e, n = squared_error(q, W)
            err, norm = err + e, norm + n
    qm = QuantizedMatrix(codes=codes, scales=scales, zero_points=zeros, bits=bits, block_size=block_size,
                         scale_dtype=scale_dtype, levels=levels)
    return qm, err, norm


def squared_error(q: QuantizedMatrix, W: np.ndarray) -> tuple[float, float]:
    """``(‖W − deq(q)‖², ‖W‖²)`` (float32 dot products of a few rows, summed in float64)."""
    w = torch.from_numpy(np.ascontiguousarray(W, np.float32)).reshape(-1)
    d = torch.from_numpy(q.dequantize()).reshape(-1).sub_(w)
    return float(torch.dot(d, d)), float(torch.dot(w, w))


def rtn_factorize(W: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                  scale_dtype: str = "float16", clip_search: bool = True,
                  levels: Optional[int] = None) -> Factorization:
    """``W ≈ deq(rtn_quantize(W))`` as a :class:`Factorization` with ``method="rtn"``."""
    q = rtn_quantize(W, bits, block_size, symmetric, scale_dtype, clip_search, levels)
    info = {"bits": bits, "block_size": block_size, "symmetric": symmetric}
    if levels is not None:
        info["levels"] = levels
    return Factorization(method="rtn", shape=tuple(W.shape), q=q, info=info)


def rtn_factorize_rows(read: Callable[[int, int], np.ndarray], shape: tuple[int, int], bits: int,
                       block_size: int, symmetric: bool = True, scale_dtype: str = "float16",
                       clip_search: bool = True, levels: Optional[int] = None) -> tuple[Factorization, float]:
    """:func:`rtn_factorize` of a matrix read a few block rows at a time (see :func:`rtn_rows`),
    and its relative error ``‖W − Ŵ‖ / ‖W‖``."""
    q, err, norm = rtn_rows(read, shape, bits, block_size, symmetric, scale_dtype, clip_search, levels)
    info = {"bits": bits, "block_size": block_size, "symmetric": symmetric}
    if levels is not None:
        info["levels"] = levels
    f = Factorization(method="rtn", shape=(int(shape[0]), int(shape[1])), q=q, info=info)
    return f, float(np.sqrt(err) / (np.sqrt(norm) or 1.0))
