"""Truncated SVD factorizations, plain and calibration-weighted."""
from __future__ import annotations

import numpy as np
import torch

from .linalg import cholesky_lower, device, to_numpy, to_torch, top_svd
from .types import DenseMatrix, Factorization


def _check_rank(W: np.ndarray, rank: int) -> None:
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {W.shape}")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank must be in [1, {min(W.shape)}], got {rank}")


def truncated_svd(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U_r, S_r, Vt_r)`` of the top ``rank`` singular triplets of ``W``."""
    _check_rank(W, rank)
    U, S, Vt = top_svd(to_torch(W, device(), torch.float64), rank)
    return to_numpy(U), to_numpy(S), to_numpy(Vt)


def svd_factorize(W: np.ndarray, rank: int, dtype: str = "float32") -> Factorization:
    """Eckart–Young truncation ``W ≈ (U_r √S_r)(√S_r V_rᵀ)``; the Frobenius error is
    ``sqrt(sum_{i > r} σ_i²)`` (before rounding the factors to ``dtype``)."""
    U, S, Vt = truncated_svd(W, rank)
    r = np.sqrt(S)
    left = DenseMatrix(values=(U * r[None, :]).astype(dtype).astype(np.float32), dtype=dtype)
    right = DenseMatrix(values=(r[:, None] * Vt).astype(dtype).astype(np.float32), dtype=dtype)
    return Factorization(method="svd", shape=tuple(W.shape), left=left, right=right,
                         info={"rank": rank, "singular_values": S})


def weighted_svd(W: np.ndarray, H: np.ndarray, rank: int, damp: float = 1e-6
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` ``(L, R)`` minimizing ``tr((W - LR)ᵀ H (W - LR)) = ||X(W - LR)||_F²``.

    With ``C Cᵀ = H + λI`` (Cholesky, ``λ = damp * mean diag H``) the objective is
    ``||Cᵀ W - Cᵀ L R||_F²``; the truncated SVD ``Cᵀ W ≈ U_r S_r V_rᵀ`` is optimal there, so
    ``L = C⁻ᵀ U_r √S_r`` and ``R = √S_r V_rᵀ``.
    """
    _check_rank(W, rank)
    K = W.shape[0]
    if H.shape != (K, K):
        raise ValueError(f"H must be ({K}, {K}), got {H.shape}")
    C = cholesky_lower(to_torch(H, device(), torch.float64), damp)
    return weighted_svd_prepared(W, C, rank)


def weighted_svd_prepared(W: np.ndarray, C: torch.Tensor, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`weighted_svd` with the lower Cholesky factor ``C`` of ``H + λI`` given."""
    _check_rank(W, rank)
    Wt = to_torch(W, C.device, torch.float64)
    U, S, Vt = top_svd(C.T @ Wt, rank)
    r = torch.sqrt(S)
    L = torch.linalg.solve_triangular(C.T, U * r, upper=True)
    R = r[:, None] * Vt
    return to_numpy(L), to_numpy(R)


def weighted_svd_factorize(W: np.ndarray, H: np.ndarray, rank: int, dtype: str = "float32",
                           damp: float = 1e-6) -> Factorization:
    """:func:`weighted_svd` as a :class:`Factorization` (``method="wsvd"``, dense factors)."""
    L, R = weighted_svd(W, H, rank, damp)
    left = DenseMatrix(values=L.astype(dtype).astype(np.float32), dtype=dtype)
    right = DenseMatrix(values=R.astype(dtype).astype(np.float32), dtype=dtype)
    return Factorization(method="wsvd", shape=tuple(W.shape), left=left, right=right,
                         info={"rank": rank})
