"""Bit packing of unsigned codes and the ONNX Runtime ``com.microsoft.MatMulNBits`` layout.

Packing order: along the last axis, ``8 / bits`` values per byte, the first value in the
lowest bits of the byte (``byte = sum_j v[j] << (j * bits)``); each row is padded with zero
codes to a whole byte.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .types import CODES_PER_WORD, CONTAINER_BITS, LEVEL_WORDS, QuantizedMatrix, container_width, num_blocks

PACK_BITS = (1, 2, 4, 8)
def pack_stream(values_u8: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes (any shape, flattened in row-major order) into groups of
    8 codes per ``bits`` bytes: group ``g`` is the little-endian integer
    ``sum_j v[8g + j] << (j * bits)`` written as ``bits`` bytes.  The code count is padded with
    zeros to a multiple of 8; returns ``(ceil(n / 8), bits)`` uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"stream packing takes 1 to 8 bits, got {bits}")
    v = np.asarray(values_u8).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    pad = (-v.size) % 8
    v = np.concatenate([v.astype(np.uint64), np.zeros(pad, np.uint64)]).reshape(-1, 8)
    word = (v << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(axis=1, dtype=np.uint64)
    out = (word[:, None] >> (np.arange(bits, dtype=np.uint64) * np.uint64(8))) & np.uint64(255)
    return out.astype(np.uint8)


def unpack_stream(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_stream`: the first ``count`` codes (uint8, flat)."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1, bits).astype(np.uint64)
    word = (p << (np.arange(bits, dtype=np.uint64) * np.uint64(8))).sum(axis=1, dtype=np.uint64)
    v = (word[:, None] >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    return v.reshape(-1)[:count].astype(np.uint8)


def level_words(values: np.ndarray, levels: int) -> np.ndarray:
    """Words of three codes along the last axis (a multiple of 3): ``c0 + L·c1 + L²·c2`` for
    codes ``c < L`` (``L = levels``, a key of ``LEVEL_WORDS``); the last axis shrinks by 3."""
    if levels not in LEVEL_WORDS:
        raise ValueError(f"code levels must be one of {sorted(LEVEL_WORDS)}, got {levels}")
    v = np.asarray(values).astype(np.int64)
    if v.shape[-1] % CODES_PER_WORD:
        raise ValueError(f"the last axis ({v.shape[-1]}) is not a multiple of {CODES_PER_WORD}")
    if v.size and (v.min() < 0 or v.max() >= levels):
        raise ValueError(f"codes out of range for {levels} levels")
    g = v.reshape(v.shape[:-1] + (-1, CODES_PER_WORD))
    return g[..., 0] + levels * g[..., 1] + levels * levels * g[..., 2]


def level_digits(levels: int) -> np.ndarray:
    """The decoding table of :func:`level_words`: row ``w`` holds the three codes of word ``w``
    (``(L³, 3)`` uint8)."""
    w = np.arange(levels ** CODES_PER_WORD)
    return np.stack([w % levels, w // levels % levels, w // (levels * levels)], axis=1).astype(np.uint8)


def _check_pack_bits(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"packing supports bits in {PACK_BITS}, got {bits}")


def pack_bits(values_u8: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis: ``out[..., i] = sum_j v[..., i*p + j] << (j*bits)``
    with ``p = 8 / bits`` values per byte; the last axis becomes ``ceil(n * bits / 8)``."""
    _check_pack_bits(bits)
    v = np.asarray(values_u8)
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    v = v.astype(np.uint8)
    if bits == 8:
        return v.copy()
    per = 8 // bits
    n = v.shape[-1]
    nbytes = (n + per - 1) // per
    pad = nbytes * per - n
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint8)], axis=-1)
    v = v.reshape(v.shape[:-1] + (nbytes, per))
    out = np.zeros(v.shape[:-1], np.uint8)
    for j in range(per):
        out |= (v[..., j] << np.uint8(j * bits)).astype(np.uint8)
    return out


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of each packed row (uint8)."""
    _check_pack_bits(bits)
    p = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return p[..., :count].copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(p >> np.uint8(j * bits)) & mask for j in range(per)]
    v = np.stack(parts, axis=-1).reshape(p.shape[:-1] + (p.shape[-1] * per,))
    return v[..., :count]


def to_matmulnbits(qm: QuantizedMatrix, bits: Optional[int] = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B, scales, zero_points)`` in ONNX Runtime's MatMulNBits layout for ``qm`` of shape (K, N).

    * ``B``: uint8 ``(N, k_blocks, block_size * bits / 8)``; unsigned codes ``u`` of column ``n``
      packed low bits first; K is padded to ``k_blocks * block_size`` with codes that decode to 0.
    * ``scales``: float32 ``(N * k_blocks,)`` = ``stored_scales().T`` flattened in (N, k_blocks)
      order (the caller casts to the model's float type).
    * ``zero_points``: uint8 ``(N, ceil(k_blocks * bits / 8))`` packed low bits first.

    ``bits`` is the container width (default: the smallest of 2/4/8 holding ``qm.bits``; the
    lowering stores 3-bit codes at 3 bits and rebuilds this 4-bit layout from them).  Symmetric codes ``c`` become ``u = c + 2^(bits-1)`` with
    zero point ``2^(bits-1)``; asymmetric codes and zero points are kept, so in both cases
    ``(u - z) * s`` equals ``qm.dequantize()``.
    """
    cb = container_width(qm.bits) if bits is None else bits
    if cb not in CONTAINER_BITS or cb < qm.bits:
        raise ValueError(f"container of {cb} bits cannot hold {qm.bits}-bit codes")
    bs = qm.block_size
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block size >= 16, got {bs}")
    K, N = qm.shape
    kb = num_blocks(K, bs)
    if qm.symmetric:
        offset = 1 << (cb - 1)
        u = (qm.codes.astype(np.int16) + offset).astype(np.uint8)
        zp = np.full((kb, N), offset, np.uint8)
    else:
        u = qm.codes.astype(np.uint8)
        zp = qm.zero_points.astype(np.uint8)
    uT = u.T  # (N, K)
    pad = kb * bs - K
    if pad:
        fill = np.broadcast_to(zp[-1][:, None], (N, pad))
        uT = np.concatenate([uT, fill], axis=1)
    B = pack_bits(uT.reshape(N, kb, bs), cb)
    scales = np.ascontiguousarray(qm.stored_scales().T).reshape(-1).astype(np.float32)
    zero_points = pack_bits(np.ascontiguousarray(zp.T), cb)
    return B, scales, zero_points


def dequantize_matmulnbits(B: np.ndarray, scales: np.ndarray, zero_points: Optional[np.ndarray],
                           K: int, bits: int, block_size: int) -> np.ndarray:
    """Reference decoding of the MatMulNBits layout back to ``W (K, N)``:
    ``W[k, n] = (u[n, k] - z[n, k // block]) * s[n, k // block]`` (default ``z = 2^(bits-1)``)."""
    N, kb, _ = B.shape
    u = unpack_bits(B, bits, block_size).astype(np.float32)  # (N, kb, bs)
    if zero_points is None:
        z = np.full((N, kb), 1 << (bits - 1), np.float32)
    else:
        z = unpack_bits(zero_points, bits, kb).astype(np.float32)
    s = np.asarray(scales, np.float32).reshape(N, kb)
    w = (u - z[:, :, None]) * s[:, :, None]
    return np.ascontiguousarray(w.reshape(N, kb * block_size)[:, :K].T)
