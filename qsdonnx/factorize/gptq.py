"""GPTQ / LDLQ error-feedback quantization (Frantar et al., arXiv 2210.17323).

Our weight is ``W (K, N)`` used as ``X @ W`` with ``H = XᵀX (K × K)``: the rows of ``W`` are
the input dimensions, quantized one after another; the N output columns are independent
problems sharing ``H``.  The objective is ``tr((W - Ŵ)ᵀ H (W - Ŵ))``.

After rounding, the scales are fitted again to the same objective with the codes held
(:func:`refit_scales`): each column's best scales are a small least-squares solve.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from .linalg import cholesky_lower, device, to_torch
from .quantizers import check_bits, code_range, mse_grid
from .types import Factorization, QuantizedMatrix, num_blocks

_CHUNK_ROWS = 128


# Above this many inputs a float64 K×K matrix passes 512 MiB: the inverse factor is computed in
# float32, in place in one reordered copy of H (GPTQ's reference implementation works in float32
# throughout), so a layer needs about two K×K float32 matrices, H and U.
LEAN_FACTOR_K = 8192


def upper_inverse_cholesky(H: np.ndarray, damp: float, perm: Optional[np.ndarray] = None) -> torch.Tensor:
    """Upper ``U`` with ``Uᵀ U = (H_p + λI)⁻¹``, ``λ = damp * mean(diag H)``, where ``H_p`` is
    ``H`` with rows and columns in the order ``perm`` (default: as they are); float64, or float32
    past :data:`LEAN_FACTOR_K` inputs on the CPU.

    With ``J`` the order-reversing permutation and ``J (H_p + λI) J = D Dᵀ`` (lower Cholesky),
    ``V = J D J`` is upper triangular with ``V Vᵀ = H_p + λI``, hence ``U = V⁻¹``: one Cholesky
    and one triangular solve, no explicit inverse of H.
    """
    K = H.shape[0]
    if K > LEAN_FACTOR_K and device().type == "cpu":
        return torch.from_numpy(_lean_upper_inverse_cholesky(H, damp, perm))
    Hp = np.asarray(H, np.float64) if perm is None else np.asarray(H, np.float64)[np.ix_(perm, perm)]
    Ht = to_torch(Hp, device(), torch.float64)
    del Hp
    rev = torch.arange(K - 1, -1, -1, device=Ht.device)
    D = cholesky_lower(Ht[rev][:, rev], damp)
    V = D[rev][:, rev]
    eye = torch.eye(K, dtype=torch.float64, device=V.device)
    return torch.linalg.solve_triangular(V, eye, upper=True)


def _lean_upper_inverse_cholesky(H: np.ndarray, damp: float, perm: Optional[np.ndarray]) -> np.ndarray:
    """:func:`upper_inverse_cholesky` in float32 in one K×K buffer: Cholesky in place, the
    triangular inverse in place (:func:`_invert_lower_in_place`), then both axes reversed in
    place; λ is raised as :func:`~.linalg.cholesky_lower` does while the factor does not exist."""
    K = H.shape[0]
    order = (np.arange(K) if perm is None else np.asarray(perm))[::-1].copy()
    diag = np.diag(H).astype(np.float64)[order]
    dead = diag <= 0
    mean = float(np.where(dead, 1.0, diag).mean())
    info = torch.zeros((), dtype=torch.int32)
    idx = torch.arange(K)
    for _ in range(12):
        A = torch.from_numpy(np.asarray(H, np.float32)[np.ix_(order, order)])
        if dead.any():
            d = torch.from_numpy(dead)
            A[d, :] = 0
            A[:, d] = 0
        A[idx, idx] = torch.from_numpy((np.where(dead, 1.0, diag) + damp * (mean if mean > 0 else 1.0)).astype(np.float32))
        torch.linalg.cholesky_ex(A, out=(A, info))
        if int(info) == 0:
            break
        del A
        damp = max(damp * 10, 1e-8)
    else:
        raise np.linalg.LinAlgError("matrix is not positive definite even after damping")
    _invert_lower_in_place(A)
    # U = J D⁻¹ J: reverse both axes, a pair of rows at a time.
    for i in range(K // 2):
        top = A[i].flip(0)
        A[i] = A[K - 1 - i].flip(0)
        A[K - 1 - i] = top
    if K % 2:
        A[K // 2] = A[K // 2].flip(0)
    return A.numpy()


def _invert_lower_in_place(L: torch.Tensor, block: int = 256) -> None:
    """``L ← L⁻¹`` for a lower triangular ``L`` whose upper part is zero, block column by block
    column from the last: with the trailing block already inverted,
    ``X₂₁ = −L₂₂⁻¹ L₂₁ L₁₁⁻¹`` (the memory one block column needs, not a second matrix)."""
    K = L.shape[0]
    for j in range(((K - 1) // block) * block, -1, -block):
        e = min(j + block, K)
        D = torch.linalg.solve_triangular(L[j:e, j:e], torch.eye(e - j, dtype=L.dtype), upper=False)
        if e < K:
            L[e:, j:e] = -(L[e:, e:] @ L[e:, j:e]) @ D
        L[j:e, j:e] = D


def gptq_quantize(W: np.ndarray, H: np.ndarray, bits: int, block_size: int,
                  symmetric: bool = True, scale_dtype: str = "float16", damp: float = 0.01,
                  act_order: bool = False, refit: bool = True,
                  levels: Optional[int] = None) -> QuantizedMatrix:
    """Quantize rows ``k = 0..K-1`` in turn with error feedback to the rows not yet quantized.

    With ``U`` the upper Cholesky factor of ``(H + λI)⁻¹`` (``λ = damp * mean(diag H)``), row
    ``k`` is rounded to ``q_k = Q(w_k)`` and the remaining rows absorb its error:
    ``w_j ← w_j - U[k, j] · (w_k - q_k) / U[k, k]`` for ``j > k`` (the OBS update), applied
    lazily: inside a chunk of 128 rows each row gathers the updates of the earlier rows when it
    is reached, and the rows after the chunk receive the whole chunk's updates at once.

    The grid of a block (``block_size`` rows) is the min/max grid of its *current*, already
    error-updated rows at the moment its first row is reached.  With ``act_order`` rows are
    visited by decreasing ``diag(H)``; since a block's rows are then no longer visited together,
    its grid is fixed up front from the original weights (static groups), with the clipping
    that minimizes the block's squared error weighted by ``diag(H)``: the energy of each row's
    input (on skewed inputs, 15-25 % less H-weighted error than the plain squared error).

    ``refit`` then fits the scales to the H-weighted objective with the codes fixed
    (:func:`refit_scales`; never worse, typically 10 % less error).  ``levels`` codes an
    alphabet of that many values (``types.LEVEL_WORDS``) instead of ``2^bits``.
    """
    check_bits(bits)
    W = np.ascontiguousarray(W, dtype=np.float32)
    K = W.shape[0]
    if H.shape != (K, K):
        raise ValueError(f"H must be ({K}, {K}), got {H.shape}")
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    U = upper_inverse_cholesky(H, damp, perm if act_order else None)
    q = gptq_quantize_prepared(W, U, bits, block_size, symmetric, scale_dtype,
                               perm if act_order else None, row_weights=np.diag(H), levels=levels)
    del U  # (the refit needs H only)
    return refit_scales(q, W, H) if refit else q


# Column chunks of the refit hold at most this many bytes of per-column normal equations.
REFIT_CHUNK_BYTES = 256 << 20


def refit_scales(q: QuantizedMatrix, W: np.ndarray, H: np.ndarray) -> QuantizedMatrix:
    """With the codes fixed, the scales of each column that minimise its H-weighted error.

    Column ``n`` dequantizes to ``C s`` where ``C`` (K × blocks) holds the block-diagonal codes
    minus zero points, so the best scales solve ``(Cᵀ H C) s = Cᵀ H w``. The solution is rounded
    to the stored scale type; a column keeps its old scales unless the new ones, as stored,
    have the same signs and give a smaller error.  Columns are independent: they are solved in
    chunks whose ``blocks × blocks`` systems fit :data:`REFIT_CHUNK_BYTES`.
    """
    K, N = q.codes.shape
    bs = q.block_size
    kb = num_blocks(K, bs)
    Kp = kb * bs
    # float32 products (sums of K terms), float64 solve; K padded to whole blocks with zeros
    if Kp == K and isinstance(H, np.ndarray) and H.dtype == np.float32 and H.flags.c_contiguous:
        Hp = torch.from_numpy(H)  # (nothing to pad: H as it is)
    else:
        Hp = torch.zeros((Kp, Kp), dtype=torch.float32)
        Hp[:K, :K] = torch.from_numpy(np.asarray(H, np.float32))
    step = max(1, min(N, REFIT_CHUNK_BYTES // (8 * kb * kb)))
    scales = q.scales
    for n0 in range(0, N, step):
        cols = slice(n0, min(N, n0 + step))
        sub = replace(q, codes=q.codes[:, cols], scales=q.scales[:, cols],
                      zero_points=None if q.zero_points is None else q.zero_points[:, cols])
        new = _refit_columns(sub, np.asarray(W)[:, cols], Hp)
        if new is not None:
            if scales is q.scales:
                scales = q.scales.astype(np.float32, copy=True)
            scales[:, cols] = new
    return q if scales is q.scales else replace(q, scales=scales)


def _refit_columns(q: QuantizedMatrix, W: np.ndarray, Hp: torch.Tensor) -> Optional[np.ndarray]:
    """:func:`refit_scales` of the columns of ``q`` (``Hp``: H padded to whole blocks): their
    scales, or None when some system is singular (the scales stay as they are)."""
    K, N = q.codes.shape
    bs = q.block_size
    kb = num_blocks(K, bs)
    Kp = kb * bs
    C = torch.zeros((Kp, N), dtype=torch.float32)
    codes = q.codes.astype(np.float32)
    if q.zero_points is not None:
        codes = codes - np.repeat(q.zero_points.astype(np.float32), bs, axis=0)[:K]
    C[:K] = torch.from_numpy(codes)
    del codes
    Cb = C.reshape(kb, bs, N)
    A = torch.empty((N, kb, kb), dtype=torch.float64)
    for b in range(kb):
        HC = Hp[:, b * bs:(b + 1) * bs] @ Cb[b]  # (Kp, N): H's block-b columns times block b's codes
        A[:, :, b] = (Cb * HC.reshape(kb, bs, N)).sum(1).T.double()
    del HC
    Wp = torch.zeros((Kp, N), dtype=torch.float32)
    Wp[:K] = torch.from_numpy(np.asarray(W, np.float32))
    r = (Cb * (Hp @ Wp).reshape(kb, bs, N)).sum(1).T.double()  # (N, kb)
    del Wp, C, Cb
    ridge = 1e-7 * torch.diagonal(A, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    A = A + ridge[:, None, None] * torch.eye(kb, dtype=torch.float64)
    try:
        s_new = torch.linalg.solve(A, r.unsqueeze(-1)).squeeze(-1).T.numpy()  # (kb, N)
    except RuntimeError:  # singular for some column: keep the scales as they are
        return None
    s_new = np.nan_to_num(s_new).astype(np.float32).astype(q.scale_dtype).astype(np.float32)
    # error(s) = wᵀHw − 2 sᵀr + sᵀAs: compare old and new scales without forming the errors
    s_old = q.stored_scales()
    so, sn = (torch.from_numpy(s.T.astype(np.float64)) for s in (s_old, s_new))

    def quad(s: torch.Tensor) -> torch.Tensor:  # sᵀAs per column
        return (s * (A @ s.unsqueeze(-1)).squeeze(-1)).sum(1)

    quad_o = quad(so)
    gain = (quad_o - quad(sn) - 2 * ((so - sn) * r).sum(1)).numpy()  # old error minus new
    same_sign = np.all((np.sign(s_new) == np.sign(s_old)) & (s_new != 0), axis=0)
    keep_new = same_sign & (gain > 1e-6 * np.abs(quad_o.numpy()))
    return np.where(keep_new[None, :], s_new, q.scales).astype(np.float32)


def gptq_quantize_prepared(W: np.ndarray, U: torch.Tensor, bits: int, block_size: int,
                           symmetric: bool = True, scale_dtype: str = "float16",
                           perm: Optional[np.ndarray] = None,
                           row_weights: Optional[np.ndarray] = None,
                           levels: Optional[int] = None) -> QuantizedMatrix:
    """:func:`gptq_quantize` with ``U`` (from :func:`upper_inverse_cholesky` of the permuted H)
    given, so repeated calls with the same ``H`` factor it once; ``perm`` is the visiting order
    (None: natural order with dynamic block grids); ``row_weights`` (``diag(H)``) weights the
    static grids' clipping search."""
    check_bits(bits)
    W = np.ascontiguousarray(W, dtype=np.float32)
    K, N = W.shape
    qmin, qmax = code_range(bits, symmetric, levels)
    kb = num_blocks(K, block_size)
    scales = np.zeros((kb, N), np.float32)
    zeros = None if symmetric else np.zeros((kb, N), np.uint8)
    static = perm is not None
    if perm is None:
        perm = np.arange(K)
    # The row loop runs in numpy: its operations are small, and numpy's elementwise kernels
    # stay single-threaded, which keeps the loop fast on a CPU shared with other work.
    Wp = W[perm].copy()
    Un = U.detach().to("cpu", torch.float32).numpy()
    zf = None if symmetric else np.zeros((kb, N), np.float32)

    rw_all = None if row_weights is None or not static else np.asarray(row_weights, np.float32)

    def set_grid(b: int, rows: np.ndarray) -> None:
        rw = None if rw_all is None else rw_all[b * block_size:b * block_size + len(rows)][None]
        s_, z_ = mse_grid(rows[None], bits, symmetric, scale_dtype, rw, levels)
        s_ = s_[0]
        z_ = None if z_ is None else z_[0]
        scales[b] = s_
        if zeros is not None:
            zeros[b] = z_
            zf[b] = z_

    if static:
        for b in range(kb):
            set_grid(b, W[b * block_size:(b + 1) * block_size])

    code_type = np.int8 if symmetric else np.uint8
    codes = np.zeros((K, N), code_type)  # (the rounded values are whole numbers in range)
    chunk = max(block_size, (_CHUNK_ROWS // block_size) * block_size)
    for c0 in range(0, K, chunk):
        c1 = min(c0 + chunk, K)
        W1 = Wp[c0:c1]
        U1 = Un[c0:c1, c0:c1]
        E1 = np.zeros_like(W1)
        for i in range(c1 - c0):
            k = c0 + i
            if i:
                # Lazy form of the in-chunk OBS updates: row i receives the errors of rows < i.
                W1[i] -= U1[:i, i] @ E1[:i]
            if not static and k % block_size == 0:
                rows = W1[i:i + block_size].copy()
                n_ahead = min(block_size, c1 - c0 - i)
                if i and n_ahead > 1:
                    rows[1:n_ahead] -= U1[:i, i + 1:i + n_ahead].T @ E1[:i]
                set_grid(k // block_size, rows)
            b = int(perm[k]) // block_size
            s_b = scales[b]
            w = W1[i]
            if zf is None:
                q = np.clip(np.round(w / s_b), qmin, qmax)
                deq = q * s_b
            else:
                q = np.clip(np.round(w / s_b) + zf[b], qmin, qmax)
                deq = (q - zf[b]) * s_b
            codes[k] = q
            E1[i] = (w - deq) / U1[i, i]
        if c1 < K:
            Wp[c1:] -= Un[c0:c1, c1:].T @ E1

    codes_np = np.empty((K, N), code_type)
    codes_np[perm] = codes
    del codes
    return QuantizedMatrix(codes=codes_np,
                           scales=scales, zero_points=zeros, bits=bits, block_size=block_size,
                           scale_dtype=scale_dtype, levels=levels)


def gptq_factorize(W: np.ndarray, H: np.ndarray, bits: int, block_size: int,
                   symmetric: bool = True, scale_dtype: str = "float16", damp: float = 0.01,
                   act_order: bool = False, refit: bool = True,
                   levels: Optional[int] = None) -> Factorization:
    """:func:`gptq_quantize` as a :class:`Factorization` with ``method="gptq"``."""
    q = gptq_quantize(W, H, bits, block_size, symmetric, scale_dtype, damp, act_order, refit, levels)
    info = {"bits": bits, "block_size": block_size, "symmetric": symmetric,
            "damp": damp, "act_order": act_order, "refit": refit}
    if levels is not None:
        info["levels"] = levels
    return Factorization(method="gptq", shape=tuple(W.shape), q=q, info=info)
