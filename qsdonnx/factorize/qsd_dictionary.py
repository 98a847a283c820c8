"""QSD on sub-vectors: the weight cut into short vectors, factorized as a dictionary times a
sparse quantized code matrix (Kuzmin et al., arXiv 2207.11048, the vector-quantization end of
their decomposition).

``W (K, N)`` (used as ``X @ W``) is first divided by its column RMS ``s`` (one stored scale per
column), then cut into vectors of ``dim`` consecutive rows of one column, the columns of
``V (dim, M)``, ``M = K·N / dim``.  QSD factorizes ``V ≈ D·A``:

- ``D (dim, atoms)``: a dense dictionary, stored in the scale dtype;
- ``A (atoms, M)``: ``keep`` stored entries per column, each an atom index and a signed
  ``coef_bits``-bit integer coefficient (the quantization step is folded into ``D``).

With ``keep = 1`` a vector is ``c·D[:, j]``: a shape from the dictionary and an integer gain,
so a weight costs ``(log2(atoms) + coef_bits) / dim`` bits; with ``atoms = 1`` and ``dim = 1``
the form is scalar quantization with one scale per column, and with the coefficient fixed at 1
it is plain vector quantization.

The fit alternates the two projected steps of the calibration objective
``tr((W − Ŵ)ᵀ H (W − Ŵ))``:

1. codes for a fixed ``D``: the vectors are visited in row order with GPTQ's error feedback
   (``U`` the upper Cholesky factor of ``(H + λI)⁻¹``); a vector ``w`` takes the ``keep``
   (atom, integer coefficient) pairs that greedily minimize ``‖U_b⁻ᵀ (w − Σ c·D_j)‖²``, and the
   later rows absorb the error through ``U``'s rows;
2. the dictionary for fixed codes: the objective is quadratic in ``D``; conjugate gradients
   solve it (with the damped ``H``), and ``D`` is rounded to the scale dtype.

The returned codes and dictionary are those of the round with the lowest objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .gptq import upper_inverse_cholesky
from .linalg import round_to
from .types import Factorization, stream_nbytes
from .vq import weighted_kmeans

KMEANS_ITERS = 10
CG_ITERS = 30


def coef_range(coef_bits: int) -> tuple[int, int]:
    """Signed integer coefficients of ``coef_bits`` bits: ``[-2^(b-1), 2^(b-1) - 1]``."""
    return -(1 << (coef_bits - 1)), (1 << (coef_bits - 1)) - 1


def index_bits(atoms: int) -> int:
    """Bits of one atom index (``atoms`` is a power of two)."""
    return max(1, int(atoms - 1).bit_length())


def qsd_dictionary_nbytes(K: int, N: int, dim: int, atoms: int, coef_bits: int, keep: int = 1,
                          scale_dtype: str = "float16") -> int:
    """Index and coefficient streams, the dictionary and the column scales."""
    width = np.dtype(scale_dtype).itemsize
    n = keep * (K // dim) * N
    return (stream_nbytes(n, index_bits(atoms), N) + stream_nbytes(n, coef_bits, N)
            + atoms * dim * width + N * width)


def dictionary_applicable(K: int, N: int, dim: int, atoms: int) -> bool:
    """``K`` cuts into whole vectors and there are more vectors than atoms."""
    return K % dim == 0 and (K // dim) * N >= 4 * atoms


@dataclass
class DictionaryMatrix:
    """A ``(K, N)`` matrix stored as QSD sub-vector codes; see the module docstring."""

    index: np.ndarray  # (keep, K / dim, N) uint8 atom indices
    coefs: np.ndarray  # (keep, K / dim, N) int8 coefficients in coef_range(coef_bits)
    dictionary: np.ndarray  # (atoms, dim) float32, values exact in scale_dtype
    col_scales: np.ndarray  # (N,) float32, values exact in scale_dtype
    coef_bits: int
    scale_dtype: str = "float16"

    @property
    def dim(self) -> int:
        return int(self.dictionary.shape[1])

    @property
    def atoms(self) -> int:
        return int(self.dictionary.shape[0])

    @property
    def keep(self) -> int:
        return int(self.index.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.index.shape[1] * self.dim, self.index.shape[2])

    def vectors(self) -> np.ndarray:
        """``(K / dim, N, dim)``: each vector before the column scales."""
        d = self.dictionary[self.index.astype(np.int64)]  # (keep, P, N, dim)
        return (self.coefs.astype(np.float32)[..., None] * d).sum(axis=0)

    def dequantize(self) -> np.ndarray:
        P, N = self.index.shape[1:]
        rows = self.vectors().transpose(0, 2, 1).reshape(P * self.dim, N)
        return (rows * self.col_scales[None, :]).astype(np.float32)

    def nbytes(self) -> int:
        K, N = self.shape
        return qsd_dictionary_nbytes(K, N, self.dim, self.atoms, self.coef_bits, self.keep, self.scale_dtype)


def pursue(v: torch.Tensor, D: torch.Tensor, keep: int, coef_bits: int,
           chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pursuit of ``keep`` (atom, integer coefficient) pairs for each row of ``v``
    (``n × dim``) over the atoms ``D`` (``atoms × dim``): each step takes the pair that most
    lowers the squared residual.  Returns ``(keep, n)`` indices and coefficients."""
    cmin, cmax = coef_range(coef_bits)
    n = v.shape[0]
    idx = torch.empty(keep, n, dtype=torch.int64)
    cod = torch.empty(keep, n, dtype=v.dtype)
    dd = (D * D).sum(1).clamp_min(1e-30)
    for i in range(0, n, chunk):  # rows in cache-sized chunks
        res = v[i:i + chunk].clone()
        for t in range(keep):
            p = res @ D.T  # (rows, atoms)
            c = torch.round(p / dd).clamp_(cmin, cmax)
            gain = (2.0 * p).sub_(c * dd).mul_(c)  # decrease of the squared residual
            j = gain.argmax(1)
            cj = c.gather(1, j[:, None])[:, 0]
            idx[t, i:i + chunk], cod[t, i:i + chunk] = j, cj
            res -= cj[:, None] * D[j]
    return idx, cod


def qsd_dictionary(W: np.ndarray, H: Optional[np.ndarray], dim: int, atoms: int, coef_bits: int,
                   keep: int = 1, rounds: int = 4, damp: float = 0.1, scale_dtype: str = "float16",
                   seed: int = 0, feedback: bool = True) -> Factorization:
    """QSD sub-vector factorization of ``W (K, N)`` (see the module docstring).

    ``H`` (K × K) weights the objective; without it the plain Frobenius error is minimized.
    ``feedback=False`` is the planner's fast estimate: the k-means dictionary and codes by
    plain pursuit, one round, no dictionary fit.  ``info["objective"]`` lists the objective
    (relative to ``tr(WᵀHW)``) after each step."""
    if not 1 <= coef_bits <= 7:
        raise ValueError(f"coefficients take 1 to 7 bits, got {coef_bits}")
    if atoms < 1 or atoms & (atoms - 1) or atoms > 256:
        raise ValueError(f"atoms must be a power of two up to 256, got {atoms}")
    K, N = W.shape
    if not dictionary_applicable(K, N, dim, atoms):
        raise ValueError(f"a ({K}, {N}) weight does not cut into {dim}-row vectors for {atoms} atoms")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    dt = torch.float64
    Wt = torch.as_tensor(np.ascontiguousarray(W), dtype=dt)
    P, M = K // dim, (K // dim) * N
    s = round_to(Wt.pow(2).mean(0).sqrt(), scale_dtype)
    s = torch.where(s > 0, s, torch.ones_like(s))
    X0 = Wt / s
    Hd = torch.eye(K, dtype=dt) if H is None else torch.as_tensor(np.asarray(H), dtype=dt)
    hdiag = torch.diagonal(Hd)
    Hdamp = Hd + damp * float(hdiag.mean()) * torch.eye(K, dtype=dt)
    s2 = s * s

    def to_vectors(Y: torch.Tensor) -> torch.Tensor:  # (K, N) -> (M, dim)
        return Y.reshape(P, dim, N).permute(0, 2, 1).reshape(M, dim)

    def to_rows(v: torch.Tensor) -> torch.Tensor:  # (M, dim) -> (K, N)
        return v.reshape(P, N, dim).permute(0, 2, 1).reshape(K, N)

    def rebuild(D: torch.Tensor, idx: torch.Tensor, cod: torch.Tensor) -> torch.Tensor:
        return to_rows((cod[..., None] * D[idx]).sum(0))

    base = float((Wt * (Hd @ Wt)).sum())

    def objective(Xh: torch.Tensor) -> float:
        E = (X0 - Xh) * s
        return float((E * (Hd @ E)).sum()) / max(base, 1e-30)

    gen = torch.Generator().manual_seed(int(seed))
    vecs = to_vectors(X0)
    w = hdiag.reshape(P, dim).mean(1)[:, None].expand(-1, N).reshape(-1)
    C = weighted_kmeans(vecs.float(), w.float(), atoms, KMEANS_ITERS, gen).to(dt)
    # Centroids at half the coefficient range: larger and smaller gains stay reachable.
    D = round_to(C / max(1.0, coef_range(coef_bits)[1] / 2.0), scale_dtype)
    if not feedback:
        idx, cod = pursue(vecs, D, keep, coef_bits)
        return _result(W, D, idx, cod, s, coef_bits, scale_dtype, dim,
                       {"objective": [objective(rebuild(D, idx, cod))], "feedback": False})

    U = upper_inverse_cholesky(np.asarray(Hd.numpy()), damp).to("cpu", dt)
    history: list[float] = []
    best = None
    for _ in range(max(1, rounds)):
        # 1. codes for this dictionary, vector row by vector row, with error feedback
        X = X0.clone()
        idx = torch.empty(keep, P, N, dtype=torch.int64)
        cod = torch.empty(keep, P, N, dtype=dt)
        for p in range(P):
            b = slice(p * dim, (p + 1) * dim)
            Mb = torch.linalg.inv(U[b, b]).T  # cost of an error e: ‖Mb e‖²
            i_, c_ = pursue(X[b].T @ Mb.T, D @ Mb.T, keep, coef_bits)
            idx[:, p], cod[:, p] = i_, c_
            e = Mb @ (X[b] - (c_[..., None] * D[i_]).sum(0).T)
            X[(p + 1) * dim:] -= U[b, (p + 1) * dim:].T @ e
        idx, cod = idx.reshape(keep, M), cod.reshape(keep, M)
        history.append(objective(rebuild(D, idx, cod)))
        if best is None or history[-1] < best[0]:
            best = (history[-1], D, idx, cod)
        # 2. the dictionary for these codes: CG on the normal equations A(D) = B
        def normal(Dv: torch.Tensor, rhs: Optional[torch.Tensor] = None) -> torch.Tensor:
            g = to_vectors(Hdamp @ ((rebuild(Dv, idx, cod) if rhs is None else rhs) * s2))
            out = torch.zeros_like(Dv)
            for t in range(keep):
                out.index_add_(0, idx[t], cod[t][:, None] * g)
            return out

        B = normal(D, X0)
        x = D.clone()
        r = B - normal(x)
        d = r.clone()
        rs = float((r * r).sum())
        stop = 1e-20 * float((B * B).sum())
        for _ in range(CG_ITERS):
            if rs <= stop:
                break
            Ad = normal(d)
            a = rs / max(float((d * Ad).sum()), 1e-300)
            x = x + a * d
            r = r - a * Ad
            rn = float((r * r).sum())
            d = r + (rn / rs) * d
            rs = rn
        D = round_to(x, scale_dtype)
        history.append(objective(rebuild(D, idx, cod)))
        if history[-1] < best[0]:
            best = (history[-1], D, idx, cod)
    _, D, idx, cod = best
    return _result(W, D, idx, cod, s, coef_bits, scale_dtype, dim,
                   {"objective": history, "feedback": True, "rounds": rounds})


def _result(W, D, idx, cod, s, coef_bits, scale_dtype, dim, info) -> Factorization:
    K, N = W.shape
    P = K // dim
    keep = idx.shape[0]
    m = DictionaryMatrix(index=idx.reshape(keep, P, N).numpy().astype(np.uint8),
                         coefs=cod.reshape(keep, P, N).numpy().astype(np.int8),
                         dictionary=D.numpy().astype(np.float32), col_scales=s.numpy().astype(np.float32),
                         coef_bits=coef_bits, scale_dtype=scale_dtype)
    info = dict(info, dim=dim, atoms=m.atoms, coef_bits=coef_bits, keep=keep)
    return Factorization(method="qsd", shape=(K, N), q=m, info=info)
