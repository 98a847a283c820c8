"""Block rotations (factorize.rotation): exact algebra, and the incoherence they buy."""
from __future__ import annotations

import numpy as np
import pytest

from qsdonnx.factorize.rotation import (random_orthogonal, rotatable, rotate_input, rotate_second_moment,
                                        rotate_weight)
from qsdonnx.factorize.rtn import rtn_quantize


@pytest.mark.parametrize("b", [2, 32, 64])
def test_random_orthogonal_is_orthogonal_and_seeded(b):
    Q = random_orthogonal(b, seed=3)
    assert np.abs(Q.T.astype(np.float64) @ Q - np.eye(b)).max() < 1e-5
    assert np.array_equal(Q, random_orthogonal(b, seed=3))
    assert not np.allclose(Q, random_orthogonal(b, seed=4))


def test_rotated_layer_computes_the_same_and_statistics_follow():
    g = np.random.default_rng(0)
    K, N, b = 96, 40, 32
    X = g.normal(size=(500, K)) * g.uniform(0.1, 5.0, K)
    W = g.normal(size=(K, N))
    Q = random_orthogonal(b, seed=1).astype(np.float64)
    R = np.kron(np.eye(K // b), Q)  # diag(Q, Q, Q)
    Xr, Wr = rotate_input(X, Q), rotate_weight(W, Q)
    assert np.allclose(Xr, X @ R) and np.allclose(Wr, R.T @ W)
    assert np.linalg.norm(Xr @ Wr - X @ W) < 1e-6 * np.linalg.norm(X @ W)  # Q is float32: orthogonal to ~1e-7
    H = X.T @ X / len(X)
    assert np.allclose(rotate_second_moment(H, Q), Xr.T @ Xr / len(X))
    assert np.allclose(rotate_input(X.mean(0), Q), Xr.mean(0))
    assert rotatable(96, 32) and not rotatable(100, 32)


def test_rotation_spreads_outliers_and_lowers_the_rounding_error():
    """A weight with heavy-tailed entries (Student t, 3 degrees of freedom) rounded to 3 bits in
    blocks of 32: rotated first and rotated back, its error is lower than rounded as it is."""
    g = np.random.default_rng(2)
    K, N = 256, 128
    W = g.standard_t(3, size=(K, N)).astype(np.float32)
    Q = random_orthogonal(32, seed=0)
    plain = rtn_quantize(W, 3, 32, symmetric=False).dequantize()
    Wr = rotate_weight(W, Q)
    back = rotate_weight(rtn_quantize(Wr, 3, 32, symmetric=False).dequantize(), Q.T)
    err = lambda Wh: float(np.linalg.norm(Wh - W) / np.linalg.norm(W))
    assert np.abs(Wr).max() < 0.5 * np.abs(W).max()
    assert err(back) < 0.8 * err(plain)
