"""Trellis-coded lookup tables (bitshift trellis, after Tseng et al., "QTIP: Quantization with
Trellises and Incoherence Processing", arXiv 2406.11235), with the worst-fitted rows exact.

A table of ``V`` rows of width ``D`` (held as the ``(D, V)`` matrix of the embedding view: one
column per row of the table) is stored as

* ``symbols[v, t]``: a ``k``-bit symbol per value (packed ``8 / k`` to a byte);
* ``lut``: ``2^L`` values in the scale dtype (``L = k · window``);
* ``scales[v]``: the row's RMS, in the scale dtype;
* ``exact_rows`` / ``exact_values``: a few rows stored as they are, in the scale dtype.

Value ``t`` of row ``v`` is ``scales[v] · lut[state_t]`` with the state the last ``window``
symbols read as one number, ``state_t = Σ_i symbols[v, t − i] · 2^(k·i)`` (symbols before the
row's start are 0): each new symbol shifts ``k`` fresh bits into an ``L``-bit register.  A value
costs ``k`` bits, but consecutive values share ``L − k`` bits of state, so the codes of a row
form a path through a trellis of ``2^L`` states and the best path is found by the Viterbi
algorithm; the values reachable from one state tile the plane of consecutive values more
finely than a ``2^k``-level scalar grid.  The lookup table is fitted by alternating Viterbi
coding and centroid updates (Lloyd steps over the states) on a sample of rows.

One lookup table serves every row, so rows unlike the rest (in a word-embedding table: the
frequent tokens' rows, which the model reads in every input) are coded worst; the rows with
the largest relative error, one row in ``EXACT_EVERY``, are stored exactly instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import pack_bits
from .linalg import device, round_to, to_numpy, to_torch
from .types import Factorization

TRELLIS_BITS = 2  # bits per value (symbol width k)
TRELLIS_WINDOW = 5  # symbols in the state: L = 10 bits, 1024 states
LUT_ITERS = 6
LUT_TRAIN_ROWS = 512
EXACT_EVERY = 1024  # one exact row per this many rows
MIN_ROWS = 2048  # fewer rows: the lookup table and exact rows do not pay


@dataclass
class TrellisTable:
    """A ``(D, V)`` table stored as trellis codes; see the module docstring."""

    symbols: np.ndarray  # (V, D) uint8, each < 2^bits
    lut: np.ndarray  # (2^(bits·window),) float32 values exact in scale_dtype
    scales: np.ndarray  # (V,) float32 values exact in scale_dtype
    exact_rows: np.ndarray  # (E,) int64 row numbers
    exact_values: np.ndarray  # (E, D) float32 values exact in scale_dtype
    bits: int = TRELLIS_BITS
    window: int = TRELLIS_WINDOW
    scale_dtype: str = "float16"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.symbols.shape[1], self.symbols.shape[0])

    def states(self) -> np.ndarray:
        """``(V, D)`` trellis states of every value (see the module docstring)."""
        s = self.symbols.astype(np.int64)
        out = np.zeros_like(s)
        for i in range(self.window):
            out[:, i:] += s[:, :s.shape[1] - i] << (self.bits * i)
        return out

    def rows(self) -> np.ndarray:
        """The rebuilt table as ``(V, D)`` rows."""
        out = self.lut[self.states()] * self.scales[:, None]
        out[self.exact_rows] = self.exact_values
        return out.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        return self.rows().T

    def packed_symbols(self) -> np.ndarray:
        """``(V, D·bits/8)`` bytes, ``8 / bits`` symbols to a byte (lowest bits first)."""
        return pack_bits(self.symbols, self.bits)

    def nbytes(self) -> int:
        D, V = self.shape
        return trellis_nbytes(D, V, self.bits, self.window, len(self.exact_rows), self.scale_dtype)


def exact_count(V: int) -> int:
    return V // EXACT_EVERY


def trellis_applicable(D: int, V: int, bits: int = TRELLIS_BITS) -> bool:
    """Whole bytes of symbols per row, and enough rows for one shared lookup table to pay."""
    return (D * bits) % 8 == 0 and V >= MIN_ROWS


def trellis_nbytes(D: int, V: int, bits: int = TRELLIS_BITS, window: int = TRELLIS_WINDOW,
                   exact: int | None = None, scale_dtype: str = "float16") -> int:
    """Symbols, lookup table, row scales, and the exact rows (values and int64 row numbers)."""
    width = np.dtype(scale_dtype).itemsize
    e = exact_count(V) if exact is None else exact
    return V * D * bits // 8 + (1 << (bits * window)) * width + V * width + e * (D * width + 8)


def viterbi(x: torch.Tensor, lut: torch.Tensor, bits: int, window: int) -> torch.Tensor:
    """The state sequence of least squared error ``Σ_t (x[:, t] − lut[state_t])²`` for each row
    of ``x (B, T)``, over sequences with ``state_t = ((state_{t−1} << bits) | symbol_t) mod 2^L``
    starting from state 0.  Returns ``(B, T)`` int64 states.

    The states that can precede ``s`` are those whose low ``L − bits`` bits equal ``s >> bits``:
    viewing the costs as ``(2^bits, 2^(L − bits))`` (high symbol × shared prefix), the best
    predecessor of every prefix is one minimum over the first axis."""
    B, T = x.shape
    L = bits * window
    S, P = 1 << L, 1 << bits
    R = S // P
    cost = torch.full((B, S), float("inf"), dtype=x.dtype, device=x.device)
    cost[:, :P] = (x[:, :1] - lut[None, :P]) ** 2
    back = torch.empty((T, B, R), dtype=torch.uint8, device=x.device)
    for t in range(1, T):
        best, arg = cost.view(B, P, R).min(1)
        back[t] = arg
        # state s = prefix · 2^bits + symbol, with prefix = s >> bits
        cost = (x[:, t:t + 1] - lut[None, :]).square_().view(B, R, P).add_(best[:, :, None]).view(B, S)
    s = cost.argmin(1)
    states = torch.empty((B, T), dtype=torch.int64, device=x.device)
    rows = torch.arange(B, device=x.device)
    for t in range(T - 1, -1, -1):
        states[:, t] = s
        if t:
            high = back[t, rows, s >> bits].long()
            s = (s >> bits) | (high << (L - bits))
    return states


def _code(x: torch.Tensor, lut: torch.Tensor, bits: int, window: int) -> torch.Tensor:
    """:func:`viterbi` over chunks of rows, each holding at most 64 MiB of back pointers on the
    CPU (chunks of 16–256 rows), 1 GiB on a GPU (whose many cores want many rows at once)."""
    per_row = x.shape[1] << (bits * (window - 1))
    if x.device.type == "cpu":
        chunk = max(16, min(256, (64 << 20) // per_row))
    else:
        chunk = max(16, (1 << 30) // per_row)
    return torch.cat([viterbi(x[i:i + chunk], lut, bits, window) for i in range(0, x.shape[0], chunk)])


def fit_lut(x: torch.Tensor, bits: int, window: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lookup table for the rows ``x (B, T)``: starts from the ``2^L`` quantiles of a normal
    distribution of ``x``'s RMS in a random order; each step codes the rows (Viterbi) and moves
    every used entry to the mean of the values coded to it, so the squared error never rises."""
    S = 1 << (bits * window)
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(S, dtype=torch.float64) + 0.5) / S)
    lut = (q[torch.randperm(S, generator=gen)].to(x.device) * x.pow(2).mean().sqrt()).to(x.dtype)
    for _ in range(iters):
        st = _code(x, lut, bits, window).reshape(-1)
        n = torch.zeros(S, dtype=x.dtype, device=x.device).index_add_(0, st, torch.ones_like(x).reshape(-1))
        total = torch.zeros(S, dtype=x.dtype, device=x.device).index_add_(0, st, x.reshape(-1))
        lut = torch.where(n > 0, total / n.clamp_min(1), lut)
    return lut



def trellis_quantize(W: np.ndarray, bits: int = TRELLIS_BITS, window: int = TRELLIS_WINDOW,
                     scale_dtype: str = "float16", seed: int = 0, iters: int = LUT_ITERS,
                     train_rows: int = LUT_TRAIN_ROWS, exact: int | None = None) -> TrellisTable:
    """Trellis-code the columns of ``W (D, V)`` (see the module docstring); ``exact`` rows (by
    default one in ``EXACT_EVERY``) with the largest relative error are kept as they are."""
    D, V = W.shape
    if (D * bits) % 8:
        raise ValueError(f"rows of {D} {bits}-bit symbols do not fill whole bytes")
    rows = to_torch(W.T, device())  # (V, D), on the GPU when there is one
    scales = round_to(rows.pow(2).mean(1).sqrt(), scale_dtype)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    x = rows / scales[:, None]
    gen = torch.Generator().manual_seed(seed)
    train = torch.randperm(V, generator=gen)[:min(V, train_rows)].sort().values.to(rows.device)
    lut = round_to(fit_lut(x[train], bits, window, iters, gen), scale_dtype)
    states = _code(x, lut, bits, window)
    rebuilt = lut[states] * scales[:, None]
    e = exact_count(V) if exact is None else min(exact, V)
    rel = (rebuilt - rows).norm(dim=1) / rows.norm(dim=1).clamp_min(1e-30)
    worst = torch.argsort(rel, descending=True, stable=True)[:e].sort().values
    return TrellisTable(symbols=(states & ((1 << bits) - 1)).cpu().numpy().astype(np.uint8),
                        lut=to_numpy(lut), scales=to_numpy(scales),
                        exact_rows=worst.cpu().numpy().astype(np.int64),
                        exact_values=to_numpy(round_to(rows[worst], scale_dtype)),
                        bits=bits, window=window, scale_dtype=scale_dtype)


def trellis_factorize(W: np.ndarray, scale_dtype: str = "float16", seed: int = 0) -> Factorization:
    """:func:`trellis_quantize` as a :class:`Factorization` with ``method="trellis"``."""
    q = trellis_quantize(W, scale_dtype=scale_dtype, seed=seed)
    return Factorization(method="trellis", shape=tuple(W.shape), q=q,
                         info={"bits": q.bits, "states": 1 << (q.bits * q.window), "exact_rows": len(q.exact_rows)})
