import numpy as np
import pytest

from qsdonnx.factorize.linalg import weighted_error
from qsdonnx.factorize.svd import svd_factorize, weighted_svd, weighted_svd_factorize


def _anisotropic_h(K, rng, n=512):
    mix = rng.standard_normal((K, K)) * np.logspace(0, -2, K)[None, :]
    X = rng.standard_normal((n, K)) @ mix.T + 0.05 * rng.standard_normal((n, K))
    return (X.T @ X).astype(np.float32)


@pytest.mark.parametrize("shape,rank", [((96, 64), 10), ((64, 150), 64), ((40, 40), 1)])
def test_svd_eckart_young(shape, rank):
    rng = np.random.default_rng(rank)
    W = rng.standard_normal(shape).astype(np.float32)
    f = svd_factorize(W, rank)
    assert f.method == "svd" and f.rank == rank
    assert f.left.shape == (shape[0], rank) and f.right.shape == (rank, shape[1])
    s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    expected = np.sqrt(np.sum(s[rank:] ** 2))
    err = np.linalg.norm(W - f.dense())
    assert err == pytest.approx(expected, rel=1e-4, abs=1e-4 * float(np.linalg.norm(W)))
    assert f.nbytes() == 4 * rank * sum(shape)
    assert svd_factorize(W, rank, dtype="float16").nbytes() == 2 * rank * sum(shape)


def test_svd_rank_checked():
    W = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError):
        svd_factorize(W, 4)
    with pytest.raises(ValueError):
        svd_factorize(W, 0)


def test_weighted_svd_beats_plain_on_weighted_error():
    rng = np.random.default_rng(3)
    K, N, r = 64, 48, 8
    W = rng.standard_normal((K, N)).astype(np.float32)
    H = _anisotropic_h(K, rng)
    L, R = weighted_svd(W, H, r)
    plain = svd_factorize(W, r).dense()
    e_w = weighted_error(W, L @ R, H)
    e_p = weighted_error(W, plain, H)
    assert e_w < 0.9 * e_p
    # Optimality: it matches the closed form ||(CᵀW) tail||² and small perturbations only hurt.
    C = np.linalg.cholesky(H.astype(np.float64) + 1e-6 * np.mean(np.diag(H)) * np.eye(K))
    s = np.linalg.svd(C.T @ W, compute_uv=False)
    assert e_w == pytest.approx(np.sum(s[r:] ** 2), rel=1e-3)
    assert weighted_error(W, (L + 1e-2 * rng.standard_normal(L.shape)) @ R, H) > e_w


def test_weighted_svd_identity_is_plain_svd():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((32, 20)).astype(np.float32)
    f = weighted_svd_factorize(W, np.eye(32, dtype=np.float32), 5)
    assert f.method == "wsvd"
    s = np.linalg.svd(W, compute_uv=False)
    assert np.linalg.norm(W - f.dense()) == pytest.approx(np.sqrt(np.sum(s[5:] ** 2)), rel=1e-4)


def test_weighted_svd_singular_h():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((10, 32))  # fewer samples than inputs: H is rank 10
    H = (X.T @ X).astype(np.float32)
    W = rng.standard_normal((32, 16)).astype(np.float32)
    L, R = weighted_svd(W, H, 4)
    assert np.all(np.isfinite(L)) and np.all(np.isfinite(R))
    assert weighted_error(W, L @ R, H) <= weighted_error(W, svd_factorize(W, 4).dense(), H) * 1.001
