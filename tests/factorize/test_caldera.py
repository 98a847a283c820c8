import numpy as np
import pytest

from qsdonnx.factorize.budget import caldera_nbytes, lowrank_nbytes, rtn_nbytes
from qsdonnx.factorize.caldera import caldera_factorize
from qsdonnx.factorize.gptq import gptq_factorize
from qsdonnx.factorize.linalg import weighted_error
from qsdonnx.factorize.types import DenseMatrix, QuantizedMatrix


def correlated_h(K, rng, n=None):
    n = n or 4 * K
    mix = rng.standard_normal((K, K)) * np.logspace(0, -2, K)[None, :] / np.sqrt(K)
    X = rng.standard_normal((n, K)) @ mix.T + 0.05 * rng.standard_normal((n, K))
    return (X.T @ X).astype(np.float32)


def outlier_matrix(K, N, rng):
    """Quantization-friendly Gaussian body plus a rank-2 component concentrated on 10% of rows."""
    rows = (rng.random((K, 1)) < 0.1).astype(np.float32)
    low = rng.standard_normal((K, 2)) @ rng.standard_normal((2, N)) * rows * 3.0
    return (0.05 * rng.standard_normal((K, N)) + low).astype(np.float32)


@pytest.mark.parametrize("bits_lr", [4, 8, None])
def test_caldera_best_error_non_increasing(bits_lr):
    rng = np.random.default_rng(0)
    K, N = 128, 64
    W = outlier_matrix(K, N, rng)
    H = correlated_h(K, rng)
    f = caldera_factorize(W, H, 4, 3, bits_lr, 32, iters=4)
    assert f.method == "caldera"
    errs = f.info["errors"]
    assert len(errs) == 4
    running = np.minimum.accumulate(errs)
    assert np.all(np.diff(running) <= 0)
    assert f.info["error"] == min(errs) <= errs[0]
    assert weighted_error(W, f.dense(), H) == pytest.approx(f.info["error"], rel=1e-4)
    assert isinstance(f.q, QuantizedMatrix)
    kind = DenseMatrix if bits_lr is None else QuantizedMatrix
    assert isinstance(f.left, kind) and isinstance(f.right, kind)
    assert f.left.shape == (K, 4) and f.right.shape == (4, N)
    assert f.nbytes() == rtn_nbytes(K, N, 3, 32) + lowrank_nbytes(K, N, 4, bits_lr, bits_lr, 32)
    assert f.nbytes() == caldera_nbytes(K, N, 4, 3, bits_lr, 32)


@pytest.mark.parametrize("bits_lr,rank", [(8, 4), (4, 8), (None, 2)])
def test_caldera_beats_gptq_at_lower_bytes(bits_lr, rank):
    rng = np.random.default_rng(1)
    K, N = 128, 64
    W = outlier_matrix(K, N, rng)
    H = correlated_h(K, rng)
    g = gptq_factorize(W, H, 4, 32)
    c = caldera_factorize(W, H, rank, 3, bits_lr, 32, iters=3)
    assert c.nbytes() <= g.nbytes()
    assert weighted_error(W, c.dense(), H) < 0.5 * weighted_error(W, g.dense(), H)


def test_caldera_zero_init_runs_and_validates():
    rng = np.random.default_rng(2)
    W = outlier_matrix(64, 32, rng)
    H = correlated_h(64, rng)
    f = caldera_factorize(W, H, 2, 4, 8, 32, iters=2, init="zero")
    assert f.info["error"] <= f.info["errors"][0]
    with pytest.raises(ValueError):
        caldera_factorize(W, H, 2, 4, 8, 32, init="random")
    with pytest.raises(ValueError):
        caldera_factorize(W, H, 40, 4, 8, 32)
