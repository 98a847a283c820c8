"""Trainable continuous parameters of factorizations (qsdonnx.factorize.tune)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qsdonnx.factorize.caldera import caldera_factorize
from qsdonnx.factorize.gptq import gptq_factorize
from qsdonnx.factorize.pq import pq_factorize
from qsdonnx.factorize.qsd import qsd_factorize
from qsdonnx.factorize.qsd_dictionary import qsd_dictionary
from qsdonnx.factorize.rtn import rtn_factorize
from qsdonnx.factorize.svd import svd_factorize
from qsdonnx.factorize.tune import tunable
from qsdonnx.factorize.types import Factorization, SparseMatrix
from qsdonnx.factorize.vq import vq_factorize


def _layer(K=128, N=48, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(1024, K)) * rng.uniform(0.3, 3.0, K)
    return rng.normal(size=(K, N)).astype(np.float32), (X.T @ X / 1024)


def _outliers(W):
    f = rtn_factorize(W, 2, 32, symmetric=False)
    rows, cols = np.array([0, 5, 77, 5]), np.array([1, 2, 40, 2])  # a repeated position adds up
    f.sparse = SparseMatrix(shape=W.shape, rows=rows.astype(np.int32), cols=cols.astype(np.int32),
                            values=np.array([3.0, -2.0, 1.5, 0.5], np.float32))
    return f


CASES = {
    "rtn asymmetric": lambda W, H: rtn_factorize(W, 3, 32, symmetric=False),
    "gptq symmetric": lambda W, H: gptq_factorize(W, H, 4, 64, symmetric=True),
    "vq": lambda W, H: vq_factorize(W, H, 3, 64),
    "caldera": lambda W, H: caldera_factorize(W, H, 8, 2, 4, 32, iters=2),
    "svd fp16 factors": lambda W, H: svd_factorize(W, 8, "float16"),
    "qsd sparse factors": lambda W, H: qsd_factorize(W, H, 8, 4, 16, sparsity=0.5, iters=20),
    "qsd sub-vectors": lambda W, H: qsd_dictionary(W, H, 4, 32, 3, keep=2, rounds=1),
    "outlier term": lambda W, H: _outliers(W),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_starts_at_the_stored_weight_and_writes_back_what_it_computes(case):
    W, H = _layer()
    f = CASES[case](W, H)
    t = tunable(f)
    assert t is not None and t.parameters()
    with torch.no_grad():
        assert np.allclose(t.weight().numpy(), f.dense(), rtol=0, atol=1e-6)
        g = torch.Generator().manual_seed(1)
        for p in t.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        moved = t.weight().numpy()
    assert np.abs(moved - f.dense()).max() > 1e-3
    out = t.result()
    # Same codes, same bytes; the written values are the trained ones rounded to their storage type.
    assert out.nbytes() == f.nbytes()
    for part in ("q", "left", "right", "sparse"):
        a, b = getattr(f, part), getattr(out, part)
        assert (a is None) == (b is None)
        if a is None:
            continue
        fixed = ["indices", "zero_points", "order", "rows", "cols", "index", "coefs"]
        if getattr(a, "bits", None) is not None or hasattr(a, "code_bits"):
            fixed.append("codes")  # integer codes (a sparse factor without bits holds float values there)
        for name in fixed:
            if getattr(a, name, None) is not None:
                assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.abs(out.dense() - moved).max() <= 2e-3 * max(1.0, np.abs(moved).max())
    assert out.info.get("tuned")


def test_product_quantized_tables_are_left_alone():
    table = np.random.default_rng(0).normal(size=(32, 4096)).astype(np.float32)
    assert tunable(pq_factorize(table, 4)) is None
    assert tunable(Factorization(method="none", shape=(4, 4))) is None


def test_fitting_the_scales_lowers_the_weighted_error_it_is_fitted_to():
    """With the codes fixed, gradient steps on the continuous values reduce tr(ΔᵀHΔ)."""
    W, H = _layer(K=128, N=64, seed=3)
    f = rtn_factorize(W, 2, 32, symmetric=False, clip_search=False)  # min/max grids: scales to gain
    t = tunable(f)
    Wt, Ht = torch.from_numpy(W), torch.from_numpy(H).float()

    def err():
        D = t.weight() - Wt
        return (D * (Ht @ D)).sum() / (Wt * (Ht @ Wt)).sum()

    opt = torch.optim.Adam(t.parameters(), lr=1e-2)
    first = err().item()
    for _ in range(200):
        opt.zero_grad()
        e = err()
        e.backward()
        opt.step()
    out = t.result()
    D = (W - out.dense()).astype(np.float64)
    after = float(np.sum(D * (H @ D)) / np.sum(W.astype(np.float64) * (H @ W)))
    assert after < 0.9 * first  # min/max 2-bit grids leave much to gain
    assert np.array_equal(out.q.codes, f.q.codes)
