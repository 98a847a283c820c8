"""End-to-end tuning (passes.tune) on a small MLP, checked in ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import qsdonnx
from conftest import make_model, rel_l2, run_model, save

K, H1, N = 64, 128, 32


def mlp():
    """MatMul+bias → Relu → MatMul+bias (a Constant node) → LayerNorm."""
    g = np.random.default_rng(0)
    n = helper.make_node
    b2 = numpy_helper.from_array((0.1 * g.normal(size=N)).astype(np.float32), "b2v")
    nodes = [n("MatMul", ["X", "W1"], ["h0"], name="fc1"), n("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             n("Relu", ["h1"], ["h2"], name="relu"), n("MatMul", ["h2", "W2"], ["y0"], name="fc2"),
             n("Constant", [], ["b2"], name="b2c", value=b2), n("Add", ["y0", "b2"], ["y1"], name="fc2_bias"),
             n("LayerNormalization", ["y1", "g", "b"], ["Y"], name="ln", axis=-1)]
    inits = [numpy_helper.from_array((g.normal(size=(K, H1)) / np.sqrt(K)).astype(np.float32), "W1"),
             numpy_helper.from_array((0.1 * g.normal(size=H1)).astype(np.float32), "b1"),
             numpy_helper.from_array((g.normal(size=(H1, N)) / np.sqrt(H1)).astype(np.float32), "W2"),
             numpy_helper.from_array((1 + 0.1 * g.normal(size=N)).astype(np.float32), "g"),
             numpy_helper.from_array((0.1 * g.normal(size=N)).astype(np.float32), "b")]
    return make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", K])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", N])], inits, opset=17)


def inputs(count, seed):
    g = np.random.default_rng(seed)
    scale = np.random.default_rng(99).uniform(0.2, 3.0, K)  # the same input distribution for every seed
    return (g.normal(size=(count, K)) * scale + 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    src = save(mlp(), d / "mlp.onnx")
    np.savez(d / "calib.npz", X=inputs(160, 1))
    out = {}
    for epochs in (0, 80):
        dst = d / f"out{epochs}.onnx"
        report = d / f"r{epochs}.json"
        qsdonnx.optimize(src, dst, method="rtn", bits=2, block_size=32, calib=d / "calib.npz",
                         tune_epochs=epochs, min_elements=256, progress=False, validate=False, report=report)
        out[epochs] = (dst, json.loads(report.read_text()))
    return src, out


def test_tuning_lowers_the_error_on_new_inputs_at_the_same_size(runs):
    src, out = runs
    (plain, _), (tuned, rep) = out[0], out[80]
    assert tuned.stat().st_size == plain.stat().st_size
    assert rep["totals"]["compressed_bytes_after"] == out[0][1]["totals"]["compressed_bytes_after"]
    fresh = {"X": inputs(400, 7)}  # neither calibrated nor tuned on
    ref = run_model(src, fresh)[0]
    e_plain = rel_l2(ref, run_model(plain, fresh)[0])
    e_tuned = rel_l2(ref, run_model(tuned, fresh)[0])
    assert e_tuned < 0.93 * e_plain, (e_plain, e_tuned)


def test_the_report_records_the_held_out_error_and_keeps_the_best(runs):
    src, out = runs
    t = out[80][1]["tuning"]
    h = t["held_out_loss"]
    assert len(h) == 81 and t["kept"] and min(h) < 0.9 * h[0]
    assert t["layers"] == 2 and t["graph_parameters"] == 4  # b1, the Constant b2, LayerNorm g and b
    assert out[0][1]["tuning"] == {}
    # The kept model's error on the held-out samples (every fifth calibration sample) is the
    # best epoch's, in ONNX Runtime.
    X = inputs(160, 1)[4::5]
    ref = run_model(src, {"X": X})[0]
    got = run_model(out[80][0], {"X": X})[0]
    measured = float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
    assert measured == pytest.approx(min(h), rel=0.05)
    layers = {l["name"]: l for l in out[80][1]["layers"]}
    plain = {l["name"]: l for l in out[0][1]["layers"]}
    assert layers["W1"]["rel_error"] != plain["W1"]["rel_error"]  # measured again after tuning


def test_tuning_needs_calibration_data_and_known_operators(tmp_path):
    src = save(mlp(), tmp_path / "mlp.onnx")
    res = qsdonnx.optimize(src, tmp_path / "o.onnx", method="rtn", bits=2, tune_epochs=4, min_elements=256,
                           progress=False, validate=False)
    assert res.report.tuning == {}  # no --calib: nothing to fit to
    model = mlp()
    model.graph.node[-1].output[0] = "ln_out"
    model.graph.node.append(helper.make_node("Softsign", ["ln_out"], ["Y"], name="softsign"))
    src = save(model, tmp_path / "softsign.onnx")
    np.savez(tmp_path / "c.npz", X=inputs(40, 1))
    res = qsdonnx.optimize(src, tmp_path / "o2.onnx", method="rtn", bits=2, calib=tmp_path / "c.npz",
                           tune_epochs=4, min_elements=256, progress=False, validate=False)
    assert res.report.tuning == {"skipped": "no torch evaluation of Softsign"}
    assert "end-to-end tuning skipped: no torch evaluation of Softsign" in res.report.format_table()
