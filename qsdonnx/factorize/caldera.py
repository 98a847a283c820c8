"""CALDERA: ``W ≈ Q + L R`` with calibration weighting (Saha et al., arXiv 2405.18886).

``Q`` is a low-precision backbone quantized with GPTQ/LDLQ, ``L R`` a low-rank correction whose
factors are themselves quantized; both are fitted to the calibration objective
``tr((W - Ŵ)ᵀ H (W - Ŵ)) = ||X (W - Ŵ)||_F²`` with ``H = XᵀX``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .gptq import gptq_quantize, gptq_quantize_prepared, upper_inverse_cholesky
from .linalg import cholesky_lower, device, to_numpy, to_torch
from .svd import weighted_svd_prepared
from .types import DenseMatrix, Factor, Factorization


def _werr(E: torch.Tensor, H: torch.Tensor) -> float:
    return float((E * (H @ E)).sum())


def _ridge(G: torch.Tensor, rel: float) -> torch.Tensor:
    d = torch.diagonal(G)
    mean = float(d.mean()) if d.numel() else 0.0
    return G + (rel * mean if mean > 0 else rel) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def quantized_lowrank_fit(A: np.ndarray, H: torch.Tensor, C: torch.Tensor, U_H: torch.Tensor,
                          rank: int, bits: Optional[int], block_size: int, symmetric: bool,
                          scale_dtype: str, dense_dtype: str, iters: int, damp: float
                          ) -> tuple[Factor, Factor, float]:
    """Quantized ``(L, R)`` approximately minimizing ``tr((A - LR)ᵀ H (A - LR))``.

    Start from the H-weighted truncated SVD (:func:`weighted_svd_prepared`), then alternate
    (LPLR with a Hessian):

    * ``L̂ = GPTQ_H(L)``: the error ``tr(Rᵀ ΔLᵀ H ΔL R)`` weights the rows of ``L`` by ``H``;
    * ``R = (L̂ᵀ H L̂)⁻¹ L̂ᵀ H A`` and ``R̂ = GPTQ_{L̂ᵀHL̂}(R)``: the error ``||Cᵀ L̂ ΔR||²`` weights
      the rows of ``R`` by ``L̂ᵀ H L̂``;
    * ``L = A R̂ᵀ (R̂ R̂ᵀ)⁻¹`` (the stationary point of the objective in ``L`` for invertible H).

    Returns the best pair seen and its weighted error.  ``bits=None`` returns the dense SVD
    factors in ``dense_dtype``.
    """
    dev = H.device
    L, R = weighted_svd_prepared(A, C, rank)
    At = to_torch(A, dev, torch.float64)
    if bits is None:
        left = DenseMatrix(values=L.astype(dense_dtype).astype(np.float32), dtype=dense_dtype)
        right = DenseMatrix(values=R.astype(dense_dtype).astype(np.float32), dtype=dense_dtype)
        LR = to_torch(left.dequantize(), dev, torch.float64) @ to_torch(right.dequantize(), dev, torch.float64)
        return left, right, _werr(At - LR, H)
    best = None
    # tr((A - L̂R̂)ᵀH(A - L̂R̂)) = tr(AᵀHA) - 2 <R̂, L̂ᵀHA> + <R̂, (L̂ᵀHL̂) R̂>: only the first
    # term costs K²N, and it does not change between the alternations.
    base = _werr(At, H)
    for _ in range(max(1, iters)):
        left = gptq_quantize_prepared(L, U_H, bits, block_size, symmetric, scale_dtype)
        Lh = to_torch(left.dequantize(), dev, torch.float64)
        HL = H @ Lh
        G = Lh.T @ HL
        B = HL.T @ At
        Rls = torch.linalg.solve(_ridge(G, 1e-8), B)
        right = gptq_quantize(to_numpy(Rls), to_numpy(G), bits, block_size, symmetric,
                              scale_dtype, damp, refit=False)
        Rh = to_torch(right.dequantize(), dev, torch.float64)
        err = max(base - 2.0 * float((Rh * B).sum()) + float((Rh * (G @ Rh)).sum()), 0.0)
        if best is None or err < best[2]:
            best = (left, right, err)
        L = to_numpy(torch.linalg.solve(_ridge(Rh @ Rh.T, 1e-8), Rh @ At.T).T)
    return best


def caldera_factorize(W: np.ndarray, H: np.ndarray, rank: int, bits_q: int,
                      bits_lr: Optional[int], block_size: int, iters: int = 8,
                      symmetric: bool = True, scale_dtype: str = "float16", damp: float = 0.01,
                      lr_iters: int = 3, lr_damp: float = 1e-4,
                      dense_dtype: str = "float16", init: str = "lowrank") -> Factorization:
    """Alternate, for ``iters`` rounds:

    * ``Q ← GPTQ_H(W - L R)`` at ``bits_q`` (damping ``damp``);
    * ``(L, R) ← argmin tr((W - Q - LR)ᵀ H (W - Q - LR))`` over rank ``rank``, factors quantized
      at ``bits_lr`` (:func:`quantized_lowrank_fit`; dense in ``dense_dtype`` when None).

    ``init="zero"`` starts from ``L R = 0`` as in the paper; ``init="lowrank"`` (default) starts
    from the quantized low-rank fit of ``W`` itself, so large low-rank structure (outliers) goes
    to the factors before the first ``Q`` has to cover it with coarse scales, which converges in
    far fewer rounds on such weights.

    ``info["errors"]`` holds ``tr((W - Ŵ_t)ᵀ H (W - Ŵ_t))`` of every round (undamped H); the
    round with the smallest error is returned, so the result is never worse than the first.
    """
    if init not in ("lowrank", "zero"):
        raise ValueError(f"init must be 'lowrank' or 'zero', got {init!r}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    K, N = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H must be ({K}, {K}), got {H.shape}")
    if not 1 <= rank <= min(K, N):
        raise ValueError(f"rank must be in [1, {min(K, N)}], got {rank}")
    dev = device()
    Ht = to_torch(H, dev, torch.float64)
    C = cholesky_lower(Ht, lr_damp)
    U_H = upper_inverse_cholesky(np.asarray(H, np.float64), damp)
    Wt = to_torch(W, dev, torch.float64)
    LR = np.zeros_like(W)
    if init == "lowrank":
        left, right, _ = quantized_lowrank_fit(W, Ht, C, U_H, rank, bits_lr, block_size, symmetric,
                                               scale_dtype, dense_dtype, lr_iters, damp)
        LR = left.dequantize() @ right.dequantize()
    errors: list[float] = []
    best = None
    for _ in range(max(1, iters)):
        q = gptq_quantize_prepared(W - LR, U_H, bits_q, block_size, symmetric, scale_dtype)
        Qd = q.dequantize()
        left, right, _ = quantized_lowrank_fit(W - Qd, Ht, C, U_H, rank, bits_lr, block_size,
                                               symmetric, scale_dtype, dense_dtype, lr_iters, damp)
        LR = left.dequantize() @ right.dequantize()
        err = _werr(Wt - to_torch(Qd + LR, dev, torch.float64), Ht)
        errors.append(err)
        if best is None or err < best[3]:
            best = (q, left, right, err)
    q, left, right, err = best
    return Factorization(method="caldera", shape=(K, N), q=q, left=left, right=right,
                         info={"errors": errors, "error": err, "rank": rank, "bits_q": bits_q,
                               "bits_lr": bits_lr, "block_size": block_size})
