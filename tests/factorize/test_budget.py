import numpy as np
import pytest

from qsdonnx.factorize.budget import lowrank_nbytes, rank_for_budget, rtn_nbytes
from qsdonnx.factorize.lplr import lplr_factorize
from qsdonnx.factorize.rtn import rtn_factorize
from qsdonnx.factorize.svd import svd_factorize


@pytest.mark.parametrize("K,N", [(64, 48), (70, 33), (16, 100)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_rtn_nbytes_exact(K, N, bits, symmetric, scale_dtype):
    W = np.random.default_rng(K).standard_normal((K, N)).astype(np.float32)
    f = rtn_factorize(W, bits, 32, symmetric, scale_dtype)
    assert rtn_nbytes(K, N, bits, 32, symmetric, scale_dtype) == f.nbytes()


@pytest.mark.parametrize("rank", [1, 5, 16, 33])
@pytest.mark.parametrize("bits_left,bits_right", [(2, 3), (4, 4), (8, None), (None, 3), (None, None)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_lowrank_nbytes_exact(rank, bits_left, bits_right, symmetric):
    K, N = 70, 45
    W = np.random.default_rng(rank).standard_normal((K, N)).astype(np.float32)
    for dense_dtype in ("float16", "float32"):
        f = lplr_factorize(W, rank, bits_left, bits_right, 16, symmetric, dense_dtype=dense_dtype)
        assert lowrank_nbytes(K, N, rank, bits_left, bits_right, 16, symmetric, "float16",
                              dense_dtype) == f.nbytes()


def test_lowrank_nbytes_matches_svd():
    W = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    assert lowrank_nbytes(40, 30, 7, None, None, 32, dense_dtype="float32") == svd_factorize(W, 7).nbytes()


def test_rank_for_budget():
    K, N = 384, 1536
    fn = lambda r: lowrank_nbytes(K, N, r, 4, 4, 32)  # noqa: E731
    for bpw in (0.01, 0.5, 1.0, 2.0, 4.0, 100.0):
        r = rank_for_budget(K, N, bpw, fn)
        budget = bpw * K * N / 8
        assert 0 <= r <= min(K, N)
        if r == 0:
            assert fn(1) > budget
        else:
            assert fn(r) <= budget
            assert r == min(K, N) or fn(r + 1) > budget
    assert rank_for_budget(K, N, 100.0, fn) == K
    assert rank_for_budget(K, N, 0.01, fn) == 0
