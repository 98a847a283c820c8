"""Block rotations of a layer's input, for incoherence before quantization.

For an orthogonal ``R``, ``X·W = (X·R)·(Rᵀ·W)``: a layer may read its input rotated and hold
``Rᵀ·W`` instead of ``W`` without changing what it computes.  A random rotation spreads each
input channel's weight over many rows, so no row keeps an outlier, and spreads the energy of a
few strong input channels over many: the quantization grid fits ``Rᵀ·W`` better, and the error
that GPTQ-style rounding feeds forward is spread evenly (the "incoherence processing" of QuIP,
Chee et al., arXiv 2307.13304, and QuIP#, Tseng et al., arXiv 2402.04396).

Here ``R = diag(Q, …, Q)`` is block-diagonal with one random orthogonal ``Q`` of order ``b``
repeated along the input: rotating ``X (…, K)`` costs ``b`` multiply-adds per input value (a
``(…·K/b, b) × (b, b)`` product), not ``K`` as a full rotation would.  Everything the
calibration measured about the input follows exactly: ``H → Rᵀ·H·R`` and ``μ → μ·R``.
"""
from __future__ import annotations

import numpy as np

def random_orthogonal(b: int, seed: int = 0) -> np.ndarray:
    """A random orthogonal ``(b, b)`` float32 matrix, uniform over the orthogonal group (QR of
    a Gaussian matrix with the signs of ``R``'s diagonal moved into ``Q``)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((b, b))
    Q, R = np.linalg.qr(A)
    Q = Q * np.sign(np.diag(R))[None, :]
    return Q.astype(np.float32)


def rotatable(K: int, b: int) -> bool:
    return b >= 2 and K % b == 0


def rotate_weight(W: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``Rᵀ·W`` for ``W (K, N)`` and ``R = diag(Q, …, Q)``."""
    K, N = W.shape
    b = Q.shape[0]
    q = Q.astype(np.float64)
    return (q.T @ W.astype(np.float64).reshape(K // b, b, N)).reshape(K, N).astype(W.dtype)


def rotate_input(X: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``X·R`` for ``X (…, K)`` (also a mean ``μ (K,)``)."""
    b = Q.shape[0]
    Xb = X.astype(np.float64).reshape(X.shape[:-1] + (X.shape[-1] // b, b))
    return (Xb @ Q.astype(np.float64)).reshape(X.shape).astype(X.dtype)


def rotate_second_moment(H: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``Rᵀ·H·R`` for a ``(K, K)`` second moment ``H`` of the input."""
    K = H.shape[0]
    b = Q.shape[0]
    q = Q.astype(np.float64)
    left = (q.T @ H.astype(np.float64).reshape(K // b, b, K)).reshape(K, K)  # Rᵀ·H, block rows
    out = (left.reshape(K, K // b, b) @ q).reshape(K, K)  # ·R, block columns
    return ((out + out.T) / 2).astype(H.dtype)
