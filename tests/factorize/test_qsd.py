import numpy as np
import pytest

from qsdonnx.factorize.budget import lowrank_nbytes, qsd_nbytes
from qsdonnx.factorize.linalg import weighted_error
from qsdonnx.factorize.qsd import kept_per_column, qsd_factorize, varimax_rotation
from qsdonnx.factorize.quantizers import code_range
from qsdonnx.factorize.svd import weighted_svd
from qsdonnx.factorize.types import DenseMatrix, QuantizedMatrix, SparseQuantizedMatrix


def correlated_h(K, rng, n=None):
    n = n or 4 * K
    mix = rng.standard_normal((K, K)) * np.logspace(0, -2, K)[None, :] / np.sqrt(K)
    X = rng.standard_normal((n, K)) @ mix.T + 0.05 * rng.standard_normal((n, K))
    return (X.T @ X).astype(np.float32)


def sparse_product(K, N, r, rng, density=0.25):
    A = rng.standard_normal((K, r)) * (rng.random((K, r)) < density)
    return (A @ rng.standard_normal((r, N))).astype(np.float32)


@pytest.mark.parametrize("weighted", [False, True])
def test_qsd_unconstrained_reaches_weighted_svd(weighted):
    rng = np.random.default_rng(0)
    K, N, r = 48, 32, 6
    W = rng.standard_normal((K, N)).astype(np.float32)
    H = correlated_h(K, rng) if weighted else None
    if weighted:
        L, R = weighted_svd(W, H, r)
        best = weighted_error(W, L @ R, H)
    else:
        s = np.linalg.svd(W.astype(np.float64), compute_uv=False)
        best = float(np.sum(s[r:] ** 2))
    f = qsd_factorize(W, H, r, None, 32, iters=800, lr=3e-2, init="random", dense_dtype="float32")
    assert isinstance(f.left, DenseMatrix) and isinstance(f.right, DenseMatrix)
    assert weighted_error(W, f.dense(), H) == pytest.approx(f.info["error"], rel=1e-4)
    assert best * (1 - 1e-4) <= f.info["error"] <= best * 1.01


def test_qsd_sparse_beats_dense_at_equal_bytes():
    rng = np.random.default_rng(0)
    K, N, r = 128, 96, 8
    W = sparse_product(K, N, r, rng)
    H = correlated_h(K, rng)
    e0 = weighted_error(W, np.zeros_like(W), H)
    sparse = qsd_factorize(W, H, r, 4, 32, sparsity=(0.75, 0.0))
    assert isinstance(sparse.left, SparseQuantizedMatrix)
    assert isinstance(sparse.right, QuantizedMatrix)
    rd = max(rd for rd in range(1, r + 1) if lowrank_nbytes(K, N, rd, 4, 4, 32) <= sparse.nbytes())
    assert rd >= 5
    fits = qsd_factorize(W, H, rd, 4, 32)
    bigger = qsd_factorize(W, H, rd + 1, 4, 32)
    assert fits.nbytes() <= sparse.nbytes() < bigger.nbytes()
    assert sparse.info["error"] / e0 < 0.05
    assert sparse.info["error"] < 0.5 * fits.info["error"]
    # Even the dense rank one step above the budget is worse.
    assert sparse.info["error"] < bigger.info["error"]


@pytest.mark.parametrize("bits", [None, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_sparse_factor_layout_and_bytes(bits, symmetric):
    rng = np.random.default_rng(1)
    K, N, r = 300, 40, 5  # K > 256: two-byte row indices
    W = sparse_product(K, N, r, rng)
    sp = (0.8, 0.4)
    f = qsd_factorize(W, None, r, bits, 16, sparsity=sp, iters=30, symmetric=symmetric)
    L, R = f.left, f.right
    assert isinstance(L, SparseQuantizedMatrix) and isinstance(R, SparseQuantizedMatrix)
    kl, kr = kept_per_column(K, 0.8), kept_per_column(r, 0.4)
    assert L.indices.shape == (kl, r) and L.indices.dtype == np.uint16
    assert R.indices.shape == (kr, N) and R.indices.dtype == np.uint8
    assert np.all(np.diff(L.indices.astype(int), axis=0) > 0)
    Ld = L.dequantize()
    assert Ld.shape == (K, r)
    assert np.all(np.count_nonzero(Ld, axis=0) <= kl)
    if bits is not None:
        qmin, qmax = code_range(bits, symmetric)
        assert L.codes.min() >= qmin and L.codes.max() <= qmax
        assert L.scales.shape == ((kl + 15) // 16, r)
    assert f.nbytes() == qsd_nbytes(K, N, r, bits, 16, sp, symmetric)
    idx_bytes = 2 * kl * r + kr * N
    assert f.nbytes() > idx_bytes
    np.testing.assert_allclose(f.dense(), Ld @ R.dequantize(), rtol=1e-6, atol=1e-6)


def test_qsd_dense_quantized_bytes_and_never_worse_than_projected_init():
    rng = np.random.default_rng(2)
    K, N, r = 64, 48, 8
    W = rng.standard_normal((K, N)).astype(np.float32)
    H = correlated_h(K, rng)
    f0 = qsd_factorize(W, H, r, 3, 32, iters=0)
    f = qsd_factorize(W, H, r, 3, 32, iters=150)
    assert isinstance(f.left, QuantizedMatrix) and isinstance(f.right, QuantizedMatrix)
    assert f.nbytes() == lowrank_nbytes(K, N, r, 3, 3, 32) == qsd_nbytes(K, N, r, 3, 32)
    assert f.info["error"] <= f0.info["error"]


def test_varimax_concentrates_energy():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((200, 6)) * (rng.random((200, 6)) < 0.2)
    Q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    F = A @ Q  # a rotated sparse basis looks dense
    T = varimax_rotation(F)
    np.testing.assert_allclose(T @ T.T, np.eye(6), atol=1e-10)

    def top_energy(X):
        s = np.sort(X ** 2, axis=0)[::-1]
        return float(np.mean(s[:40].sum(0) / s.sum(0)))

    assert top_energy(F @ T) > max(0.95, top_energy(F) + 0.05)


def test_qsd_rejects_bad_arguments():
    W = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError):
        qsd_factorize(W, None, 2, 4, 32, sparsity=1.0)
    with pytest.raises(ValueError):
        qsd_factorize(W, None, 9, 4, 32)
    with pytest.raises(ValueError):
        qsd_factorize(W, None, 2, 4, 32, init="zeros")
