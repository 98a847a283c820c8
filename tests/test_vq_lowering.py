"""Vector-coded weights in ONNX Runtime: the lowered graph computes with exactly the weight the
factorization rebuilds, for MatMul and Conv, with and without graph optimizations."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qsdonnx
from qsdonnx.api import _context
from qsdonnx.config import OptimizeConfig
from qsdonnx.factorize.vq import VectorQuantizedMatrix
from qsdonnx.passes.calibrate import CalibratePass
from qsdonnx.passes.canonicalize import FindWeightsPass
from qsdonnx.passes.factorize import FactorizeWeightsPass, PlanPass
from qsdonnx.passes.aliases import FoldWeightAliasesPass
from qsdonnx.passes.load import LoadPass
from qsdonnx.runtime import session

from conftest import conv3x3_model as conv_model

LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def matmul_model(K=128, N=40) -> onnx.ModelProto:
    W = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", K])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", N])], [nh.from_array(W, "W")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def rebuilt(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """``model`` with W replaced by the weight its vector-code factorization rebuilds."""
    ctx = _context(model, OptimizeConfig(method="vq", bits=bits, progress=False, min_elements=16))
    for p in (LoadPass(), FoldWeightAliasesPass(), FindWeightsPass(), CalibratePass(), PlanPass(), FactorizeWeightsPass()):
        p(ctx)
    f = ctx.factorizations["W"]
    assert isinstance(f.q, VectorQuantizedMatrix)
    What = f.dense()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    W = next(t for t in out.graph.initializer if t.name == "W")
    shape = tuple(W.dims)
    values = What if len(shape) == 2 else What.T.reshape(shape)  # conv view: (C·kh·kw, O)
    W.CopyFrom(nh.from_array(values.astype(np.float32), "W"))
    return out


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("make", [matmul_model, conv_model], ids=["matmul", "conv"])
def test_runtime_computes_with_the_rebuilt_weight(make, bits):
    model = make()
    # Unrotated, like the factorization that ``rebuilt`` computes.
    res = qsdonnx.optimize(model, method="vq", bits=bits, validate=False, progress=False, min_elements=16,
                           rotate=False)
    layer = res.report.layers[0]
    assert layer["method"] == "vq" and layer["bits"] == bits
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    want = session(rebuilt(model, bits)).run(None, {"x": x})[0]
    for level in LEVELS:
        got = session(res.model, graph_optimization_level=level).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # no float copy of the weight is stored: the file holds the codes
    assert layer["bytes_after"] < 0.25 * layer["bytes_before"]


def test_vector_codes_are_offered_only_when_asked_for():
    from qsdonnx.passes.base import WeightRecord
    from qsdonnx.passes.factorize import candidate_choices

    rec = WeightRecord(name="W", op="MatMul", nodes=["mm"], shape=(384, 384), dtype="float32",
                       location="initializer", view="matmul", matrix_shape=(384, 384))
    for fmt in ("qdq", "nbits", "fused"):
        assert "vq" not in {c.method for c in candidate_choices(rec, OptimizeConfig(format=fmt), True)}
        asked = candidate_choices(rec, OptimizeConfig(method="vq", format=fmt), True)
        assert {(c.method, c.bits) for c in asked} == {("vq", 2), ("vq", 3), ("vq", 4)}
