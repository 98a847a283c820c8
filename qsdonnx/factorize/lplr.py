"""LPLR: low-precision low-rank factorization (Saha, Srivastava, Pilanci; arXiv 2310.11028).

The paper factors ``A (n × d) ≈ Q(A S) · Q(W*)`` with a Gaussian sketch ``S (d × m)`` and
``W* = argmin_W ||A - Q(A S) W||_F``.  With our weight ``W (K, N)`` used as ``X @ W`` the roles
are ``A = W``, ``n = K``, ``d = N``, ``m = rank``: the left factor ``L (K, r)`` spans (a
quantized sketch of) the column space of ``W`` and the right factor ``R (r, N)`` is the
least-squares fit against the *quantized* left factor, itself quantized.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .linalg import device, to_numpy, to_torch, top_svd
from .quantizers import quantize_matrix
from .types import Factorization

SKETCHES = ("svd", "gaussian")


def sketch_left(W: np.ndarray, rank: int, sketch: str = "svd", seed: int = 0,
                oversample: int = 0) -> np.ndarray:
    """The unquantized left factor ``Y (K, r)``.

    * ``"gaussian"``: ``Y = W S`` with ``S (N × r)`` i.i.d. ``N(0, 1/r)`` (the paper's sketch).
      With ``oversample = p > 0`` the sketch has ``r + p`` columns and ``Y = Q_Y U_B[:, :r] Σ_B[:r]``
      with ``Q_Y = orth(W S)`` and ``Q_Yᵀ W = U_B Σ_B V_Bᵀ`` (randomized SVD to rank r).
      Near full rank the plain sketch ``W S`` is ill-conditioned and the least-squares step
      amplifies the quantization error of ``R`` by that condition number; oversampling avoids it.
    * ``"svd"``: ``Y = U_r Σ_r = W V_r``, the sketch by the top right singular vectors, which
      captures the most energy of any rank-r column space.
    """
    if sketch not in SKETCHES:
        raise ValueError(f"sketch must be one of {SKETCHES}, got {sketch!r}")
    K, N = W.shape
    if not 1 <= rank <= min(K, N):
        raise ValueError(f"rank must be in [1, {min(K, N)}], got {rank}")
    dev = device()
    Wt = to_torch(W, dev, torch.float64)
    if sketch == "svd":
        U, S, _ = top_svd(Wt, rank)
        return to_numpy(U * S)
    m = min(rank + max(int(oversample), 0), N)
    gen = torch.Generator().manual_seed(int(seed))
    S = torch.randn(N, m, generator=gen, dtype=torch.float64) / np.sqrt(m)
    Y = Wt @ S.to(dev)
    if m == rank:
        return to_numpy(Y)
    Qy, _ = torch.linalg.qr(Y)
    Ub, Sb, _ = top_svd(Qy.T @ Wt, rank)
    return to_numpy(Qy @ (Ub * Sb))


def least_squares_right(Lhat: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``R* = argmin_R ||W - L̂ R||_F = pinv(L̂) W`` (minimum-norm when ``L̂`` is rank deficient)."""
    dev = device()
    L = to_torch(Lhat, dev, torch.float64)
    return to_numpy(torch.linalg.pinv(L) @ to_torch(W, dev, torch.float64))


def lplr_factorize(W: np.ndarray, rank: int, bits_left: Optional[int], bits_right: Optional[int],
                   block_size: int, symmetric: bool = True, scale_dtype: str = "float16",
                   seed: int = 0, oversample: int = 0, sketch: str = "svd",
                   dense_dtype: str = "float16") -> Factorization:
    """``W ≈ Q(Y) · Q(pinv(Q(Y)) W)`` with ``Y`` from :func:`sketch_left`.

    ``Q`` is block round-to-nearest quantization along the rows of each factor (blocks of ``L``
    along K, blocks of ``R`` along r: one partial block when ``r < block_size``).  A factor
    whose bits is None stays dense in ``dense_dtype``.
    """
    W = np.ascontiguousarray(W, dtype=np.float32)
    Y = sketch_left(W, rank, sketch, seed, oversample)
    left = quantize_matrix(Y, bits_left, block_size, symmetric, scale_dtype, dense_dtype)
    R = least_squares_right(left.dequantize(), W)
    right = quantize_matrix(R, bits_right, block_size, symmetric, scale_dtype, dense_dtype)
    return Factorization(method="lplr", shape=tuple(W.shape), left=left, right=right,
                         info={"rank": rank, "sketch": sketch, "seed": seed,
                               "oversample": oversample, "bits_left": bits_left,
                               "bits_right": bits_right, "block_size": block_size})
