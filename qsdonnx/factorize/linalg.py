"""Torch helpers shared by the factorizations: device choice, damped Cholesky, H-weighted error."""
from __future__ import annotations

import numpy as np
import torch


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def to_torch(a: np.ndarray, dev: torch.device | None = None, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=dev or torch.device("cpu"))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def round_to(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """``x`` rounded to the values ``dtype`` (e.g. ``"float16"``) can hold, in ``x``'s own type."""
    return x.to(getattr(torch, dtype)).to(x.dtype)


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag(H)) * I`` with dead inputs (zero diagonal) given a unit diagonal.

    An input that never fires carries no information about how to round its row; a unit
    diagonal makes that row a plain round-to-nearest row instead of a singular pivot.
    """
    H = H.clone()
    d = torch.diagonal(H)
    dead = d <= 0
    if bool(dead.any()):
        H[dead, :] = 0
        H[:, dead] = 0
        d[dead] = 1
    mean = float(d.mean())
    d += damp * (mean if mean > 0 else 1.0)
    return H


def cholesky_lower(H: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor ``C`` of ``H + λI`` (``C Cᵀ = H + λI``), raising λ until it exists."""
    Hd = H.to(torch.float64)
    for _ in range(12):
        C, info = torch.linalg.cholesky_ex(damped(Hd, damp))
        if int(info) == 0:
            return C
        damp = max(damp * 10, 1e-8)
    raise np.linalg.LinAlgError("matrix is not positive definite even after damping")


def top_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets ``(U_r, S_r, V_rᵀ)`` of ``M`` (computed in float64).

    For a clearly rectangular ``M`` (one side at least twice the other) the small Gram matrix
    ``MᵀM = V S² Vᵀ`` (or ``M Mᵀ``) is eigendecomposed and ``U_r = M V_r / S_r``: several times
    fewer flops than a full SVD, and accurate for the leading triplets that truncation keeps.
    Directions with ``S = 0`` get zero singular vectors (they contribute nothing).
    """
    M = M.to(torch.float64)
    m, n = M.shape
    if max(m, n) < 2 * min(m, n):
        U, S, Vt = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vt[:rank]
    wide = n > m
    A = M.T if wide else M
    evals, V = torch.linalg.eigh(A.T @ A)
    order = torch.argsort(evals, descending=True)[:rank]
    S = torch.sqrt(torch.clamp(evals[order], min=0.0))
    V = V[:, order]
    tiny = S <= S[0] * 1e-12
    safe = torch.where(tiny, torch.ones_like(S), S)
    U = (A @ V) / safe
    U[:, tiny] = 0.0
    S = torch.where(tiny, torch.zeros_like(S), S)
    if wide:
        return V, S, U.T
    return U, S, V.T


def weighted_error(W: np.ndarray, What: np.ndarray, H: np.ndarray | None) -> float:
    """``tr((W - Ŵ)ᵀ H (W - Ŵ))`` (``||W - Ŵ||_F²`` when H is None)."""
    E = torch.from_numpy(np.ascontiguousarray(W, np.float32) - np.ascontiguousarray(What, np.float32)).double()
    if H is None:
        return float((E * E).sum())
    Ht = torch.from_numpy(np.ascontiguousarray(H)).double()
    return float((E * (Ht @ E)).sum())


def weighted_error_fast(W: np.ndarray, What: np.ndarray, H: np.ndarray | None) -> float:
    """:func:`weighted_error` in float32 (no float64 copies of ``H`` and the error): for
    comparing candidates, where seven significant digits are plenty."""
    E = torch.from_numpy(np.ascontiguousarray(W, np.float32)) - torch.from_numpy(np.ascontiguousarray(What, np.float32))
    if H is None:
        return float(torch.dot(E.reshape(-1), E.reshape(-1)))
    Ht = torch.from_numpy(np.ascontiguousarray(H, np.float32))
    return float((E * (Ht @ E)).sum())
