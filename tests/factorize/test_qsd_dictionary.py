"""QSD on sub-vectors (qsdonnx.factorize.qsd_dictionary): a dictionary times a sparse quantized
code matrix, fitted to the calibration-weighted error."""
from __future__ import annotations

import numpy as np
import pytest

from qsdonnx.factorize.gptq import gptq_quantize
from qsdonnx.factorize.qsd_dictionary import (coef_range, dictionary_applicable, qsd_dictionary,
                                              qsd_dictionary_nbytes)
from qsdonnx.factorize.rtn import rtn_quantize


def _werr(W, What, H):
    D = W.astype(np.float64) - What
    return float(np.trace(D.T @ H @ D) / np.trace(W.T.astype(np.float64) @ H @ W))


def layer(K=128, N=96, tokens=2048, seed=0, heavy=False):
    """Correlated inputs with a few high-energy channels, like a transformer layer's."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(tokens, K)) @ (rng.normal(size=(K, K)) / np.sqrt(K))
    X[:, :4] *= 8.0
    W = (rng.standard_t(4, size=(K, N)) if heavy else rng.normal(size=(K, N))).astype(np.float32)
    return W, X.T @ X


def test_dequantize_is_the_sum_of_scaled_atoms():
    W, H = layer(K=64, N=40)
    f = qsd_dictionary(W, H, dim=4, atoms=32, coef_bits=3, keep=2, rounds=2)
    m = f.q
    assert m.index.shape == m.coefs.shape == (2, 16, 40)
    lo, hi = coef_range(3)
    assert m.coefs.min() >= lo and m.coefs.max() <= hi and m.index.max() < 32
    k, p, n = 1, 5, 7  # weight rows 4p .. 4p+3 of column n
    want = sum(float(m.coefs[t, p, n]) * m.dictionary[m.index[t, p, n]] for t in range(2)) * m.col_scales[n]
    np.testing.assert_allclose(f.dense()[4 * p:4 * p + 4, n], want, rtol=1e-6)
    # stored values are exact in their dtype
    for v in (m.dictionary, m.col_scales):
        np.testing.assert_array_equal(v, v.astype(np.float16).astype(np.float32))


def test_bytes_are_the_streams_dictionary_and_scales():
    W, H = layer(K=384, N=384)
    f = qsd_dictionary(W, H, dim=4, atoms=256, coef_bits=4, rounds=1)
    n = (384 // 4) * 384
    assert f.nbytes() == n * 8 // 8 + n * 4 // 8 + 256 * 4 * 2 + 384 * 2
    assert f.nbytes() == qsd_dictionary_nbytes(384, 384, 4, 256, 4)
    # 3 bits per weight plus 0.15 for the dictionary and the column scales
    assert 3.0 < f.bits_per_weight() < 3.16
    # a last axis that is not a multiple of 8: each stream is flattened, and trimmed and
    # reshaped by constants (an int64 count and a 3-axis shape)
    n = 32 * 12
    assert qsd_dictionary_nbytes(64, 12, 2, 64, 3) == (n // 8 * 6 + 24) + (n // 8 * 3 + 24) + 64 * 2 * 2 + 12 * 2


def test_scalar_limit_is_a_uniform_grid_per_column():
    # One atom of length one: every weight is col_scale · atom · an integer code.
    W, _ = layer(K=64, N=24)
    f = qsd_dictionary(W, None, dim=1, atoms=1, coef_bits=4, rounds=2)
    step = f.q.col_scales * f.q.dictionary[0, 0]
    codes = f.dense() / step[None, :]
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert np.abs(np.round(codes)).max() <= 8


def test_error_feedback_and_dictionary_fit_lower_the_weighted_error():
    W, H = layer(K=128, N=96)
    fast = qsd_dictionary(W, H, dim=4, atoms=64, coef_bits=3, feedback=False)
    full = qsd_dictionary(W, H, dim=4, atoms=64, coef_bits=3, rounds=3)
    e_fast, e_full = _werr(W, fast.dense(), H), _werr(W, full.dense(), H)
    assert e_full < 0.8 * e_fast
    hist = full.info["objective"]
    # the kept result is the best round, and the dictionary fits lowered the objective
    assert e_full == pytest.approx(min(hist), rel=1e-6)
    assert min(hist[1::2]) < hist[0]


def test_beats_round_to_nearest_at_fewer_bytes():
    # 256 four-row shapes with 4-bit gains (3.1 bpw) against 3-bit codes in blocks of 32 (3.5 bpw)
    W, H = layer(K=256, N=256, heavy=True)
    f = qsd_dictionary(W, H, dim=4, atoms=256, coef_bits=4)
    rtn = rtn_quantize(W, 3, 32, symmetric=True)
    assert f.nbytes() < rtn.nbytes()
    e = _werr(W, f.dense(), H)
    assert e < 0.8 * _werr(W, rtn.dequantize(), H)
    # and comes near GPTQ's error-feedback rounding of the same grid
    g = gptq_quantize(W, H, 3, 32, symmetric=True, damp=0.1, act_order=True)
    assert e < 1.1 * _werr(W, g.dequantize(), H)


def test_two_entries_per_vector_fit_better_than_one_at_equal_atoms():
    W, H = layer(K=128, N=64)
    one = qsd_dictionary(W, H, dim=8, atoms=64, coef_bits=3, keep=1, rounds=2)
    two = qsd_dictionary(W, H, dim=8, atoms=64, coef_bits=3, keep=2, rounds=2)
    assert _werr(W, two.dense(), H) < 0.8 * _werr(W, one.dense(), H)


def test_seeded_and_deterministic():
    W, H = layer(K=64, N=32)
    a = qsd_dictionary(W, H, dim=2, atoms=16, coef_bits=3, seed=3).dense()
    b = qsd_dictionary(W, H, dim=2, atoms=16, coef_bits=3, seed=3).dense()
    np.testing.assert_array_equal(a, b)


def test_rejects_what_it_cannot_store():
    W, H = layer(K=64, N=32)
    assert not dictionary_applicable(66, 32, 4, 16) and not dictionary_applicable(8, 2, 2, 16)
    with pytest.raises(ValueError, match="power of two"):
        qsd_dictionary(W, H, dim=4, atoms=48, coef_bits=3)
    with pytest.raises(ValueError, match="cut into"):
        qsd_dictionary(W[:62], H[:62, :62], dim=4, atoms=16, coef_bits=3)
    with pytest.raises(ValueError, match="1 to 7 bits"):
        qsd_dictionary(W, H, dim=4, atoms=16, coef_bits=0)
