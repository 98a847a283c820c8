"""QSD: quantized sparse weight decomposition (Kuzmin et al., arXiv 2207.11048).

``W ≈ L R`` with ``L (K, r)`` and ``R (r, N)`` both sparse (a fixed number of stored entries
per column) and quantized, fitted by projected gradient descent on the calibration objective
``tr((W - L R)ᵀ H (W - L R)) = ||X (W - L R)||_F²``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from .linalg import cholesky_lower, device, to_numpy, to_torch, top_svd
from .quantizers import check_bits, code_range, scales_from_range
from .types import DenseMatrix, Factor, Factorization, QuantizedMatrix, SparseQuantizedMatrix


def kept_per_column(rows: int, sparsity: float) -> int:
    """Entries kept per column: ``max(1, ceil((1 - sparsity) * rows))``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return max(1, min(rows, math.ceil((1.0 - sparsity) * rows - 1e-9)))


class ColumnProjector:
    """Projection of a factor onto {top-``keep`` entries per column} ∩ {quantization grid}.

    ``P(x)`` keeps the ``keep`` largest-magnitude entries of every column, then rounds them with
    the block grid of their stored sequence (blocks of ``block_size`` consecutive stored entries,
    min/max scales in stored precision); ``bits=None`` rounds them to ``value_dtype`` instead.
    """

    def __init__(self, rows: int, keep: int, bits: Optional[int], block_size: int,
                 symmetric: bool, scale_dtype: str, value_dtype: str):
        if bits is not None:
            check_bits(bits)
        self.rows, self.keep, self.bits = rows, keep, bits
        self.block_size, self.symmetric = block_size, symmetric
        self.scale_dtype, self.value_dtype = scale_dtype, value_dtype

    def _support(self, x: np.ndarray) -> Optional[np.ndarray]:
        if self.keep >= self.rows:
            return None
        idx = np.argpartition(-np.abs(x), self.keep - 1, axis=0)[:self.keep]
        return np.sort(idx, axis=0)

    def _round(self, vals: np.ndarray):
        if self.bits is None:
            return vals.astype(self.value_dtype).astype(np.float32), None, None, None
        k, cols = vals.shape
        bs = self.block_size
        kb = (k + bs - 1) // bs
        padded = np.zeros((kb * bs, cols), np.float32)
        padded[:k] = vals
        blocks = padded.reshape(kb, bs, cols)
        s, z = scales_from_range(blocks.min(axis=1), blocks.max(axis=1), self.bits,
                                 self.symmetric, self.scale_dtype)
        qmin, qmax = code_range(self.bits, self.symmetric)
        st = np.repeat(s, bs, axis=0)[:k]
        c = np.round(vals / st)
        if z is not None:
            zt = np.repeat(z.astype(np.float32), bs, axis=0)[:k]
            c = np.clip(c + zt, qmin, qmax)
            deq = (c - zt) * st
        else:
            c = np.clip(c, qmin, qmax)
            deq = c * st
        return deq.astype(np.float32), c, s, z

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``P(x)`` as a dense array."""
        idx = self._support(x)
        if idx is None:
            return self._round(x)[0]
        out = np.zeros_like(x)
        np.put_along_axis(out, idx, self._round(np.take_along_axis(x, idx, axis=0))[0], axis=0)
        return out

    def factor(self, x: np.ndarray, dense_dtype: str) -> Factor:
        """The stored form of ``P(x)``: dense/quantized when every entry is kept, else sparse."""
        idx = self._support(x)
        vals = x if idx is None else np.take_along_axis(x, idx, axis=0)
        deq, c, s, z = self._round(vals)
        code_type = np.int8 if self.symmetric else np.uint8
        if idx is None:
            if self.bits is None:
                return DenseMatrix(values=deq.astype(dense_dtype).astype(np.float32), dtype=dense_dtype)
            return QuantizedMatrix(codes=c.astype(code_type), scales=s, zero_points=z,
                                   bits=self.bits, block_size=self.block_size,
                                   scale_dtype=self.scale_dtype)
        m = SparseQuantizedMatrix(shape=(self.rows, int(x.shape[1])), indices=idx,
                                  codes=deq if self.bits is None else c.astype(code_type),
                                  scales=s, zero_points=z, bits=self.bits,
                                  block_size=self.block_size, scale_dtype=self.scale_dtype,
                                  value_dtype=self.value_dtype)
        m.indices = idx.astype(m.index_dtype)
        return m


def varimax_rotation(F: np.ndarray, iters: int = 50, tol: float = 1e-6) -> np.ndarray:
    """Orthogonal ``T (r × r)`` maximizing the varimax criterion of ``F T`` (``F`` is ``p × r``):
    ``sum_j [ mean_i (F T)_ij⁴ - (mean_i (F T)_ij²)² ]``, by Kaiser's SVD iteration
    ``T ← U Vᵀ`` with ``U S Vᵀ = Fᵀ (G³ - G diag(mean_i G_ij²))``, ``G = F T``.

    High varimax concentrates each column's energy on few entries, so a top-k projection of the
    rotated factor loses little: ``L R = (L T)(Tᵀ R)`` for any orthogonal ``T``.
    """
    F = np.asarray(F, np.float64)
    p, r = F.shape
    T = np.eye(r)
    prev = 0.0
    for _ in range(iters):
        G = F @ T
        U, S, Vt = np.linalg.svd(F.T @ (G ** 3 - G * (np.sum(G ** 2, axis=0) / p)))
        T = U @ Vt
        cur = float(S.sum())
        if cur <= prev * (1.0 + tol):
            break
        prev = cur
    return T


def _pair(v):
    return (v, v) if not isinstance(v, (tuple, list)) else (v[0], v[1])


def qsd_factorize(W: np.ndarray, H: Optional[np.ndarray], rank: int, bits: Optional[int],
                  block_size: int, sparsity: Union[float, tuple[float, float]] = 0.0,
                  iters: int = 300, lr: float = 1e-2, symmetric: bool = True,
                  scale_dtype: str = "float16", dense_dtype: str = "float16",
                  init: str = "svd", seed: int = 0, damp: float = 1e-6,
                  prune_fraction: float = 0.25) -> Factorization:
    """Projected (straight-through) gradient descent for
    ``min_{L, R} ||Cᵀ (W - P_L(L) P_R(R))||_F²`` with ``C Cᵀ = H + λI`` (``H = None``: ``C = I``).

    Float shadow factors ``L, R`` are kept; every step evaluates the loss at the projected
    factors ``P(L), P(R)`` (:class:`ColumnProjector`: top-k per column, then the quantization
    grid) and applies the gradient with respect to the projected factors to the shadows (Adam,
    step ``lr`` relative to the RMS of each initial factor).  ``init="svd"`` starts from the
    H-weighted truncated SVD ``(C⁻ᵀ U_r √S_r, √S_r V_rᵀ)``, rotated by
    :func:`varimax_rotation` when a factor is sparse; ``init="random"`` from small Gaussian
    factors (seeded).  Sparsity is reached gradually over the first ``prune_fraction`` of the
    steps; the projected iterate at the target sparsity with the lowest loss is returned.

    The result is never worse than the projection of the initial factors.

    ``bits`` and ``sparsity`` (fraction of zeros per column) may be pairs ``(left, right)``;
    ``bits=None`` keeps stored entries at ``dense_dtype``.  ``info["error"]`` is
    ``tr((W - Ŵ)ᵀ H (W - Ŵ))`` with the undamped H (``||W - Ŵ||_F²`` when H is None).
    """
    if init not in ("svd", "random"):
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    K, N = W.shape
    if not 1 <= rank <= min(K, N):
        raise ValueError(f"rank must be in [1, {min(K, N)}], got {rank}")
    bits_l, bits_r = _pair(bits)
    sp_l, sp_r = _pair(sparsity)
    dev = device()
    proj_l = ColumnProjector(K, kept_per_column(K, sp_l), bits_l, block_size, symmetric,
                             scale_dtype, dense_dtype)
    proj_r = ColumnProjector(rank, kept_per_column(rank, sp_r), bits_r, block_size, symmetric,
                             scale_dtype, dense_dtype)

    Wt = to_torch(W, dev, torch.float64)
    C = None
    if H is not None:
        if H.shape != (K, K):
            raise ValueError(f"H must be ({K}, {K}), got {H.shape}")
        C = cholesky_lower(to_torch(H, dev, torch.float64), damp)
        Mt = C.T @ Wt
    else:
        Mt = Wt

    if init == "svd":
        U, S, Vt = top_svd(Mt, rank)
        r = torch.sqrt(S)
        A = U * r
        L0 = to_numpy(A if C is None else torch.linalg.solve_triangular(C.T, A, upper=True))
        R0 = to_numpy(r[:, None] * Vt)
        if kept_per_column(K, sp_l) < K or kept_per_column(rank, sp_r) < rank:
            # Any orthogonal T keeps L0 R0; rotate a sparse factor (L when both are) towards
            # few large entries per column.
            if kept_per_column(K, sp_l) < K:
                T = varimax_rotation(L0).astype(np.float32)
            else:
                T = varimax_rotation(R0.T).astype(np.float32)
            L0, R0 = L0 @ T, T.T @ R0
    else:
        rng = np.random.default_rng(int(seed))
        # Entries of L0 R0 start at std(M) / (K N)^(1/4): small, with both factors balanced.
        scale = float(Mt.std()) ** 0.5 / rank ** 0.25
        L0 = (rng.standard_normal((K, rank)) * scale / K ** 0.25).astype(np.float32)
        R0 = (rng.standard_normal((rank, N)) * scale / N ** 0.25).astype(np.float32)

    # The descent loop runs in numpy float32: many small steps, where numpy's single-threaded
    # elementwise kernels beat dispatching each one to a thread pool on a shared CPU.  With
    # Hd = C Cᵀ the loss expands to tr(WᵀHdW) - 2<R, LᵀHdW> + <R, (LᵀHdL) R>, so a step costs one
    # K²r product (Hd L) instead of the K²r + K²N of forming the weighted residual.
    Hd = None if C is None else to_numpy(C @ C.T)
    HW = W if Hd is None else to_numpy(C @ Mt)
    base = float(np.sum(W.astype(np.float64) * HW))
    norm = max(base, 1e-30)

    def loss_parts(Lp: np.ndarray, Rp: np.ndarray):
        HL = Lp if Hd is None else Hd @ Lp
        G = Lp.T @ HL
        B = HL.T @ W
        GR = G @ Rp
        val = (base - 2.0 * float(np.sum(Rp * B, dtype=np.float64))
               + float(np.sum(Rp * GR, dtype=np.float64))) / norm
        return max(val, 0.0), HL, B, GR

    def loss_of(Lp: np.ndarray, Rp: np.ndarray) -> float:
        return loss_parts(Lp, Rp)[0]

    # Gradual pruning: the kept count falls from all entries to the target over the first
    # ``prune_fraction`` of the steps (cubic schedule), so the support can settle while the
    # factors still carry most of the signal; only iterates at the target count are eligible.
    targets = (proj_l.keep, proj_r.keep)
    ramp = max(1, int(prune_fraction * iters))

    def schedule(step: int) -> None:
        frac = min(1.0, step / ramp) if prune_fraction > 0 else 1.0
        shrink = 1.0 - (1.0 - frac) ** 3
        proj_l.keep = K - int(round((K - targets[0]) * shrink))
        proj_r.keep = rank - int(round((rank - targets[1]) * shrink))

    L, R = L0.copy(), R0.copy()
    rms = lambda a: max(float(np.sqrt(np.mean(a.astype(np.float64) ** 2))), 1e-12)  # noqa: E731
    step_l, step_r = lr * rms(L0), lr * rms(R0)
    b1, b2, eps = 0.9, 0.999, 1e-8
    mL, vL = np.zeros_like(L), np.zeros_like(L)
    mR, vR = np.zeros_like(R), np.zeros_like(R)

    losses: list[float] = []
    best_loss, best = loss_of(proj_l(L0), proj_r(R0)), (L0, R0)
    for step in range(max(0, iters)):
        schedule(step)
        at_target = (proj_l.keep, proj_r.keep) == targets
        Lp, Rp = proj_l(L), proj_r(R)
        val, HL, B, GR = loss_parts(Lp, Rp)
        losses.append(val)
        if at_target and val < best_loss:
            best_loss, best = val, (L.copy(), R.copy())
        # Straight-through: gradients at the projected factors update the float shadows.
        # dloss/dR = 2 (LᵀHdL R - LᵀHdW),  dloss/dL = 2 (HdL R Rᵀ - HdW Rᵀ).
        gR = (2.0 / norm) * (GR - B)
        gL = (2.0 / norm) * (HL @ (Rp @ Rp.T) - HW @ Rp.T)
        t = step + 1
        for P, g, m, v, lr_p in ((L, gL, mL, vL, step_l), (R, gR, mR, vR, step_r)):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            P -= (lr_p * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)).astype(np.float32)
    proj_l.keep, proj_r.keep = targets
    val = loss_of(proj_l(L), proj_r(R))
    if val < best_loss:
        best_loss, best = val, (L, R)
    losses.append(val)

    left = proj_l.factor(best[0], dense_dtype)
    right = proj_r.factor(best[1], dense_dtype)
    What = left.dequantize() @ right.dequantize()
    E64 = torch.from_numpy(W - What).double()
    if H is not None:
        err = float((E64 * (to_torch(H, torch.device("cpu"), torch.float64) @ E64)).sum())
    else:
        err = float((E64 * E64).sum())
    return Factorization(method="qsd", shape=(K, N), left=left, right=right,
                         info={"error": err, "losses": losses, "rank": rank, "bits": (bits_l, bits_r),
                               "sparsity": (sp_l, sp_r), "iters": iters})
