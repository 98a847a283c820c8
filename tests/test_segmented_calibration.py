"""Calibration of a model too large for one session: run segment by segment (passes.segments),
with boundary activations cached on disk and the finished matrices kept in files, it gives the
same statistics as one session, and the compressed model is the same."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qsdonnx
from qsdonnx.api import _context
from qsdonnx.config import OptimizeConfig
from qsdonnx.passes import calibrate, layer_stats
from qsdonnx.passes.aliases import FoldWeightAliasesPass
from qsdonnx.passes.calibrate import CalibratePass
from qsdonnx.passes.canonicalize import FindWeightsPass
from qsdonnx.passes.layer_stats import HessianAccumulator, LayerStats
from qsdonnx.passes.load import LoadPass
from qsdonnx.passes.segments import ActivationCache, cut
from conftest import make_model, rel_l2, run_model, save

K = 64


def chain_model():
    """X → MatMul W0 (+bias) → Relu → {q, k, v MatMuls reading one tensor} → Add → Reshape by a
    shape computed at the start (an int64 tensor crossing every boundary) → Gemm W4ᵀ, and an If
    whose branches read the Relu output from the outer graph."""
    g = np.random.default_rng(0)
    w = lambda *s: (g.normal(size=s) / np.sqrt(s[0])).astype(np.float32)
    n = helper.make_node
    branch = lambda name, op: helper.make_graph(
        [n(op, ["r", "r"], [f"{name}_y"])], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["n", K])])
    nodes = [n("Shape", ["X"], ["shape"], name="shape"),
             n("Constant", [], ["cond"], name="cond", value=numpy_helper.from_array(np.array(True), "c")),
             n("MatMul", ["X", "W0"], ["a"], name="fc0"), n("Add", ["a", "b0"], ["b"], name="fc0_bias"),
             n("Relu", ["b"], ["r"], name="relu"),
             n("MatMul", ["r", "Wq"], ["q"], name="q"), n("MatMul", ["r", "Wk"], ["k"], name="k"),
             n("MatMul", ["r", "Wv"], ["v"], name="v"),
             n("Add", ["q", "k"], ["qk"], name="add1"), n("Add", ["qk", "v"], ["s"], name="add2"),
             n("Reshape", ["s", "shape"], ["s2"], name="reshape"),
             n("Gemm", ["s2", "W4"], ["Y"], name="fc4", transB=1),
             n("If", ["cond"], ["Z"], name="branch", then_branch=branch("then", "Add"),
               else_branch=branch("else", "Mul"))]
    inits = [numpy_helper.from_array(w(K, K), "W0"), numpy_helper.from_array((0.1 * g.normal(size=K)).astype(np.float32), "b0"),
             numpy_helper.from_array(w(K, K), "Wq"), numpy_helper.from_array(w(K, K), "Wk"),
             numpy_helper.from_array(w(K, K), "Wv"), numpy_helper.from_array(w(48, K), "W4")]
    vi = lambda name, d: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", d])
    return make_model(nodes, [vi("X", K)],
                      [vi("Y", 48), vi("Z", K)], inits, opset=17)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("segments")
    g = np.random.default_rng(1)
    np.savez(d / "calib.npz", X=(g.normal(size=(64, K)) + 0.2).astype(np.float32))
    save(chain_model(), d / "chain.onnx")
    return d


def calibrated(calib, monkeypatch, segment_bytes=None, cache_bytes=None, spill_bytes=None, **kw):
    with monkeypatch.context() as m:
        if segment_bytes is not None:
            m.setattr(calibrate, "SEGMENT_BYTES", segment_bytes)
        if cache_bytes is not None:
            m.setattr(calibrate, "ACTIVATION_CACHE_BYTES", cache_bytes)
        if spill_bytes is not None:
            m.setattr(calibrate, "SPILL_BYTES", spill_bytes)
        cfg = OptimizeConfig(calib=calib / "calib.npz", min_elements=256, progress=False, **kw)
        ctx = _context(chain_model(), cfg)
        for p in (LoadPass(), FoldWeightAliasesPass(), FindWeightsPass(), CalibratePass()):
            p(ctx)
        return ctx


def test_segments_match_one_session(calib, monkeypatch):
    one = calibrated(calib, monkeypatch)
    seg = calibrated(calib, monkeypatch, segment_bytes=1, cache_bytes=0, spill_bytes=0)
    assert one.calib_info["segments"] == 1
    assert seg.calib_info["segments"] > 5  # a segment per weight at least
    assert sorted(one.calibration) == sorted(seg.calibration) == ["W0", "W4", "Wk", "Wq", "Wv"]
    # 64 samples in batches of 8, one batch held out: 56 rows.
    for name, a in one.calibration.items():
        b = seg.calibration[name]
        assert isinstance(b, LayerStats) and "H" in b.files  # kept on disk, read on access
        assert a["rows"] == b["rows"] == 56 and a["centered"] == b["centered"]
        np.testing.assert_allclose(b["H"], a["H"], rtol=1e-5, atol=1e-6 * float(np.abs(a["H"]).max()))
        np.testing.assert_allclose(b["mean"], a["mean"], rtol=1e-6, atol=1e-7)
    # W0 has a bias after it: its H is the centred one; q, k and v share one input.
    assert one.calibration["W0"]["centered"] and not one.calibration["Wq"]["centered"]
    np.testing.assert_array_equal(seg.calibration["Wq"]["H"], seg.calibration["Wv"]["H"])


def test_shared_statistics_stay_apart(calib, monkeypatch):
    """Layers sharing one input get statistics of their own: changing one leaves the others."""
    ctx = calibrated(calib, monkeypatch, segment_bytes=1, spill_bytes=0)
    before = ctx.calibration["Wk"]["H"]
    ctx.calibration["Wq"]["H"] = np.zeros_like(before)
    np.testing.assert_array_equal(ctx.calibration["Wk"]["H"], before)
    assert not ctx.calibration["Wq"]["H"].any()


def test_segmented_output_is_the_same_model(calib, monkeypatch, tmp_path):
    """GPTQ fitted to the segmented statistics gives the model fitted to one session's: the
    statistics agree to float rounding, so the layers' errors and the outputs do too."""
    outs = []
    for i, kw in enumerate(({}, {"segment_bytes": 1, "cache_bytes": 0, "spill_bytes": 0})):
        with monkeypatch.context() as m:
            for attr, value in (("SEGMENT_BYTES", kw.get("segment_bytes")), ("ACTIVATION_CACHE_BYTES", kw.get("cache_bytes")),
                                ("SPILL_BYTES", kw.get("spill_bytes"))):
                if value is not None:
                    m.setattr(calibrate, attr, value)
            out = tmp_path / f"out{i}.onnx"
            res = qsdonnx.optimize(calib / "chain.onnx", out, method="gptq", bits=4, calib=calib / "calib.npz",
                                   min_elements=256, tune_epochs=0, progress=False, rotate=False)
            outs.append((out, res.report))
    (a, ra), (b, rb) = outs
    errs = lambda r: {layer["name"]: layer["rel_error"] for layer in r.to_dict()["layers"]
                      if layer["status"] == "compressed"}
    ea, eb = errs(ra), errs(rb)
    assert sorted(ea) == sorted(eb) and len(ea) == 5
    for k in ea:
        assert eb[k] == pytest.approx(ea[k], rel=2e-2)
    feeds = {"X": np.random.default_rng(7).normal(size=(16, K)).astype(np.float32)}
    ya, yb, y = run_model(str(a), feeds)[0], run_model(str(b), feeds)[0], run_model(chain_model(), feeds)[0]
    assert rel_l2(y, yb) == pytest.approx(rel_l2(y, ya), rel=0.05)
    assert rel_l2(ya, yb) < 0.2 * rel_l2(y, ya)


def test_cut_boundaries():
    m = chain_model()
    segs = cut(m.graph, lambda i: 1, 3)
    assert [len(s.nodes) for s in segs] == [3, 3, 3, 3, 1]
    # The shape tensor computed by the first node is read by the Reshape in the fourth segment.
    assert "shape" in segs[0].outputs and "shape" in segs[3].inputs
    # The If's branches read "r" from the outer graph: it is an input of the If's segment.
    assert "r" in segs[4].inputs and "cond" in segs[4].inputs and "cond" in segs[0].outputs
    assert segs[0].initializers == ["W0"] and "b0" in segs[1].initializers


def test_activation_cache_spills_past_its_budget():
    cache = ActivationCache(budget=100)
    a, b = np.arange(10, dtype=np.float32), np.arange(50, dtype=np.float32)
    cache.put(0, "a", a)  # 40 bytes: in memory
    cache.put(0, "b", b)  # 200 bytes: on disk
    assert cache.held == 40 and len(cache.on_disk) == 1
    np.testing.assert_array_equal(cache.get(0, "b"), b)
    path = next(iter(cache.on_disk.values()))
    cache.drop({"b"})
    assert not path.exists() and (0, "b") not in cache and (0, "a") in cache
    cache.close()


def test_float32_accumulator_for_large_inputs(monkeypatch):
    """Past the float64 budget the sum is kept in float32 and added in place; it agrees with the
    float64 sum to float32 rounding."""
    g = np.random.default_rng(3)
    rows = [g.normal(size=(50, 32)).astype(np.float32) for _ in range(4)]
    wide = HessianAccumulator(32)
    monkeypatch.setattr(layer_stats, "FLOAT64_ACCUMULATOR_BYTES", 0)
    narrow = HessianAccumulator(32)
    assert wide.H.dtype != narrow.H.dtype
    for r in rows:
        wide.add(torch.from_numpy(r))
        narrow.add(torch.from_numpy(r))
    a, b = wide.result(centered=True), narrow.result(centered=True, in_place=True)
    np.testing.assert_allclose(b["H"], a["H"], rtol=1e-5, atol=1e-5)
    X = np.concatenate(rows).astype(np.float64)
    np.testing.assert_allclose(a["H"], np.cov(X.T, bias=True), rtol=1e-5, atol=1e-6)
