import time

import numpy as np
import pytest

from qsdonnx.factorize.gptq import (gptq_factorize, gptq_quantize, gptq_quantize_prepared, refit_scales,
                                    upper_inverse_cholesky)
from qsdonnx.factorize.linalg import weighted_error
from qsdonnx.factorize.quantizers import code_range, mse_grid
from qsdonnx.factorize.rtn import rtn_quantize


def column_errors(W, What, H):
    """Per column ``(w - ŵ)ᵀ H (w - ŵ)`` in float64."""
    E = np.asarray(W, np.float64) - np.asarray(What, np.float64)
    return (E * (np.asarray(H, np.float64) @ E)).sum(0)


def correlated_h(K, rng, n=None):
    n = n or 4 * K
    mix = rng.standard_normal((K, K)) * np.logspace(0, -2, K)[None, :] / np.sqrt(K)
    X = rng.standard_normal((n, K)) @ mix.T + 0.05 * rng.standard_normal((n, K))
    return (X.T @ X).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_weighted_error(bits, symmetric, act_order):
    ratios = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        K, N = 128, 48
        W = rng.standard_normal((K, N)).astype(np.float32)
        H = correlated_h(K, rng)
        q = gptq_quantize(W, H, bits, 32, symmetric=symmetric, act_order=act_order)
        qmin, qmax = code_range(bits, symmetric)
        assert q.codes.min() >= qmin and q.codes.max() <= qmax
        r = rtn_quantize(W, bits, 32, symmetric=symmetric)
        ratios.append(weighted_error(W, q.dequantize(), H) / weighted_error(W, r.dequantize(), H))
    assert max(ratios) <= 1.0
    assert np.mean(ratios) < 0.8


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_static_grids_weighted_by_input_energy(bits):
    """With act_order the block grids are fixed up front; choosing each block's clipping by the
    squared error weighted with diag(H) (the energy of each row's input) instead of the plain
    squared error lowers the H-weighted error when the inputs' energies differ."""
    ratios = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        K, N = 256, 64
        X = rng.standard_normal((1500, K)) * np.exp(rng.standard_normal(K))
        H = (X.T @ X / len(X)).astype(np.float32)
        W = rng.standard_normal((K, N)).astype(np.float32)
        perm = np.argsort(-np.diag(H), kind="stable")
        U = upper_inverse_cholesky(H[np.ix_(perm, perm)].astype(np.float64), 0.1)
        errs = [weighted_error(W, gptq_quantize_prepared(W, U, bits, 32, False, "float16", perm,
                                                         row_weights=rw).dequantize(), H)
                for rw in (None, np.diag(H))]
        ratios.append(errs[1] / errs[0])
    assert max(ratios) < 1.0
    assert np.mean(ratios) < 0.9


def test_weighted_grid_search_minimizes_the_weighted_error():
    rng = np.random.default_rng(5)
    Wb = rng.standard_normal((4, 32, 16)).astype(np.float32)
    w = np.exp(2 * rng.standard_normal((4, 32))).astype(np.float32)

    def weighted(s, z):
        q = np.clip(np.round(Wb / s[:, None, :]) + z[:, None, :], 0, 7)
        return ((((q - z[:, None, :]) * s[:, None, :] - Wb) ** 2) * w[:, :, None]).sum(axis=1)

    plain = mse_grid(Wb, 3, False, "float32")
    aware = mse_grid(Wb, 3, False, "float32", row_weights=w)
    e_plain = weighted(plain[0], plain[1].astype(np.float32))
    e_aware = weighted(aware[0], aware[1].astype(np.float32))
    assert np.all(e_aware <= e_plain + 1e-6) and e_aware.sum() < e_plain.sum()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K", [64, 80])
def test_gptq_identity_h_is_rtn(symmetric, K):
    rng = np.random.default_rng(K)
    W = rng.standard_normal((K, 20)).astype(np.float32)
    H = np.eye(K, dtype=np.float32) * 3.0
    q = gptq_quantize(W, H, 4, 32, symmetric=symmetric, refit=False)
    r = rtn_quantize(W, 4, 32, symmetric=symmetric)
    np.testing.assert_array_equal(q.scales, r.scales)
    np.testing.assert_array_equal(q.codes, r.codes)
    assert weighted_error(W, q.dequantize(), H) == pytest.approx(weighted_error(W, r.dequantize(), H))


@pytest.mark.parametrize("bits,block,symmetric", [(2, 64, False), (3, 32, True), (4, 128, False)])
def test_refit_scales_never_worse_per_column_and_better_overall(bits, block, symmetric):
    rng = np.random.default_rng(bits)
    K, N = 160, 40  # a partial last block when block does not divide K
    W = rng.standard_normal((K, N)).astype(np.float32)
    H = correlated_h(K, rng)
    q = gptq_quantize(W, H, bits, block, symmetric=symmetric, act_order=True, refit=False)
    f = refit_scales(q, W, H)
    np.testing.assert_array_equal(f.codes, q.codes)
    before, after = column_errors(W, q.dequantize(), H), column_errors(W, f.dequantize(), H)
    assert np.all(after <= before)
    assert after.sum() < 0.97 * before.sum()
    assert f.nbytes() == q.nbytes()
    # the stored scales keep their signs and are exact in the scale type
    assert np.all(np.sign(f.stored_scales()) == np.sign(q.stored_scales()))
    np.testing.assert_array_equal(f.scales.astype(np.float16).astype(np.float32), f.scales)


def test_refit_scales_solves_the_least_squares_problem():
    """With float32 scales and a column whose scales have slack, the refit matches a direct
    least-squares solve of min_s (w - C s)ᵀ H (w - C s)."""
    rng = np.random.default_rng(5)
    K, N, block = 96, 6, 32
    W = rng.standard_normal((K, N)).astype(np.float32)
    H = correlated_h(K, rng).astype(np.float64)
    q = rtn_quantize(W, 3, block, symmetric=True, scale_dtype="float32")
    f = refit_scales(q, W, H)
    for n in range(N):
        C = np.zeros((K, K // block))
        for b in range(K // block):
            C[b * block:(b + 1) * block, b] = q.codes[b * block:(b + 1) * block, n]
        s = np.linalg.solve(C.T @ H @ C, C.T @ H @ W[:, n].astype(np.float64))
        np.testing.assert_allclose(f.scales[:, n], s, rtol=1e-4)


def test_gptq_dead_inputs_and_singular_h():
    rng = np.random.default_rng(1)
    K = 64
    X = rng.standard_normal((16, K))
    X[:, 5] = 0.0
    H = (X.T @ X).astype(np.float32)
    W = rng.standard_normal((K, 10)).astype(np.float32)
    f = gptq_factorize(W, H, 3, 32)
    assert f.method == "gptq"
    assert np.all(np.isfinite(f.dense()))
    assert weighted_error(W, f.dense(), H) < weighted_error(W, rtn_quantize(W, 3, 32).dequantize(), H)


def test_gptq_layout_and_bytes_match_rtn():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((96, 40)).astype(np.float32)
    H = correlated_h(96, rng)
    for sym in (True, False):
        q = gptq_quantize(W, H, 4, 32, symmetric=sym)
        r = rtn_quantize(W, 4, 32, symmetric=sym)
        assert q.codes.dtype == r.codes.dtype and q.scales.shape == r.scales.shape
        assert q.nbytes() == r.nbytes()


def test_gptq_speed_minilm_ffn():
    rng = np.random.default_rng(3)
    K, N = 1536, 384
    W = rng.standard_normal((K, N)).astype(np.float32)
    A = rng.standard_normal((K, 64)).astype(np.float32)
    H = A @ A.T + np.eye(K, dtype=np.float32)
    gptq_quantize(W[:64], H[:64, :64], 4, 32)  # warm up torch
    t = time.perf_counter()
    gptq_quantize(W, H, 4, 32)
    assert time.perf_counter() - t < 3.0  # well under a second unloaded; slack for a shared CPU


@pytest.mark.parametrize("K", [96, 97])
@pytest.mark.parametrize("dead", [False, True])
def test_lean_inverse_factor_matches_float64(K, dead, monkeypatch):
    """The float32 in-place factor used for very wide layers is the float64 one to float32
    rounding, in natural and in permuted order, with dead inputs too; and GPTQ with it gives
    the same H-weighted error."""
    from qsdonnx.factorize import gptq

    rng = np.random.default_rng(K)
    H = correlated_h(K, rng)
    if dead:
        H[5, :] = H[:, 5] = 0
    perm = np.argsort(-np.diag(H), kind="stable")
    ref = [upper_inverse_cholesky(H, 0.1, p).numpy() for p in (None, perm)]
    monkeypatch.setattr(gptq, "LEAN_FACTOR_K", 0)
    lean = [upper_inverse_cholesky(H, 0.1, p).numpy() for p in (None, perm)]
    for a, b in zip(ref, lean):
        assert b.dtype == np.float32 and np.allclose(np.triu(b), b)
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-4 * np.abs(a).max())
    W = rng.standard_normal((K, 40)).astype(np.float32)
    e_lean = weighted_error(W, gptq_quantize(W, H, 3, 32, act_order=True).dequantize(), H)
    monkeypatch.setattr(gptq, "LEAN_FACTOR_K", 1 << 30)
    e_ref = weighted_error(W, gptq_quantize(W, H, 3, 32, act_order=True).dequantize(), H)
    assert e_lean == pytest.approx(e_ref, rel=0.02)


def test_refit_in_column_chunks_is_the_same(monkeypatch):
    """Solving the refit's systems a few columns at a time changes nothing."""
    from qsdonnx.factorize import gptq

    rng = np.random.default_rng(4)
    K, N = 128, 50
    W = rng.standard_normal((K, N)).astype(np.float32)
    H = correlated_h(K, rng)
    q = gptq_quantize(W, H, 3, 32, refit=False)
    whole = refit_scales(q, W, H)
    monkeypatch.setattr(gptq, "REFIT_CHUNK_BYTES", 8 * 4 * 4 * 7)  # 7 columns at a time
    chunked = refit_scales(q, W, H)
    assert not np.array_equal(whole.scales, q.scales)
    np.testing.assert_allclose(chunked.scales, whole.scales, rtol=1e-6, atol=0)
