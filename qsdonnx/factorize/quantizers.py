"""Block-wise uniform quantization grids shared by RTN, GPTQ, LPLR, CALDERA and QSD.

The grid of one block (one column ``n``, rows ``b*block ... (b+1)*block - 1``) is
``{(c - z) * s : c in [qmin, qmax]}``; a value is coded as ``c = clip(round(w / s) + z)``.
Symmetric grids have ``z = 0`` and signed codes ``[-2^(b-1), 2^(b-1) - 1]``; asymmetric grids
have unsigned codes ``[0, 2^b - 1]`` and an unsigned zero point ``z`` in the same range.  An
alphabet of ``L`` levels that is not a power of two (``levels``, see ``types.LEVEL_WORDS``)
has codes ``[-floor(L/2), L - 1 - floor(L/2)]`` or ``[0, L - 1]``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .types import QuantizedMatrix, check_levels, num_blocks

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def code_range(bits: int, symmetric: bool, levels: Optional[int] = None) -> tuple[int, int]:
    """``(qmin, qmax)``: ``[-2^(b-1), 2^(b-1)-1]`` when symmetric, else ``[0, 2^b-1]``; with
    ``levels = L``: ``[-floor(L/2), L-1-floor(L/2)]``, else ``[0, L-1]``."""
    check_bits(bits)
    if levels is not None:
        check_levels(levels, bits)
        return (-(levels // 2), levels - 1 - levels // 2) if symmetric else (0, levels - 1)
    if symmetric:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def store_scales(needed: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Smallest value representable in ``scale_dtype`` that is ``>= needed`` (as float32).

    Rounding the scale *up* to the stored type keeps every value of the block inside the code
    range, so the rounding error stays ``<= s/2`` with the scale the model actually holds.
    Zero scales (all-zero blocks) become 1: the codes are then 0 and the block decodes to 0.
    """
    needed = np.asarray(needed, dtype=np.float32)
    dt = np.dtype(scale_dtype)
    finite_max = np.finfo(dt).max
    s = np.minimum(needed, finite_max).astype(dt)
    low = s.astype(np.float32) < needed
    if np.any(low):
        s = np.where(low, np.nextafter(s, np.array(np.inf, dtype=dt)), s)
    s = np.where(needed > 0, s, np.array(1, dtype=dt))
    return s.astype(np.float32)


def scales_from_range(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool,
                      scale_dtype: str, levels: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Per-block scale (and zero point) from the block minimum ``lo`` and maximum ``hi``.

    Symmetric: ``s = max(-min(lo,0) / 2^(b-1), max(hi,0) / (2^(b-1)-1))``.  Of the standard
    no-clipping choices this is the smallest scale that still covers the block: the common
    ``absmax / (2^(b-1)-1)`` never uses code ``-2^(b-1)`` (a quarter of the 2-bit grid), while
    ``absmax / 2^(b-1)`` clips the positive extreme by up to a whole step.  Here the negative
    side may use the extra code and the positive side is never clipped, so the error is
    ``<= s/2`` and ``s`` is never larger than the ``absmax / (2^(b-1)-1)`` choice.

    Asymmetric: ``s = (max(hi,0) - min(lo,0)) / (2^b - 1)``, ``z = clip(round(-min(lo,0)/s))``;
    including 0 in the range keeps ``z`` inside ``[0, 2^b-1]``.  (With ``levels``, the same
    with its code range in place of the width's.)
    """
    qmin, qmax = code_range(bits, symmetric, levels)
    lo = np.minimum(np.asarray(lo, np.float32), 0.0)
    hi = np.maximum(np.asarray(hi, np.float32), 0.0)
    if symmetric:
        needed = np.maximum(-lo / float(-qmin), hi / float(qmax))
        return store_scales(needed, scale_dtype), None
    needed = (hi - lo) / float(qmax)
    s = store_scales(needed, scale_dtype)
    z = np.clip(np.round(-lo / s), qmin, qmax).astype(np.uint8)
    return s, z


def quantize_t(w: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], qmin: int,
               qmax: int) -> torch.Tensor:
    """Codes ``clip(round(w / s) + z, qmin, qmax)`` as a float tensor (broadcasting)."""
    c = torch.round(w / scale)
    if zero is not None:
        c = c + zero
    return torch.clamp(c, qmin, qmax)


def dequantize_t(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """``(c - z) * s``."""
    if zero is not None:
        codes = codes - zero
    return codes * scale


def block_view(W: np.ndarray, block_size: int) -> np.ndarray:
    """``W (K, N)`` zero-padded to whole blocks and viewed as ``(k_blocks, block_size, N)``."""
    K, N = W.shape
    kb = num_blocks(K, block_size)
    if kb * block_size != K:
        W = np.concatenate([W, np.zeros((kb * block_size - K, N), W.dtype)], axis=0)
    return W.reshape(kb, block_size, N)


# Elementwise work on a large matrix runs over slices of whole blocks of its rows (contiguous,
# so no copy), so the temporaries of one step (quotients, rounded codes, errors) stay near
# this many elements, not the matrix's size.
CHUNK_ELEMENTS = 1 << 20


def block_row_slices(k_blocks: int, block_size: int, cols: int, elements: int = CHUNK_ELEMENTS):
    """Slices of block indices covering ``k_blocks`` blocks of ``block_size x cols`` values,
    each near ``elements`` values (at least one block)."""
    step = max(1, elements // max(block_size * cols, 1))
    return [slice(b, min(b + step, k_blocks)) for b in range(0, k_blocks, step)]


def quantize_with_grid(W: np.ndarray, scales: np.ndarray, zero_points: Optional[np.ndarray],
                       bits: int, block_size: int, scale_dtype: str,
                       levels: Optional[int] = None) -> QuantizedMatrix:
    """Round ``W`` onto a given block grid (scales already in stored precision)."""
    symmetric = zero_points is None
    qmin, qmax = code_range(bits, symmetric, levels)
    K, N = W.shape
    codes = np.empty((K, N), np.int8 if symmetric else np.uint8)
    Wb = block_view(np.asarray(W, np.float32), block_size)
    cb = codes.reshape(K // block_size, block_size, N) if K % block_size == 0 else None
    for blocks in block_row_slices(Wb.shape[0], block_size, N):
        s = torch.from_numpy(np.ascontiguousarray(scales[blocks], np.float32))[:, None, :]
        z = None
        if zero_points is not None:
            z = torch.from_numpy(zero_points[blocks].astype(np.float32))[:, None, :]
        c = quantize_t(torch.from_numpy(np.ascontiguousarray(Wb[blocks])), s, z, qmin, qmax).numpy()
        if cb is not None:
            cb[blocks] = c
        else:
            r0 = blocks.start * block_size
            flat = c.reshape(-1, N)
            codes[r0:r0 + flat.shape[0]] = flat[:K - r0]
    return QuantizedMatrix(codes=codes, scales=scales.astype(np.float32), zero_points=zero_points,
                           bits=bits, block_size=block_size, scale_dtype=scale_dtype, levels=levels)


CLIP_FACTORS = tuple(np.round(np.linspace(1.0, 0.6, 9), 4))


def _stored_t(needed: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """:func:`store_scales` on a tensor (the same values, as float32)."""
    if scale_dtype == "float32":
        return torch.where(needed > 0, needed, torch.ones_like(needed))
    dt = getattr(torch, scale_dtype)
    s = needed.clamp(max=torch.finfo(dt).max).to(dt)
    low = s.float() < needed
    if bool(low.any()):
        s = torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    return torch.where(needed > 0, s.float(), torch.ones_like(needed))


def _grid_t(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
            scale_dtype: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`scales_from_range` of the ranges ``(lo, hi)`` (float64, already including 0),
    on tensors; the zero points as float32."""
    lo = lo.float()
    hi = hi.float()
    if symmetric:
        return _stored_t(torch.maximum(-lo / float(-qmin), hi / float(qmax)), scale_dtype), None
    s = _stored_t((hi - lo) / float(qmax), scale_dtype)
    return s, torch.clamp(torch.round(-lo / s), qmin, qmax)


def mse_grid(Wb: np.ndarray, bits: int, symmetric: bool, scale_dtype: str,
             row_weights: Optional[np.ndarray] = None,
             levels: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Per block, the grid that minimizes the block's squared rounding error among the min/max
    grids of the range shrunk by each factor in ``CLIP_FACTORS``: clipping a few extreme values
    buys a finer step for all the others (``Wb``: ``(k_blocks, block, N)``).  ``row_weights``
    (``(k_blocks, block)``) weights each row's error, e.g. by its input's energy ``diag(H)``.

    The same grids as :func:`scales_from_range` of the shrunk ranges; the search runs in torch,
    a few block rows at a time (contiguous, and small enough for every candidate's pass to
    stay in cache)."""
    kb, block, N = Wb.shape
    qmin, qmax = code_range(bits, symmetric, levels)
    rw = None if row_weights is None else torch.from_numpy(np.array(row_weights, np.float32))[:, :, None]
    s_out = np.empty((kb, N), np.float32)
    z_out = None if symmetric else np.empty((kb, N), np.uint8)
    factors = torch.tensor([float(f) for f in CLIP_FACTORS], dtype=torch.float64)[:, None, None]
    for blocks in block_row_slices(kb, block, N):
        w = torch.from_numpy(np.ascontiguousarray(Wb[blocks], dtype=np.float32))
        lo = torch.clamp(w.amin(dim=1), max=0.0).double()
        hi = torch.clamp(w.amax(dim=1), min=0.0).double()
        # Every candidate's grid at once: (factors, k_blocks, columns).
        S, Z = _grid_t(lo[None] * factors, hi[None] * factors, qmin, qmax, symmetric, scale_dtype)
        q = torch.empty_like(w)
        best_err = best = None
        for i in range(len(CLIP_FACTORS)):
            st = S[i][:, None, :]
            # In place, in one buffer: codes, then their dequantized error, then its square.
            torch.div(w, st, out=q).round_()
            if Z is not None:
                zt = Z[i][:, None, :]
                q.add_(zt).clamp_(qmin, qmax).sub_(zt)
            else:
                q.clamp_(qmin, qmax)
            q.mul_(st).sub_(w).square_()
            if rw is not None:
                q.mul_(rw[blocks])
            err = q.sum(dim=1)
            if best_err is None:
                best_err, best = err, torch.zeros(err.shape, dtype=torch.int64)
                continue
            # Strictly better only: of equally good candidates the least clipped wins.
            best.masked_fill_(err < best_err, i)
            torch.minimum(best_err, err, out=best_err)
        s_out[blocks] = torch.gather(S, 0, best[None])[0].numpy()
        if z_out is not None:
            z_out[blocks] = torch.gather(Z, 0, best[None])[0].numpy().astype(np.uint8)
    return s_out, z_out


def block_grid(W: np.ndarray, bits: int, block_size: int, symmetric: bool,
               scale_dtype: str, clip_search: bool = True,
               levels: Optional[int] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Grid of every block of ``W``: scales (and zero points) of shape (k_blocks, N); the
    MSE-best clipped range with ``clip_search``, else the plain min/max range."""
    Wb = block_view(np.asarray(W, np.float32), block_size)
    # Zero padding cannot change the grid: 0 is always inside the covered range.
    if clip_search:
        return mse_grid(Wb, bits, symmetric, scale_dtype, levels=levels)
    return scales_from_range(Wb.min(axis=1), Wb.max(axis=1), bits, symmetric, scale_dtype, levels)


def quantize_matrix(W: np.ndarray, bits: Optional[int], block_size: int, symmetric: bool = True,
                    scale_dtype: str = "float16", dense_dtype: str = "float16"):
    """Round-to-nearest quantize a factor, or keep it dense (``DenseMatrix``) when bits is None."""
    from .types import DenseMatrix

    W = np.ascontiguousarray(W, dtype=np.float32)
    if bits is None:
        return DenseMatrix(values=W.astype(dense_dtype).astype(np.float32), dtype=dense_dtype)
    s, z = block_grid(W, bits, block_size, symmetric, scale_dtype)
    return quantize_with_grid(W, s, z, bits, block_size, scale_dtype)
