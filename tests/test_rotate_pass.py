"""Rotated layer inputs (passes.rotate): the rewrite is exact, shared inputs rotate once, the
calibration statistics follow, the bytes are counted, and heavy-tailed weights lose less."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qsdonnx
from qsdonnx.api import _context
from qsdonnx.config import OptimizeConfig
from qsdonnx.factorize.rotation import random_orthogonal, rotate_input
from qsdonnx.passes.calibrate import CalibratePass
from qsdonnx.passes.canonicalize import FindWeightsPass
from qsdonnx.passes.aliases import FoldWeightAliasesPass
from qsdonnx.passes.load import LoadPass
from qsdonnx.passes.rotate import RotateInputsPass
from conftest import make_model, rel_l2, run_model, save

K, H1, N2, N3 = 64, 96, 32, 48


def model(heavy: bool = False):
    """X → {MatMul W1 (+bias) → Relu → Gemm W3ᵀ, MatMul W2}: X feeds two layers, the Relu one."""
    g = np.random.default_rng(0)
    draw = (lambda *s: g.standard_t(3, size=s)) if heavy else (lambda *s: g.normal(size=s))
    n = helper.make_node
    nodes = [n("MatMul", ["X", "W1"], ["a"], name="fc1"), n("Add", ["a", "b1"], ["b"], name="fc1_bias"),
             n("Relu", ["b"], ["c"], name="relu"), n("Gemm", ["c", "W3"], ["Y"], name="fc3", transB=1),
             n("MatMul", ["X", "W2"], ["Z"], name="fc2")]
    inits = [numpy_helper.from_array((draw(K, H1) / np.sqrt(K)).astype(np.float32), "W1"),
             numpy_helper.from_array((0.1 * g.normal(size=H1)).astype(np.float32), "b1"),
             numpy_helper.from_array((draw(K, N2) / np.sqrt(K)).astype(np.float32), "W2"),
             numpy_helper.from_array((draw(N3, H1) / np.sqrt(H1)).astype(np.float32), "W3")]
    vi = lambda name, d: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", d])
    return make_model(nodes, [vi("X", K)], [vi("Y", N3), vi("Z", N2)], inits, opset=17)


def inputs(count, seed):
    g = np.random.default_rng(seed)
    scale = np.random.default_rng(9).uniform(0.1, 4.0, K)  # uneven channels, the same for every seed
    return (g.normal(size=(count, K)) * scale + 0.3).astype(np.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("rotate")
    np.savez(d / "calib.npz", X=inputs(256, 1))
    return d


def rotated_context(calib, **kw):
    cfg = OptimizeConfig(calib=calib / "calib.npz", method="gptq", min_elements=256, progress=False, **kw)
    ctx = _context(model(), cfg)
    for p in (LoadPass(), FoldWeightAliasesPass(), FindWeightsPass(), CalibratePass(), RotateInputsPass()):
        p(ctx)
    return ctx


def test_rotated_graph_computes_the_original_and_shares_rotations(calib):
    ctx = rotated_context(calib)
    x = {"X": inputs(20, 5)}
    for ref, got in zip(run_model(model(), x), run_model(ctx.model, x)):
        assert rel_l2(ref, got) < 1e-5
    turns = [nd for nd in ctx.model.graph.node if nd.op_type == "MatMul" and nd.name.endswith(".qsd.rotate.matmul")]
    assert len(turns) == 2  # X (read by W1 and W2) once, the Relu output once
    assert ctx.rotation == {"block": 32, "inputs": 2, "layers": 3, "bytes": 32 * 32 * 4 + 2 * 8}
    assert all(r.extra.get("rotation_block") == 32 for r in ctx.records)


def test_statistics_are_those_of_the_rotated_input(calib):
    ctx = rotated_context(calib)
    Q = random_orthogonal(32, ctx.config.seed)
    X = np.load(calib / "calib.npz")["X"][:ctx.calib_info["samples"]].astype(np.float64)
    Xr = rotate_input(X, Q.astype(np.float64))
    stats = ctx.calibration["W2"]  # no bias: the plain second moment
    assert not stats["centered"]
    np.testing.assert_allclose(stats["H"], Xr.T @ Xr / len(X), rtol=1e-4, atol=1e-4 * np.abs(stats["H"]).max())
    w1 = ctx.calibration["W1"]  # a bias absorbs the mean: the covariance
    assert w1["centered"]
    C = np.cov(Xr.T, bias=True)
    np.testing.assert_allclose(w1["H"], C, rtol=1e-4, atol=1e-4 * np.abs(C).max())
    np.testing.assert_allclose(w1["mean"], Xr.mean(0), rtol=1e-5, atol=1e-6)


def test_budget_and_report_count_the_rotation(calib, tmp_path):
    src = save(model(), tmp_path / "m.onnx")
    rep = tmp_path / "r.json"
    qsdonnx.optimize(src, tmp_path / "o.onnx", method="gptq", bits_per_weight=7.0, calib=calib / "calib.npz",
                     min_elements=256, progress=False, validate=False, report=rep)
    r = json.loads(rep.read_text())
    t = r["totals"]
    rot = r["rotation"]["bytes"]
    assert rot == 32 * 32 * 4 + 2 * 8
    assert t["compressed_bytes_after"] == sum(l["bytes_after"] for l in r["layers"]
                                              if l["status"] == "compressed") + rot
    assert t["compressed_bytes_after"] <= 7.0 * t["compressed_elements"] / 8
    assert r["plan"]["spent_bytes"] <= r["plan"]["budget_bytes"]


def test_no_rotate_leaves_the_inputs(calib):
    m = qsdonnx.optimize(model(), method="gptq", bits=4, calib=calib / "calib.npz", rotate=False,
                         min_elements=256, progress=False, validate=False).model
    assert not any(".qsd.rotate" in nd.name for nd in m.graph.node)


@pytest.mark.parametrize("fmt", ["nbits"])
def test_formats_agree_on_rotated_layers(calib, fmt):
    kw = dict(method="gptq", bits=4, calib=calib / "calib.npz", min_elements=256, progress=False, validate=False)
    x = {"X": inputs(9, 6)}
    ref = run_model(qsdonnx.optimize(model(), **kw).model, x)
    got = run_model(qsdonnx.optimize(model(), format=fmt, **kw).model, x)
    for a, b in zip(ref, got):
        assert rel_l2(a, b) < 1e-4


def test_rotation_lowers_the_error_of_heavy_tailed_weights(tmp_path, calib):
    """3-bit GPTQ of weights with Student-t entries: held-out output error with rotated inputs
    is below that without."""
    src = save(model(heavy=True), tmp_path / "heavy.onnx")
    x = {"X": inputs(300, 11)}
    ref = run_model(model(heavy=True), x)
    err = {}
    for rotate in (False, True):
        m = qsdonnx.optimize(src, method="gptq", bits=3, calib=calib / "calib.npz", rotate=rotate, tune_epochs=0,
                             min_elements=256, progress=False, validate=False).model
        err[rotate] = max(rel_l2(a, b) for a, b in zip(ref, run_model(m, x)))
    assert err[True] < 0.85 * err[False]
