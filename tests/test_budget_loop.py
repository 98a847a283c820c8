"""With a budget and --max-rel-error, the planner spends more bits until the end-to-end error is met."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qsdonnx
from qsdonnx.errors import ValidationFailed


def _two_layers() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    W1 = rng.standard_normal((128, 96)).astype(np.float32)
    W2 = rng.standard_normal((96, 64)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
                      h.make_node("Relu", ["a"], ["r"], name="relu"),
                      h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", 128])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 64])],
                     [nh.from_array(W1, "W1"), nh.from_array(W2, "W2")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_budget_grows_until_the_error_is_met():
    base = qsdonnx.optimize(_two_layers(), method="rtn", bits_per_weight=2.5, progress=False, min_elements=1)
    assert base.report.validation["max_rel_l2"] > 0.05
    res = qsdonnx.optimize(_two_layers(), method="rtn", bits_per_weight=2.5, max_rel_error=0.05,
                           progress=False, min_elements=1)
    assert res.passed
    assert res.report.validation["max_rel_l2"] <= 0.05
    assert res.report.plan["budget_bpw"] > 2.5
    assert res.report.totals["bits_per_weight"] <= res.report.plan["budget_bpw"]


def test_unreachable_error_fails_saying_what_was_reached():
    with pytest.raises(ValidationFailed, match=r"reached at [0-9.]+ bits per weight"):
        qsdonnx.optimize(_two_layers(), method="rtn", bits_per_weight=2.5, max_rel_error=1e-7,
                         progress=False, min_elements=1)
