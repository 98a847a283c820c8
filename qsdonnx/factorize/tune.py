"""The continuous parameters of a factorization, as torch tensors that can be trained.

A factorization's codes (integer grid codes, codebook indices, sparse positions, visiting
orders) are fixed once chosen; what stays continuous is stored in float form and costs the
same bytes whatever its value: block scales, column scales, codebook entries, dictionary
atoms, unquantized factor and sparse values.  :class:`TunableFactorization` rebuilds ``Ŵ``
from those as a differentiable function, so that they can be fitted to the model's end-to-end output (the
final stage of AQLM, Egiazarian et al., arXiv 2401.06118, and of QuIP#, Tseng et al.,
arXiv 2402.04396, which fine-tune codebooks and scales with the codes frozen), and writes the
fitted values back into a factorization of exactly the same size.

Each parameter is trained as a relative change: a scale as ``s₀·(1 + δ)``, a value as
``v₀ + δ·rms(v₀)``, with ``δ`` starting at zero, so one step size suits every tensor.
Product-quantized and trellis-coded tables (:class:`~.pq.ProductQuantizedMatrix`,
:class:`~.trellis.TrellisTable`) are left as they are: most of their rows never occur in a
calibration set, and their shared codebooks or lookup table would be fitted to the few that do.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np
import torch

from .types import DenseMatrix, Factorization, QuantizedMatrix, SparseMatrix, SparseQuantizedMatrix
from .qsd_dictionary import DictionaryMatrix
from .vq import VectorQuantizedMatrix


def _rms(a: np.ndarray) -> float:
    r = float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) if a.size else 0.0
    return r if r > 0 else 1.0


class Relative:
    """``base·(1 + δ)`` (``kind="scale"``) or ``base + δ·rms(base)`` (``kind="value"``)."""

    def __init__(self, base: np.ndarray, kind: str):
        self.base = torch.from_numpy(np.array(base, dtype=np.float32))
        self.kind = kind
        self.unit = 1.0 if kind == "scale" else _rms(base)
        self.delta = torch.zeros_like(self.base, requires_grad=True)

    def value(self) -> torch.Tensor:
        if self.kind == "scale":
            return self.base * (1.0 + self.delta)
        return self.base + self.delta * self.unit

    def result(self, dtype: str) -> np.ndarray:
        """The trained value, rounded to the type it is stored in (returned as float32)."""
        with torch.no_grad():
            return self.value().numpy().astype(dtype).astype(np.float32)


def _grid_part(m: QuantizedMatrix):
    K = m.codes.shape[0]
    c = m.codes.astype(np.float32)
    if m.zero_points is not None:
        c = c - np.repeat(m.zero_points.astype(np.float32), m.block_size, axis=0)[:K]
    codes = torch.from_numpy(c)
    s = Relative(m.stored_scales(), "scale")

    def weight() -> torch.Tensor:
        return codes * torch.repeat_interleave(s.value(), m.block_size, dim=0)[:K]

    def result() -> QuantizedMatrix:
        return replace(m, scales=s.result(m.scale_dtype))

    return [s.delta], weight, result


def _vq_part(m: VectorQuantizedMatrix):
    P, N = m.codes.shape
    pg = m.group_rows // m.dim
    g = torch.from_numpy(np.arange(P) // pg)[:, None]
    codes = torch.from_numpy(m.codes.astype(np.int64))
    inverse = torch.from_numpy(np.argsort(m.order))
    books = Relative(m.codebooks, "value")
    cols = Relative(m.col_scales, "scale")

    def weight() -> torch.Tensor:
        vec = books.value()[g, codes]  # (P, N, dim)
        visited = vec.permute(0, 2, 1).reshape(P * m.dim, N) * cols.value()[None, :]
        return visited[inverse]

    def result() -> VectorQuantizedMatrix:
        return replace(m, codebooks=books.result(m.scale_dtype), col_scales=cols.result(m.scale_dtype))

    return [books.delta, cols.delta], weight, result


def _dictionary_part(m: DictionaryMatrix):
    keep, P, N = m.index.shape
    index = torch.from_numpy(m.index.astype(np.int64))
    coefs = torch.from_numpy(m.coefs.astype(np.float32))[..., None]
    atoms = Relative(m.dictionary, "value")
    cols = Relative(m.col_scales, "scale")

    def weight() -> torch.Tensor:
        vec = (coefs * atoms.value()[index]).sum(0)  # (P, N, dim)
        return vec.permute(0, 2, 1).reshape(P * m.dim, N) * cols.value()[None, :]

    def result() -> DictionaryMatrix:
        return replace(m, dictionary=atoms.result(m.scale_dtype), col_scales=cols.result(m.scale_dtype))

    return [atoms.delta, cols.delta], weight, result


def _dense_part(m: DenseMatrix):
    v = Relative(m.dequantize(), "value")
    return [v.delta], v.value, lambda: replace(m, values=v.result(m.dtype))


def _sparse_factor_part(m: SparseQuantizedMatrix):
    idx = torch.from_numpy(m.indices.astype(np.int64))
    cols = torch.arange(m.shape[1])[None, :].expand_as(idx)
    if m.bits is None:
        vals = Relative(m.values(), "value")
        values, params = vals.value, [vals.delta]
        result = lambda: replace(m, codes=vals.result(m.value_dtype))
    else:
        grid = QuantizedMatrix(codes=m.codes, scales=m.scales, zero_points=m.zero_points, bits=m.bits,
                               block_size=m.block_size, scale_dtype=m.scale_dtype)
        params, values, res = _grid_part(grid)
        result = lambda: replace(m, scales=res().scales)

    def weight() -> torch.Tensor:
        return torch.zeros(m.shape).index_put((idx, cols), values())

    return params, weight, result


def _sparse_part(m: SparseMatrix):
    rows = torch.from_numpy(m.rows.astype(np.int64))
    cols = torch.from_numpy(m.cols.astype(np.int64))
    vals = Relative(m.values.astype(m.value_dtype).astype(np.float32), "value")

    def weight() -> torch.Tensor:
        return torch.zeros(m.shape).index_put((rows, cols), vals.value(), accumulate=True)

    return [vals.delta], weight, lambda: replace(m, values=vals.result(m.value_dtype))


_PARTS: dict[type, Callable] = {QuantizedMatrix: _grid_part, VectorQuantizedMatrix: _vq_part,
                                DictionaryMatrix: _dictionary_part,
                                DenseMatrix: _dense_part, SparseQuantizedMatrix: _sparse_factor_part,
                                SparseMatrix: _sparse_part}


def tunable(f: Factorization) -> Optional["TunableFactorization"]:
    """A :class:`TunableFactorization` of ``f``, or None when some part has no trainable form."""
    parts = [p for p in (f.q, f.left, f.right, f.sparse) if p is not None]
    if not parts or any(type(p) not in _PARTS for p in parts):
        return None
    return TunableFactorization(f)


class TunableFactorization:
    """``Ŵ = q + left·right + sparse`` as a torch function of the continuous parameters."""

    def __init__(self, f: Factorization):
        self.f = f
        self.parts = {k: _PARTS[type(getattr(f, k))](getattr(f, k))
                      for k in ("q", "left", "right", "sparse") if getattr(f, k) is not None}

    def parameters(self) -> list[torch.Tensor]:
        return [p for params, _, _ in self.parts.values() for p in params]

    def weight(self) -> torch.Tensor:
        """``Ŵ`` as a ``(K, N)`` float32 tensor."""
        w = {k: fn() for k, (_, fn, _) in self.parts.items()}
        out = torch.zeros(self.f.shape)
        if "q" in w:
            out = out + w["q"]
        if "left" in w and "right" in w:
            out = out + w["left"] @ w["right"]
        if "sparse" in w:
            out = out + w["sparse"]
        return out

    def result(self) -> Factorization:
        """A factorization with the trained values, stored as before (same codes, same bytes)."""
        return replace(self.f, **{k: res() for k, (_, _, res) in self.parts.items()},
                       info=dict(self.f.info, tuned=True))
