"""Trellis-coded tables: Viterbi finds the best path, the lookup-table fit never raises the
error, the stored form rebuilds what was coded, and it beats 2-bit product codes per byte."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from qsdonnx.factorize.pq import pq_quantize
from qsdonnx.factorize.trellis import (TrellisTable, exact_count, fit_lut, trellis_nbytes, trellis_quantize,
                                       viterbi)


def _path_cost(x, lut, symbols, bits, window):
    L = bits * window
    s, cost = 0, 0.0
    for t, sym in enumerate(symbols):
        s = ((s << bits) | sym) & ((1 << L) - 1)
        cost += (x[t] - lut[s]) ** 2
    return cost


def test_viterbi_matches_brute_force_on_a_small_trellis():
    rng = np.random.default_rng(0)
    bits, window, T = 1, 3, 8  # 8 states, 2^8 paths
    for trial in range(5):
        x = rng.normal(size=(1, T))
        lut = rng.normal(size=1 << (bits * window))
        best = min(_path_cost(x[0], lut, p, bits, window) for p in itertools.product(range(2), repeat=T))
        st = viterbi(torch.tensor(x), torch.tensor(lut), bits, window)[0].numpy()
        got = float(np.sum((x[0] - lut[st]) ** 2))
        assert got == pytest.approx(best, rel=1e-12)
        # the states form a valid path: each shifts one fresh symbol into the previous
        prev = np.concatenate([[0], st[:-1]])
        assert np.all((st >> bits) == (prev & ((1 << (bits * (window - 1))) - 1)))


def test_lut_fit_never_raises_the_error_and_beats_its_start():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.standard_t(5, size=(64, 96)), dtype=torch.float32)
    errs = []
    for iters in range(4):
        lut = fit_lut(x, 2, 4, iters, torch.Generator().manual_seed(0))
        st = viterbi(x, lut, 2, 4)
        errs.append(float(((x - lut[st]) ** 2).sum()))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 0.8 * errs[0]


def _table(V=4096, D=64, seed=0):
    rng = np.random.default_rng(seed)
    # Gaussian rows of different norms, and 8 atypical rows: one large value each
    rows = rng.normal(size=(V, D)) * rng.uniform(0.5, 2.0, size=(V, 1))
    rows[np.arange(8), rng.integers(0, D, 8)] = 40.0
    return rows.T.astype(np.float32)  # (D, V)


def test_stored_table_rebuilds_its_codes_and_keeps_the_worst_rows_exact():
    W = _table()
    t = trellis_quantize(W, train_rows=256)
    D, V = W.shape
    assert t.shape == (D, V) and t.symbols.max() < 4 and len(t.exact_rows) == exact_count(V) == 4
    # every stored value is representable in float16
    for a in (t.lut, t.scales, t.exact_values):
        assert np.array_equal(a, a.astype(np.float16).astype(np.float32))
    R = t.rows()
    assert np.array_equal(R[t.exact_rows], W.T[t.exact_rows].astype(np.float16).astype(np.float32))
    # the worst-fitted rows are the atypical ones planted in the first rows
    assert set(t.exact_rows.tolist()) <= set(range(8))
    # the other rows are lut[state] · scale, states rebuilt from the symbols alone
    others = np.setdiff1d(np.arange(V), t.exact_rows)
    assert np.allclose(R[others], (t.lut[t.states()] * t.scales[:, None])[others])
    packed = t.packed_symbols()
    assert packed.shape == (V, D // 4) and packed.dtype == np.uint8
    assert t.nbytes() == trellis_nbytes(D, V) == V * D // 4 + 1024 * 2 + V * 2 + 4 * (D * 2 + 8)


def test_beats_every_scalar_two_bit_grid_and_product_codes_on_gaussian_rows():
    W = _table(V=8192, D=128, seed=2)
    t = trellis_quantize(W, train_rows=512)
    p = pq_quantize(W, 4)
    assert t.nbytes() < p.nbytes()
    rel2 = lambda A: (np.linalg.norm(A - W, axis=0) / np.linalg.norm(W, axis=0)) ** 2
    typical = np.arange(8, W.shape[1])
    got = float(np.mean(rel2(t.dequantize())[typical]))
    # 0.1175: squared error of the best 4-level scalar quantizer of a unit Gaussian (Lloyd-Max);
    # 0.0625: the rate-distortion bound at 2 bits
    assert 0.0625 < got < 0.09
    assert got < 0.95 * float(np.mean(rel2(p.dequantize())[typical]))


def test_rejects_rows_that_do_not_fill_bytes():
    with pytest.raises(ValueError, match="whole bytes"):
        trellis_quantize(np.ones((6, 2048), np.float32))
