"""Product quantization of lookup tables (Jégou, Douze, Schmid, "Product quantization for
nearest neighbor search", TPAMI 2011), with a scale per row.

A table of ``V`` rows of width ``D`` (held here as the ``(D, V)`` matrix of the embedding
view: one column per row of the table) is stored as

* ``scales[v]``: the row's L2 norm, in the scale dtype;
* ``codes[v, s]``: for each of the ``S = D / d`` sub-vectors of length ``d``, the index of the
  nearest centroid of sub-space ``s`` (``2^cb`` centroids; 8-bit codes: one byte each);
* ``codebooks[s]``: the ``2^cb × d`` centroids of sub-space ``s``, in the scale dtype;

and row ``v`` is rebuilt as ``scales[v] · concat_s codebooks[s, codes[v, s]]``.  The code rate
is ``cb / d`` bits per value.  Centroids come from Lloyd's k-means on the normalized
sub-vectors with each row weighted by ``scales[v]²``, which makes every step decrease the
squared error of the rebuilt table, ``Σ_v ‖scales[v]·(u_v − ĉ_v)‖²``.

Scalar grids spend the same bits on every value independently; a codebook over ``d`` values
fits the joint distribution of neighbouring coordinates and the shape of the row, which is
worth roughly a bit per value at 2 bits on embedding tables.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .linalg import round_to
from .types import Factorization

PQ_CODE_BITS = 8  # one byte per sub-vector code
MIN_ROWS_PER_CENTROID = 8  # fewer rows than this per centroid: a codebook does not pay


@dataclass
class ProductQuantizedMatrix:
    """A ``(D, V)`` table stored as product-quantized columns; see the module docstring."""

    codes: np.ndarray  # (V, S) uint8
    codebooks: np.ndarray  # (S, 2^code_bits, sub_dim) float32 values exact in scale_dtype
    scales: np.ndarray  # (V,) float32 values exact in scale_dtype
    sub_dim: int
    code_bits: int = PQ_CODE_BITS
    scale_dtype: str = "float16"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[1] * self.sub_dim, self.codes.shape[0])

    def rows(self) -> np.ndarray:
        """The rebuilt table as ``(V, D)`` rows."""
        S = self.codes.shape[1]
        sub = self.codebooks[np.arange(S)[None, :], self.codes.astype(np.int64)]  # (V, S, d)
        return sub.reshape(self.codes.shape[0], -1) * self.scales[:, None]

    def dequantize(self) -> np.ndarray:
        return self.rows().T

    def nbytes(self) -> int:
        return pq_nbytes(*self.shape, self.sub_dim, self.code_bits, self.scale_dtype)


def pq_nbytes(D: int, V: int, sub_dim: int, code_bits: int = PQ_CODE_BITS,
              scale_dtype: str = "float16") -> int:
    """Codes (whole bytes per code), codebooks and row scales at the scale dtype's width."""
    S = D // sub_dim
    code_bytes = (code_bits + 7) // 8
    width = np.dtype(scale_dtype).itemsize
    return V * S * code_bytes + S * (1 << code_bits) * sub_dim * width + V * width


def pq_applicable(D: int, V: int, sub_dim: int, code_bits: int = PQ_CODE_BITS) -> bool:
    """Sub-vectors must tile the row, and there must be enough rows to train the codebooks."""
    return D % sub_dim == 0 and V >= MIN_ROWS_PER_CENTROID * (1 << code_bits)



def _seed_centroids(x: torch.Tensor, w: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007), batched over sub-spaces: each next
    centroid is a training row drawn with probability ∝ weight × squared distance to the
    nearest centroid so far (``x``: (c, T, d); returns (c, k, d))."""
    c, T, d = x.shape
    rows = torch.arange(c)
    first = torch.multinomial(w.expand(c, T), 1, generator=gen)[:, 0]
    C = torch.empty(c, k, d)
    C[:, 0] = x[rows, first]
    best = ((x - C[:, :1]) ** 2).sum(-1)  # (c, T)
    for j in range(1, k):
        cum = torch.cumsum((w * best).to(torch.float64), dim=-1)
        total = cum[:, -1:]
        # Once every distinct row is a centroid all weights are 0: draw uniformly then.
        r = torch.rand(c, 1, generator=gen, dtype=torch.float64)
        pick = torch.where(total[:, 0] > 0,
                           torch.searchsorted(cum, r * total)[:, 0].clamp_max(T - 1),
                           (r[:, 0] * T).long().clamp_max(T - 1))
        C[:, j] = x[rows, pick]
        best = torch.minimum(best, ((x - C[:, j:j + 1]) ** 2).sum(-1))
    return C


def pq_quantize(W: np.ndarray, sub_dim: int, code_bits: int = PQ_CODE_BITS, iters: int = 16,
                scale_dtype: str = "float16", seed: int = 0, chunk: int = 16,
                train_rows: int = 32 * (1 << PQ_CODE_BITS)) -> ProductQuantizedMatrix:
    """Product-quantize the columns of ``W (D, V)`` (see the module docstring).

    The centroids are trained on at most ``train_rows`` rows drawn at random (32 per
    centroid by default), then every row is coded against them.  ``chunk`` sub-spaces are
    clustered together (one batched distance product each step), which bounds the memory at
    ``chunk · V · 2^cb`` floats.
    """
    D, V = W.shape
    if D % sub_dim:
        raise ValueError(f"sub-vector length {sub_dim} does not divide the row width {D}")
    k = 1 << code_bits
    if V < k:
        raise ValueError(f"{V} rows cannot train {k} centroids")
    S = D // sub_dim
    rows = torch.from_numpy(np.ascontiguousarray(W.T, dtype=np.float32))  # (V, D)
    norms = round_to(torch.linalg.vector_norm(rows, dim=1), scale_dtype)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    u = (rows / norms[:, None]).reshape(V, S, sub_dim).permute(1, 0, 2).contiguous()  # (S, V, d)
    weight = (norms.to(torch.float64) ** 2).to(torch.float32)  # (V,)
    gen = torch.Generator().manual_seed(seed)
    train = torch.randperm(V, generator=gen)[:max(k, train_rows)].sort().values
    T = len(train)
    w_train = weight[train]
    codes = torch.empty(S, V, dtype=torch.int64)
    books = torch.empty(S, k, sub_dim)

    def nearest(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        # ‖c‖² − 2·x·c in one pass (‖x‖² is the same for every centroid).
        dist = torch.baddbmm((C * C).sum(-1)[:, None, :], x, C.transpose(1, 2), alpha=-2.0)
        return dist.argmin(-1)

    for s0 in range(0, S, chunk):
        x = u[s0:s0 + chunk, train]  # (c, T, d)
        c = x.shape[0]
        C = _seed_centroids(x, w_train, k, gen)
        for _ in range(iters):
            a = nearest(x, C)  # (c, T)
            wsum = torch.zeros(c, k).scatter_add_(1, a, w_train.expand(c, T))
            acc = torch.zeros(c, k, sub_dim).scatter_add_(1, a[:, :, None].expand(c, T, sub_dim),
                                                         x * w_train[None, :, None])
            used = wsum > 0
            C = torch.where(used[:, :, None], acc / wsum.clamp_min(1e-30)[:, :, None], C)
        # Centroids are stored in the scale dtype; every row is coded against the stored values.
        C = round_to(C, scale_dtype)
        for v0 in range(0, V, T):
            codes[s0:s0 + c, v0:v0 + T] = nearest(u[s0:s0 + chunk, v0:v0 + T], C)
        books[s0:s0 + c] = C
    return ProductQuantizedMatrix(codes=codes.T.contiguous().numpy().astype(np.uint8 if code_bits <= 8 else np.uint16),
                                  codebooks=books.numpy(), scales=norms.numpy(), sub_dim=sub_dim,
                                  code_bits=code_bits, scale_dtype=scale_dtype)


def pq_factorize(W: np.ndarray, sub_dim: int, code_bits: int = PQ_CODE_BITS,
                 scale_dtype: str = "float16", seed: int = 0, iters: int = 16) -> Factorization:
    """:func:`pq_quantize` as a :class:`Factorization` with ``method="pq"``."""
    q = pq_quantize(W, sub_dim, code_bits, iters=iters, scale_dtype=scale_dtype, seed=seed)
    return Factorization(method="pq", shape=tuple(W.shape), q=q,
                         info={"sub_dim": sub_dim, "code_bits": code_bits})
