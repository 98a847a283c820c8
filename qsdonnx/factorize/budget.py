"""Exact byte counts of factorizations without building them, and rank selection for a budget.

Every formula here equals ``Factorization.nbytes()`` of the corresponding result.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .types import container_width, index_dtype_for, level_words_nbytes, num_blocks, packed_nbytes


def quantized_nbytes(rows: int, cols: int, bits: int, block_size: int, symmetric: bool = True,
                     scale_dtype: str = "float16", levels: Optional[int] = None) -> int:
    """Bytes of a ``(rows, cols)`` :class:`QuantizedMatrix` (blocks along rows):
    ``cols * ceil(rows*b/8) + kb*cols*|scale| + [asymmetric] cols * ceil(kb*c/8)``, with zero
    points at the container width ``c`` (:func:`container_width`); codes of ``levels`` values
    in words of three (:func:`level_words_nbytes`)."""
    kb = num_blocks(rows, block_size)
    codes = (cols * packed_nbytes(rows, bits) if levels is None
             else level_words_nbytes(rows * cols, levels, cols))
    n = codes + kb * cols * np.dtype(scale_dtype).itemsize
    if not symmetric:
        n += cols * packed_nbytes(kb, container_width(bits))
    return n


def dense_nbytes(rows: int, cols: int, dtype: str) -> int:
    return rows * cols * np.dtype(dtype).itemsize


def factor_nbytes(rows: int, cols: int, bits: Optional[int], block_size: int, symmetric: bool,
                  scale_dtype: str, dense_dtype: Optional[str]) -> int:
    """A quantized factor, or a dense one at ``dense_dtype`` (float16 when None) if bits is None."""
    if bits is None:
        return dense_nbytes(rows, cols, dense_dtype or "float16")
    return quantized_nbytes(rows, cols, bits, block_size, symmetric, scale_dtype)


def rtn_nbytes(K: int, N: int, bits: int, block_size: int, symmetric: bool = True,
               scale_dtype: str = "float16", levels: Optional[int] = None) -> int:
    """Bytes of ``rtn_factorize`` / ``gptq_factorize`` on a ``(K, N)`` weight."""
    return quantized_nbytes(K, N, bits, block_size, symmetric, scale_dtype, levels)


def lowrank_nbytes(K: int, N: int, rank: int, bits_left: Optional[int], bits_right: Optional[int],
                   block_size: int, symmetric: bool = True, scale_dtype: str = "float16",
                   dense_dtype: Optional[str] = None) -> int:
    """Bytes of ``L (K, r)`` plus ``R (r, N)``; a factor whose bits is None is dense
    (``dense_dtype``, float16 when None)."""
    return (factor_nbytes(K, rank, bits_left, block_size, symmetric, scale_dtype, dense_dtype)
            + factor_nbytes(rank, N, bits_right, block_size, symmetric, scale_dtype, dense_dtype))


def sparse_factor_nbytes(rows: int, cols: int, keep: int, bits: Optional[int], block_size: int,
                         symmetric: bool = True, scale_dtype: str = "float16",
                         value_dtype: str = "float16") -> int:
    """Bytes of a :class:`SparseQuantizedMatrix` with ``keep`` stored entries per column:
    row indices at the narrowest type for ``rows``, plus either ``keep * cols`` floats or
    ``cols * ceil(keep*b/8)`` codes, ``ceil(keep/block)*cols`` scales and packed zero points."""
    n = keep * cols * np.dtype(index_dtype_for(rows)).itemsize
    if bits is None:
        return n + keep * cols * np.dtype(value_dtype).itemsize
    return n + quantized_nbytes(keep, cols, bits, block_size, symmetric, scale_dtype)


def qsd_nbytes(K: int, N: int, rank: int, bits, block_size: int, sparsity=0.0,
               symmetric: bool = True, scale_dtype: str = "float16",
               dense_dtype: str = "float16") -> int:
    """Bytes of ``qsd_factorize``: each factor dense/quantized when it keeps every entry,
    else sparse (:func:`sparse_factor_nbytes`); ``bits`` and ``sparsity`` may be pairs."""
    from .qsd import kept_per_column

    pair = lambda v: (v, v) if not isinstance(v, (tuple, list)) else (v[0], v[1])  # noqa: E731
    (bl, br), (sl, sr) = pair(bits), pair(sparsity)
    n = 0
    for rows, cols, b, sp in ((K, rank, bl, sl), (rank, N, br, sr)):
        keep = kept_per_column(rows, sp)
        if keep >= rows:
            n += factor_nbytes(rows, cols, b, block_size, symmetric, scale_dtype, dense_dtype)
        else:
            n += sparse_factor_nbytes(rows, cols, keep, b, block_size, symmetric, scale_dtype,
                                      dense_dtype)
    return n


def caldera_nbytes(K: int, N: int, rank: int, bits_q: int, bits_lr: Optional[int],
                   block_size: int, symmetric: bool = True, scale_dtype: str = "float16",
                   dense_dtype: str = "float16") -> int:
    """Bytes of ``caldera_factorize``: the backbone ``Q`` plus both factors."""
    return (rtn_nbytes(K, N, bits_q, block_size, symmetric, scale_dtype)
            + lowrank_nbytes(K, N, rank, bits_lr, bits_lr, block_size, symmetric, scale_dtype,
                             dense_dtype))


def rank_for_budget(K: int, N: int, bits_per_weight: float, nbytes_fn: Callable[[int], int]) -> int:
    """Largest ``r`` in ``[1, min(K, N)]`` with ``nbytes_fn(r) <= bits_per_weight * K * N / 8``,
    or 0 when rank 1 does not fit.  ``nbytes_fn`` must be non-decreasing in the rank (every
    byte formula above is), which makes the bisection exact."""
    budget = bits_per_weight * K * N / 8.0
    lo, hi = 0, min(K, N)
    if nbytes_fn(1) > budget:
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if nbytes_fn(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
