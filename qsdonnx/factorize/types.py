"""Plain-array results of the factorizations (no onnx here).

Conventions, shared by every algorithm and every lowering:

* A weight is a matrix ``W`` of shape ``(K, N)`` used as ``Y = X @ W`` (K is the reduction
  axis).  Conv weights are viewed this way by the canonicalize pass.
* A quantized matrix keeps integer codes of the same shape ``(K, N)`` and per-block scales
  along K: block ``b`` of column ``n`` covers rows ``b*block_size ... (b+1)*block_size - 1``
  (the last block may be partial).  ``scales`` and ``zero_points`` have shape
  ``(ceil(K / block_size), N)``.
* Dequantization is ``W_hat = (codes - zero_point) * scale``.  Symmetric quantization has
  signed codes in ``[-2^(b-1), 2^(b-1) - 1]`` and no zero point; asymmetric has unsigned codes
  in ``[0, 2^b - 1]`` and an unsigned zero point of the same bit width.
* Byte counts follow the honest rule: codes packed at ``bits`` per value (rows padded to a
  whole byte), scales at their stored width, zero points packed at the container width
  (:func:`container_width`: 4 bits for 3-bit codes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np


def num_blocks(length: int, block_size: int) -> int:
    return (length + block_size - 1) // block_size


CONTAINER_BITS = (2, 4, 8)  # the integer widths ONNX (INT2/INT4/INT8) and MatMulNBits hold


def container_width(bits: int) -> int:
    """The smallest of 2, 4 and 8 bits that holds a ``bits``-bit code.  Codes of other widths
    (3, 5, 6, 7) are stored at their own width as a bit stream and widened to this container
    by constant nodes when the model loads; zero points (one per block) stay in it."""
    for b in CONTAINER_BITS:
        if bits <= b:
            return b
    raise ValueError(f"no integer container holds {bits}-bit codes")


# Code alphabets of L levels, L not a power of two, stored three codes to a word of
# w = ceil(log2(L³)) bits (word = c0 + L·c1 + L²·c2): 5 levels in 7 bits (2.33 bits a code),
# 6 in 8 (2.67), 10 in 10 (3.33), 12 in 11 (3.67).  They give the planner rates between the
# integer widths; like 3-bit codes they widen to the 4-bit container when the model loads.
LEVEL_WORDS = {5: 7, 6: 8, 10: 10, 12: 11}
CODES_PER_WORD = 3


def level_bits(levels: int) -> int:
    """The integer code width an alphabet of ``levels`` values needs (``ceil(log2 levels)``)."""
    return max(1, int(levels - 1).bit_length())


def check_levels(levels: Optional[int], bits: int) -> None:
    """``levels`` (None: ``2^bits``) must be one of ``LEVEL_WORDS`` with ``bits`` its width."""
    if levels is None:
        return
    if levels not in LEVEL_WORDS:
        raise ValueError(f"code levels must be one of {sorted(LEVEL_WORDS)}, got {levels}")
    if bits != level_bits(levels):
        raise ValueError(f"{levels} code levels take {level_bits(levels)}-bit codes, not {bits}")


def code_rate(bits: int, levels: Optional[int] = None) -> float:
    """Stored bits per code: ``bits``, or ``w / 3`` for words of three ``levels``-level codes."""
    return bits if levels is None else LEVEL_WORDS[levels] / CODES_PER_WORD


def level_words_nbytes(count: int, levels: int, last: int, ndim: int = 2) -> int:
    """Bytes of ``count`` codes of an ``ndim``-axis array whose last axis is ``last``, stored in
    words of three (``LEVEL_WORDS``) as the lowering stores them: whole along the last axis when
    it is a multiple of 3, otherwise flattened and padded to whole words, then trimmed and
    reshaped by two small int64 constants.  A word of up to 8 bits is one stream entry at its
    width (8 bits: a plain byte); a wider word is a byte and a stream of its high bits
    (:func:`stream_nbytes`)."""
    w = LEVEL_WORDS[levels]
    if last % CODES_PER_WORD == 0:
        words, wlast, wndim, extra = count // CODES_PER_WORD, last // CODES_PER_WORD, ndim, 0
    else:
        words = -(-count // CODES_PER_WORD)
        wlast, wndim = words, 1
        extra = (8 if count % CODES_PER_WORD else 0) + 8 * ndim
    if w == 8:
        return words + extra
    stream = stream_nbytes(words, w if w < 8 else w - 8, wlast, wndim)
    return stream + extra + (words if w > 8 else 0)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes for ``count`` values packed at ``bits`` each (rounded up to a byte)."""
    return (count * bits + 7) // 8


def stream_nbytes(count: int, bits: int, last: int, ndim: int = 3) -> int:
    """Bytes of ``count`` codes of an ``ndim``-axis array whose last axis is ``last``, stored as
    the lowering stores them (``narrow_codes``): 8-bit codes as they are; narrower ones as a
    stream of 8 codes per ``bits`` bytes, whole along the last axis when it is a multiple of 8,
    otherwise flattened, padded to a multiple of 8 codes, and trimmed and reshaped by two small
    constants (an int64 count, when padded, and the shape)."""
    if bits == 8 or last % 8 == 0:
        return packed_nbytes(count, bits)
    return (count + 7) // 8 * bits + (8 if count % 8 else 0) + ndim * 8


@dataclass
class QuantizedMatrix:
    """Block-wise quantized ``(K, N)`` matrix; see the module docstring."""

    codes: np.ndarray  # int8/int16 (symmetric, signed) or uint8 (asymmetric), shape (K, N)
    scales: np.ndarray  # float32 values, shape (ceil(K/block), N)
    zero_points: Optional[np.ndarray]  # uint8 shape like scales, or None when symmetric
    bits: int
    block_size: int
    scale_dtype: str = "float16"  # how the scales are stored in the model
    levels: Optional[int] = None  # a LEVEL_WORDS alphabet (codes in words of three); None: 2^bits

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def code_rate(self) -> float:
        return code_rate(self.bits, self.levels)

    def dequantize(self, rows: slice = slice(None)) -> np.ndarray:
        """``(codes - zero_point) * scale`` with the scale broadcast over its block (of the
        rows ``rows`` only, when given: a slice that starts on a block boundary)."""
        K = self.codes.shape[0]
        r0, r1, _ = rows.indices(K)
        bs = self.block_size
        if r0 % bs:
            raise ValueError(f"rows must start on a block boundary ({bs}), got {r0}")
        c = self.codes[r0:r1].astype(np.float32)
        b0, n = r0 // bs, r1 - r0
        full = n // bs
        scale = self.scales[b0:b0 + num_blocks(n, bs)].astype(self.scale_dtype).astype(np.float32)
        zero = None if self.zero_points is None else self.zero_points[b0:b0 + num_blocks(n, bs)].astype(np.float32)
        # Whole blocks as (blocks, block, N), broadcast against their scales; then the last rows.
        for part, blocks in ((c[:full * bs].reshape(full, bs, c.shape[1]), slice(0, full)),
                             (c[full * bs:][None], slice(full, full + 1))):
            if part.size:
                if zero is not None:
                    part -= zero[blocks][:, None, :]
                part *= scale[blocks][:, None, :]
        return c

    def squared_error(self, W: np.ndarray, rows: slice = slice(None)) -> float:
        """``‖W − deq(rows)‖²`` for ``W`` the original of those rows (a float32 dot product)."""
        import torch

        d = torch.from_numpy(self.dequantize(rows)).reshape(-1)
        d.sub_(torch.from_numpy(np.ascontiguousarray(W, np.float32)).reshape(-1))
        return float(torch.dot(d, d))

    def stored_scales(self) -> np.ndarray:
        """The scales exactly as the model will hold them (rounded to ``scale_dtype``)."""
        return self.scales.astype(self.scale_dtype).astype(np.float32)

    def nbytes(self) -> int:
        K, N = self.codes.shape
        if self.levels is not None:
            n = level_words_nbytes(K * N, self.levels, N)
        else:
            n = N * packed_nbytes(K, self.bits)
        n += self.scales.size * np.dtype(self.scale_dtype).itemsize
        if self.zero_points is not None:
            n += N * packed_nbytes(self.zero_points.shape[0], container_width(self.bits))
        return n


@dataclass
class DenseMatrix:
    """An unquantized factor, stored in a float type (``float32`` or ``float16``)."""

    values: np.ndarray
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        return self.values.astype(self.dtype).astype(np.float32)

    def nbytes(self) -> int:
        return self.values.size * np.dtype(self.dtype).itemsize


def index_dtype_for(length: int) -> str:
    """Narrowest unsigned integer type that indexes ``length`` positions."""
    if length <= 2**8:
        return "uint8"
    if length <= 2**16:
        return "uint16"
    return "int32" if length <= 2**31 else "int64"


@dataclass
class SparseQuantizedMatrix:
    """A ``(rows, cols)`` factor with the same number ``k`` of stored entries in every column.

    ``indices[j, n]`` is the row of the ``j``-th stored entry of column ``n`` (ascending in ``j``).
    Stored entries are quantized like a :class:`QuantizedMatrix` of shape ``(k, cols)``: blocks of
    ``block_size`` consecutive *stored* entries of a column share a scale (``scales`` has shape
    ``(ceil(k / block_size), cols)``), symmetric signed codes or unsigned codes with a zero point.
    With ``bits = None`` the stored entries are plain floats kept at ``value_dtype``
    (``codes`` then holds those floats and there are no scales).

    Bytes: codes packed at ``bits`` per column (or ``k * cols`` floats), row indices at
    ``index_dtype``, scales at ``scale_dtype`` and packed zero points.
    """

    shape: tuple[int, int]
    indices: np.ndarray  # (k, cols), ascending row index per column
    codes: np.ndarray  # (k, cols) codes, or float values when bits is None
    scales: Optional[np.ndarray]  # (ceil(k / block_size), cols) or None when bits is None
    zero_points: Optional[np.ndarray]
    bits: Optional[int]
    block_size: int
    scale_dtype: str = "float16"
    value_dtype: str = "float16"
    index_dtype: str = ""

    def __post_init__(self) -> None:
        if not self.index_dtype:
            self.index_dtype = index_dtype_for(self.shape[0])

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def values(self) -> np.ndarray:
        """The stored entries ``(k, cols)`` as float32: ``(codes - zero_point) * scale``."""
        if self.bits is None:
            return self.codes.astype(self.value_dtype).astype(np.float32)
        q = QuantizedMatrix(codes=self.codes, scales=self.scales, zero_points=self.zero_points,
                            bits=self.bits, block_size=self.block_size,
                            scale_dtype=self.scale_dtype)
        return q.dequantize()

    def dequantize(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        cols = np.broadcast_to(np.arange(self.shape[1]), self.indices.shape)
        out[self.indices.astype(np.int64), cols] = self.values()
        return out

    def nbytes(self) -> int:
        k, cols = self.indices.shape
        n = self.nnz * np.dtype(self.index_dtype).itemsize
        if self.bits is None:
            return n + self.nnz * np.dtype(self.value_dtype).itemsize
        n += cols * packed_nbytes(k, self.bits)
        n += self.scales.size * np.dtype(self.scale_dtype).itemsize
        if self.zero_points is not None:
            n += cols * packed_nbytes(self.zero_points.shape[0], container_width(self.bits))
        return n


Factor = Union[QuantizedMatrix, DenseMatrix, SparseQuantizedMatrix]


@dataclass
class SparseMatrix:
    """COO/CSR-ready sparse ``(K, N)`` matrix: ``rows``/``cols`` int32, ``values`` float."""

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    value_dtype: str = "float16"

    @property
    def nnz(self) -> int:
        return int(self.values.size)

    def index_bytes(self) -> int:
        # A flat index into K*N stored as int32 (int64 above 2^31 elements).
        K, N = self.shape
        return 4 if K * N < 2**31 else 8

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        np.add.at(out, (self.rows, self.cols), self.values.astype(self.value_dtype).astype(np.float32))
        return out

    def nbytes(self) -> int:
        return self.nnz * (self.index_bytes() + np.dtype(self.value_dtype).itemsize)


@dataclass
class Factorization:
    """``W ≈ deq(q) + deq(left) @ deq(right) + sparse``; any part may be absent."""

    method: str
    shape: tuple[int, int]
    q: Optional[QuantizedMatrix] = None
    left: Optional[Factor] = None  # (K, r)
    right: Optional[Factor] = None  # (r, N)
    sparse: Optional[SparseMatrix] = None
    info: dict = field(default_factory=dict)  # free-form details for the report

    @property
    def rank(self) -> int:
        return 0 if self.left is None else int(self.left.shape[1])

    def dense(self) -> np.ndarray:
        """The reconstructed weight ``W_hat`` in float32."""
        out = np.zeros(self.shape, np.float32)
        if self.q is not None:
            out += self.q.dequantize()
        if self.left is not None and self.right is not None:
            out += self.left.dequantize() @ self.right.dequantize()
        if self.sparse is not None:
            out += self.sparse.dense()
        return out

    def error_norm(self, W: np.ndarray, chunk_elements: int = 1 << 22) -> float:
        """``‖W − W_hat‖_F``, reconstructed a few block rows at a time when only the block codes
        are present (so a large weight is never rebuilt whole); otherwise from :meth:`dense`."""
        if self.left is not None or self.sparse is not None or not isinstance(self.q, QuantizedMatrix):
            return float(np.linalg.norm(W - self.dense()))
        K, N = self.shape
        bs = self.q.block_size
        step = bs * max(1, chunk_elements // max(bs * N, 1))
        total = sum(self.q.squared_error(W[r:r + step], slice(r, r + step)) for r in range(0, K, step))
        return float(np.sqrt(total))

    def nbytes(self) -> int:
        n = 0
        for part in (self.q, self.left, self.right, self.sparse):
            if part is not None:
                n += part.nbytes()
        return n

    def bits_per_weight(self) -> float:
        K, N = self.shape
        return 8.0 * self.nbytes() / (K * N)
