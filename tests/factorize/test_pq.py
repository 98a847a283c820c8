"""Product quantization of lookup tables (qsdonnx.factorize.pq)."""
from __future__ import annotations

import numpy as np
import pytest

from qsdonnx.factorize.pq import pq_applicable, pq_factorize, pq_nbytes, pq_quantize
from qsdonnx.factorize.rtn import rtn_factorize


def _rel(A, B):
    return float(np.linalg.norm(A - B) / np.linalg.norm(A))


def table(V=4096, D=32, seed=0):
    """Rows with correlated coordinates and varied norms, like word embeddings."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    rows = rng.normal(size=(V, D)) @ mix * rng.uniform(0.5, 2.0, size=(V, 1))
    return rows.T.astype(np.float32)  # the (D, V) embedding view


def test_exact_when_each_subspace_has_few_distinct_vectors():
    rng = np.random.default_rng(1)
    D, V, d = 16, 4096, 4
    S = D // d
    protos = rng.normal(size=(S, 200, d))  # 200 < 256 distinct sub-vectors per sub-space,
    protos /= np.linalg.norm(protos, axis=-1, keepdims=True) * np.sqrt(S)  # each of norm 1/√S
    pick = rng.integers(0, 200, size=(V, S))
    rows = np.concatenate([protos[s, pick[:, s]] for s in range(S)], axis=1)  # unit rows: scale 1
    W = rows.T.astype(np.float32)
    q = pq_quantize(W, d, iters=30, train_rows=V)
    # Only the float16 storage of the centroids remains: about 2^-11 relative.
    assert _rel(W, q.dequantize()) < 2e-3


def test_lloyd_iterations_reduce_the_error():
    W = table()
    e0 = _rel(W, pq_quantize(W, 4, iters=0).dequantize())
    e16 = _rel(W, pq_quantize(W, 4, iters=16).dequantize())
    assert e16 < 0.85 * e0, (e0, e16)


def test_shorter_sub_vectors_cost_more_and_err_less():
    W = table()
    errs, sizes = [], []
    for d in (8, 4, 2):
        f = pq_factorize(W, d)
        errs.append(_rel(W, f.dense()))
        sizes.append(f.nbytes())
    assert errs[0] > errs[1] > errs[2]
    assert sizes[0] < sizes[1] < sizes[2]


def test_bytes_are_counted_from_every_stored_array():
    W = table(V=3000, D=24)
    q = pq_quantize(W, 4)
    stored = q.codes.nbytes + q.codebooks.size * 2 + q.scales.size * 2  # fp16 codebooks and scales
    assert q.nbytes() == stored == pq_nbytes(24, 3000, 4)
    assert q.codes.dtype == np.uint8 and q.codes.shape == (3000, 6)


def test_beats_scalar_rounding_at_fewer_bytes():
    """2-bit codes: PQ (d=4, 8-bit codes) against block-wise asymmetric 2-bit RTN."""
    W = table(V=16384, D=128)
    pq = pq_factorize(W, 4)
    rtn = rtn_factorize(W, 2, block_size=32, symmetric=False)
    assert pq.nbytes() < rtn.nbytes()
    assert _rel(W, pq.dense()) < 0.95 * _rel(W, rtn.dense())


def test_applicability_and_bad_shapes():
    assert pq_applicable(384, 30522, 4)
    assert not pq_applicable(384, 1000, 4)  # too few rows per centroid
    assert not pq_applicable(30, 30522, 4)  # sub-vectors do not tile the row
    with pytest.raises(ValueError):
        pq_quantize(table(D=30), 4)
