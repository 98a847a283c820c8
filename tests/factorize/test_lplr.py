import numpy as np
import pytest

from qsdonnx.factorize.lplr import least_squares_right, lplr_factorize
from qsdonnx.factorize.types import DenseMatrix, QuantizedMatrix


def _rel(W, What):
    return np.linalg.norm(W - What) / np.linalg.norm(W)


def _lowrank_plus_noise(K, N, r, rng, noise=0.05):
    return (rng.standard_normal((K, r)) @ rng.standard_normal((r, N)) / np.sqrt(r)
            + noise * rng.standard_normal((K, N))).astype(np.float32)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_lplr_full_rank_8bit_small_error(shape):
    rng = np.random.default_rng(0)
    W = rng.standard_normal(shape).astype(np.float32)
    r = min(shape)
    f = lplr_factorize(W, r, 8, 8, 32)
    assert f.method == "lplr" and f.info["sketch"] == "svd"
    assert isinstance(f.left, QuantizedMatrix) and f.left.shape == (shape[0], r)
    assert isinstance(f.right, QuantizedMatrix) and f.right.shape == (r, shape[1])
    assert _rel(W, f.dense()) < 1e-2


def test_lplr_gaussian_full_rank_8bit():
    # A square Gaussian sketch is ill-conditioned, which the least-squares step amplifies;
    # oversampling (randomized SVD) restores the well-conditioned basis.
    rng = np.random.default_rng(0)
    W = rng.standard_normal((64, 96)).astype(np.float32)
    assert _rel(W, lplr_factorize(W, 64, 8, 8, 32, sketch="gaussian", oversample=16).dense()) < 1e-2
    assert _rel(W, lplr_factorize(W, 64, 8, 8, 32, sketch="gaussian").dense()) < 0.2


def test_lplr_block_layout_of_factors():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((80, 50)).astype(np.float32)
    f = lplr_factorize(W, 12, 4, 4, 32)
    assert f.left.scales.shape == (3, 12)  # blocks along K
    assert f.right.scales.shape == (1, 50)  # one partial block along r < block_size


@pytest.mark.parametrize("sketch", ["svd", "gaussian"])
def test_least_squares_step_is_optimal(sketch):
    rng = np.random.default_rng(2)
    W = _lowrank_plus_noise(64, 48, 8, rng)
    f = lplr_factorize(W, 8, 4, None, 32, sketch=sketch, dense_dtype="float32")
    assert isinstance(f.right, DenseMatrix)
    L, R = f.left.dequantize(), f.right.dequantize()
    base = np.linalg.norm(W - L @ R)
    for _ in range(5):
        dR = 1e-3 * rng.standard_normal(R.shape).astype(np.float32)
        assert np.linalg.norm(W - L @ (R + dR)) > base
    np.testing.assert_allclose(R, least_squares_right(L, W), rtol=1e-4, atol=1e-5)


def test_lplr_seed_deterministic():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((64, 40)).astype(np.float32)
    a = lplr_factorize(W, 6, 4, 4, 32, sketch="gaussian", seed=7)
    b = lplr_factorize(W, 6, 4, 4, 32, sketch="gaussian", seed=7)
    c = lplr_factorize(W, 6, 4, 4, 32, sketch="gaussian", seed=8)
    np.testing.assert_array_equal(a.left.codes, b.left.codes)
    np.testing.assert_array_equal(a.right.codes, b.right.codes)
    assert not np.array_equal(a.left.codes, c.left.codes)


def test_lplr_svd_sketch_beats_gaussian_and_oversampling_helps():
    rng = np.random.default_rng(4)
    W = _lowrank_plus_noise(128, 96, 16, rng, noise=0.2)
    e_svd = _rel(W, lplr_factorize(W, 8, 8, 8, 32, sketch="svd").dense())
    e_g = np.mean([_rel(W, lplr_factorize(W, 8, 8, 8, 32, sketch="gaussian", seed=s).dense())
                   for s in range(3)])
    e_os = np.mean([_rel(W, lplr_factorize(W, 8, 8, 8, 32, sketch="gaussian", seed=s,
                                           oversample=8).dense()) for s in range(3)])
    assert e_svd < e_os < e_g


def test_lplr_rejects_bad_arguments():
    W = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError):
        lplr_factorize(W, 9, 4, 4, 32)
    with pytest.raises(ValueError):
        lplr_factorize(W, 2, 4, 4, 32, sketch="random")
