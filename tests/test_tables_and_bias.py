"""Product-quantized Gather tables and bias correction, end to end in ONNX Runtime.

* A ``pq`` table must decode in the graph to exactly the rows the factorization holds (float
  round-off only), in every format, and its stored bytes must be what the report counts.
* A layer with a bias of its own, calibrated on inputs with a large mean, must come out with
  (almost) no mean output error: the bias absorbs ``μ·(W − Ŵ)``.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qsdonnx
from conftest import make_model, randn, rel_l2, run_model, save
from qsdonnx.buildops import find_ops_library
from qsdonnx.factorize.pq import pq_nbytes
from qsdonnx.passes.bias import find_bias_slots

V, D = 4096, 32


def table_model():
    rng = np.random.default_rng(5)
    T = (rng.normal(size=(V, D)) @ rng.normal(size=(D, D)) / np.sqrt(D)).astype(np.float32)
    W = randn((D, 16), 6)
    model = make_model([helper.make_node("Gather", ["T", "ids"], ["e"], name="emb"),
                        helper.make_node("MatMul", ["e", "W"], ["Y"], name="proj")],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "t"])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "t", 16])],
                       [numpy_helper.from_array(T, "T"), numpy_helper.from_array(W, "W")], opset=17)
    return model, T, W


FORMATS = ["qdq", "nbits"] + (["fused"] if find_ops_library() is not None else [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_pq_table_decodes_to_the_factorization(tmp_path, fmt):
    model, T, W = table_model()
    src = save(model, tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    res = qsdonnx.optimize(src, dst, method="rtn", bits=8, format=fmt, progress=False,
                           overrides=(qsdonnx.config.parse_override("T:method=pq,bits=2"),),
                           exclude=("W",), validate=False)
    [layer] = [l for l in res.report.layers if l["name"] == "T"]
    assert layer["status"] == "compressed" and layer["method"] == "pq"
    ids = np.array([[0, 4095, 17, 3, 3], [128, 1, 2000, 64, 9]], np.int64)
    y = run_model(dst, {"ids": ids})[0]
    # The factorization's own reconstruction of the table (the planner's dense() view).
    from qsdonnx.factorize.pq import pq_factorize
    f = pq_factorize(T.T.copy(), 4, seed=0)
    rows = f.dense().T
    np.testing.assert_allclose(y, rows[ids] @ W, rtol=1e-5, atol=1e-5)
    err = rel_l2(T[ids] @ W, y)
    assert 0.05 < err < 0.5  # 2 bits per value: lossy, but far from noise
    # Stored bytes: codes, codebooks, row scales and the S sub-space offsets (int32).
    # Plus two int64 shape constants of the decoding subgraph.
    expected = pq_nbytes(D, V, 4) + 4 * (D // 4) + 2 * 8
    assert layer["bytes_after"] == expected
    assert layer["bpw"] == pytest.approx(8 * expected / (V * D))
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)


def test_pq_on_a_matmul_weight_falls_back_to_rtn(tmp_path):
    model, T, W = table_model()
    res = qsdonnx.optimize(model, None, method="pq", bits=2, progress=False, min_elements=256,
                           validate=False)
    by = {l["name"]: l for l in res.report.layers}
    assert by["T"]["method"] == "pq"
    assert by["W"]["method"] == "rtn" and by["W"]["bits"] == 2


def test_pq_rejects_bits_it_cannot_store():
    model, _, _ = table_model()
    with pytest.raises(qsdonnx.ConfigError, match="pq"):
        qsdonnx.optimize(model, None, method="pq", bits=3, progress=False, validate=False)


def test_planner_offers_pq_for_large_tables():
    from qsdonnx.config import OptimizeConfig
    from qsdonnx.passes.base import WeightRecord
    from qsdonnx.passes.factorize import candidate_choices

    def labels(V):
        rec = WeightRecord(name="T", op="Gather", nodes=["emb"], shape=(V, 384), dtype="float32",
                           location="initializer", view="embedding", matrix_shape=(384, V))
        return [c.label() for c in candidate_choices(rec, OptimizeConfig(), False)]

    assert "pq 2b d=4" in labels(30522)
    assert not any(l.startswith("pq") for l in labels(1000))  # too few rows for 256 centroids


# ------------------------------------------------------------------------------------------
# bias correction
# ------------------------------------------------------------------------------------------
K, N = 256, 64


def biased_inputs(n=64, seed=0):
    """Inputs with a large common offset: the mean error μ·(W − Ŵ) dominates unless absorbed."""
    offset = 3.0 * np.random.default_rng(99).normal(size=K)
    return (offset + np.random.default_rng(seed).normal(size=(n, K))).astype(np.float32)


def matmul_add_model(shared_bias=False):
    W = randn((K, N), 11)
    b = randn((N,), 12)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["Y"], name="add")]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", N])]
    if shared_bias:
        nodes.append(helper.make_node("Add", ["Y", "b"], ["Z"], name="add2"))
        outputs = [helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["n", N])]
    return make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", K])],
                      outputs, [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])


def gemm_bias_model(alpha=0.5, beta=2.0):
    W = randn((N, K), 13)
    C = randn((N,), 14)
    node = helper.make_node("Gemm", ["X", "B", "C"], ["Y"], name="gemm", alpha=alpha, beta=beta, transB=1)
    return make_model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", K])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", N])],
                      [numpy_helper.from_array(W, "B"), numpy_helper.from_array(C, "C")])


def _mean_error(model, out_model, X):
    ref = run_model(model, {"X": X})[0]
    got = run_model(out_model, {"X": X})[0]
    return float(np.abs((got - ref).mean(axis=0)).max() / np.abs(ref).mean()), rel_l2(ref, got)


@pytest.mark.parametrize("build", [matmul_add_model, gemm_bias_model], ids=["matmul+add", "gemm"])
def test_bias_absorbs_the_mean_output_error(tmp_path, build):
    model = build()
    X = biased_inputs()
    np.savez(tmp_path / "calib.npz", X=X)
    common = dict(method="rtn", bits=2, block_size=64, symmetric=False, progress=False, validate=False)
    # Without calibration there is no mean to correct for: the baseline.
    plain = qsdonnx.optimize(model, None, **common)
    corrected = qsdonnx.optimize(model, None, calib=tmp_path / "calib.npz", **common)
    [layer] = corrected.report.layers
    assert layer.get("bias_corrected") is True
    # The last of the 8 calibration batches is held out for validation; the bias is fitted on the rest.
    X_fit = X[:56]
    mean_plain, err_plain = _mean_error(model, plain.model, X_fit)
    mean_corr, err_corr = _mean_error(model, corrected.model, X_fit)
    assert mean_plain > 0.02  # the uncorrected mean error is real ...
    assert mean_corr < 1e-4  # ... and gone (on the fitted calibration inputs, float round-off only)
    assert err_corr < 0.9 * err_plain
    # Held-out inputs from the same distribution keep most of the gain.
    Xt = biased_inputs(seed=1)
    assert _mean_error(model, corrected.model, Xt)[1] < _mean_error(model, plain.model, Xt)[1]


def test_shared_bias_is_left_alone():
    model = matmul_add_model(shared_bias=True)
    res = qsdonnx.optimize(model, None, method="rtn", bits=4, progress=False, validate=False)
    from qsdonnx.passes.base import Context
    rec = [r for r in res.report.layers if r["name"] == "W"][0]
    assert not rec.get("bias_corrected")
    # find_bias_slots itself: the bias is read by two nodes, so it cannot be rewritten.
    from qsdonnx.passes.base import WeightRecord
    w = WeightRecord(name="W", op="MatMul", nodes=["mm"], shape=(K, N), dtype="float32",
                     location="initializer", view="matmul", matrix_shape=(K, N))
    assert find_bias_slots(model, w) is None
    assert find_bias_slots(matmul_add_model(), w) == [("b", 1.0)]


# ------------------------------------------------------------------------------------------
# calibration skips padded positions
# ------------------------------------------------------------------------------------------
def _calibrate(model, calib, **cfg):
    from qsdonnx.api import _context
    from qsdonnx.config import OptimizeConfig
    from qsdonnx.passes.calibrate import CalibratePass
    from qsdonnx.passes.canonicalize import FindWeightsPass
    from qsdonnx.passes.aliases import FoldWeightAliasesPass
    from qsdonnx.passes.load import LoadPass

    ctx = _context(model, OptimizeConfig(calib=calib, progress=False, min_elements=16, **cfg))
    for p in (LoadPass(), FoldWeightAliasesPass(), FindWeightsPass(), CalibratePass()):
        p(ctx)
    return ctx


def token_model():
    W = randn((K, N), 21)
    b = randn((N,), 22)
    return make_model([helper.make_node("MatMul", ["X", "W"], ["h"], name="mm"),
                       helper.make_node("Add", ["h", "b"], ["Y"], name="add")],
                      [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "t", K]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "t", N])],
                      [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")])


def test_calibration_skips_padded_positions(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6, 10, K)).astype(np.float32)
    mask = np.ones((6, 10), np.int64)
    mask[:, 7:] = 0
    X[:, 7:] = 100.0  # padded positions: garbage no output depends on
    np.savez(tmp_path / "c.npz", X=X, attention_mask=mask)
    real = X[:, :7].reshape(-1, K).astype(np.float64)
    ctx = _calibrate(token_model(), tmp_path / "c.npz")
    stats = ctx.calibration["W"]
    assert stats["rows"] == real.shape[0] and ctx.calib_info["token_mask"] == "attention_mask"
    np.testing.assert_allclose(stats["mean"], real.mean(axis=0), rtol=1e-6, atol=1e-6)
    cov = real.T @ real / len(real) - np.outer(real.mean(0), real.mean(0))
    np.testing.assert_allclose(stats["H"], cov, rtol=1e-4, atol=1e-4)
    # --calib-mask none keeps every position.
    ctx = _calibrate(token_model(), tmp_path / "c.npz", calib_mask="none")
    assert ctx.calibration["W"]["rows"] == 60
    with pytest.raises(qsdonnx.InputError, match="calib-mask"):
        _calibrate(token_model(), tmp_path / "c.npz", calib_mask="no_such_input")


def test_calibration_keeps_two_halves_for_held_out_prediction(tmp_path):
    """With CALDERA, even batches make ``H_fit``, odd ones ``H_check`` (the planner fits its
    candidates on one and predicts their error on the other); both are the centred moments of
    their rows.  Other methods do not keep them."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(6, 10, K)).astype(np.float32)
    np.savez(tmp_path / "c.npz", X=X, attention_mask=np.ones((6, 10), np.int64))
    assert "H_fit" not in _calibrate(token_model(), tmp_path / "c.npz", calib_batch=2).calibration["W"]
    ctx = _calibrate(token_model(), tmp_path / "c.npz", calib_batch=2, method="caldera")
    stats = ctx.calibration["W"]
    rows = X.reshape(3, 20, K).astype(np.float64)  # three batches of 2 samples x 10 positions

    def cov(r):
        return r.T @ r / len(r) - np.outer(r.mean(0), r.mean(0))

    fit = np.concatenate([rows[0], rows[2]])
    np.testing.assert_allclose(stats["H_fit"], cov(fit), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["H_check"], cov(rows[1]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(stats["H"], cov(X.reshape(-1, K).astype(np.float64)), rtol=1e-4, atol=1e-4)
