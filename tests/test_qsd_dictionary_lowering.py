"""QSD sub-vector codes in ONNX Runtime: the lowered graph computes with exactly the weight the
factorization rebuilds, the file holds the bytes the report counts, and the planner offers
the form under ``--method qsd``."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qsdonnx
from qsdonnx.config import OptimizeConfig
from qsdonnx.factorize.qsd_dictionary import DictionaryMatrix, qsd_dictionary
from qsdonnx.graph import GraphEdit, tensor_nbytes
from qsdonnx.passes.base import WeightRecord
from qsdonnx.passes.factorize import QSD_FORMS, candidate_choices
from qsdonnx.passes.lower_qdq import QdqEmitter
from qsdonnx.runtime import session

from conftest import conv3x3_model as conv_model

LEVELS = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def decode_model(m: DictionaryMatrix) -> tuple[onnx.ModelProto, int]:
    """A graph whose output is the lowered weight, and the bytes of the weight's own
    initializers (the decoding constants every weight shares aside)."""
    K, N = m.shape
    g = h.make_graph([], "decode", [], [])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    edit = GraphEdit(model)
    rec = WeightRecord(name="W", op="MatMul", nodes=[], shape=(K, N), dtype="float32",
                       location="initializer", view="matmul", matrix_shape=(K, N))
    em = QdqEmitter(edit, rec, None)
    out = em.dequant("Q", m, False)
    model.graph.node.extend(em.prelude)
    edit.commit()
    model.graph.output.append(h.make_tensor_value_info(out, T.FLOAT, [K, N]))
    own = sum(tensor_nbytes(t) for t in model.graph.initializer if t.name.startswith("W.qsd."))
    return model, own


@pytest.mark.parametrize("K,N,dim,atoms,bits,keep", [(64, 40, 4, 64, 3, 1), (128, 12, 2, 128, 4, 1),
                                                      (96, 16, 4, 32, 2, 2), (64, 24, 2, 128, 5, 1), (128, 64, 4, 256, 4, 1)])
def test_decoded_weight_equals_the_factorization(K, N, dim, atoms, bits, keep):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((K, N)).astype(np.float32)
    f = qsd_dictionary(W, None, dim, atoms, bits, keep=keep, rounds=1)
    model, stored = decode_model(f.q)
    for level in LEVELS:
        got = session(model, graph_optimization_level=level).run(None, {})[0]
        np.testing.assert_allclose(got, f.dense(), rtol=1e-6, atol=1e-7)
    assert stored == f.nbytes()


def mlp(K=256, H=384, N=128, seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    W1 = rng.standard_t(4, size=(K, H)).astype(np.float32) / 8
    W2 = rng.standard_t(4, size=(H, N)).astype(np.float32) / 8
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
                      h.make_node("Relu", ["a"], ["r"], name="relu"),
                      h.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")], "mlp",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", K])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", N])],
                     [nh.from_array(W1, "W1"), nh.from_array(W2, "W2")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_method_qsd_plans_sub_vector_codes_within_the_budget(tmp_path):
    model = mlp()
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((512, 256)).astype(np.float32))
    res = qsdonnx.optimize(model, method="qsd", bits_per_weight=4.5, calib=str(calib), validate=False,
                           progress=False, min_elements=16, tune_epochs=0)
    layers = {l["name"]: l for l in res.report.layers}
    assert all(l["status"] == "compressed" for l in layers.values())
    assert all(l["atoms"] for l in layers.values())
    plan = res.report.plan
    assert plan["spent_bytes"] <= plan["budget_bytes"]
    x = rng.standard_normal((8, 256)).astype(np.float32)
    want = session(model).run(None, {"x": x})[0]
    got = session(res.model).run(None, {"x": x})[0]
    # Heavy-tailed random weights at 4.5 bits per weight (2-row vectors): about 0.18
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 0.3


def test_candidates_under_method_qsd():
    rec = WeightRecord(name="W", op="MatMul", nodes=["mm"], shape=(384, 384), dtype="float32",
                       location="initializer", view="matmul", matrix_shape=(384, 384))
    cands = candidate_choices(rec, OptimizeConfig(method="qsd", bits_per_weight=3.0), True)
    forms = {(c.block_size, c.atoms, c.bits) for c in cands if c.atoms}
    assert forms == set(QSD_FORMS.values())
    assert any(c.rank for c in cands)  # the low-rank forms stay on offer
    # nominal bits per weight: (log2 atoms + coefficient bits) / length, plus the small parts
    for bpw, (dim, atoms, bits) in QSD_FORMS.items():
        c = next(c for c in cands if (c.block_size, c.atoms, c.bits) == (dim, atoms, bits))
        assert bpw < 8 * c.nbytes(384, 384, OptimizeConfig()) / 384 ** 2 < bpw + 0.2
    # --sparsity asks for the low-rank form with sparse factors
    sparse = candidate_choices(rec, OptimizeConfig(method="qsd", bits_per_weight=3.0, sparsity=0.5), True)
    assert sparse and not any(c.atoms for c in sparse)
    # not offered by default, nor to Gather tables
    assert not any(c.atoms for c in candidate_choices(rec, OptimizeConfig(), True))
    table = WeightRecord(name="E", op="Gather", nodes=["g"], shape=(30522, 384), dtype="float32",
                         location="initializer", view="embedding", matrix_shape=(384, 30522))
    assert not any(c.atoms for c in candidate_choices(table, OptimizeConfig(method="qsd", bits_per_weight=3.0), True))


def matmul_model(K=128, N=48) -> onnx.ModelProto:
    W = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
                     [h.make_tensor_value_info("x", T.FLOAT, [3, K])],
                     [h.make_tensor_value_info("y", T.FLOAT, [3, N])], [nh.from_array(W, "W")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("make", [matmul_model, conv_model], ids=["matmul", "conv"])
def test_method_qsd_at_fixed_bits_codes_sub_vectors(make, bits):
    from qsdonnx.api import _context
    from qsdonnx.passes.calibrate import CalibratePass
    from qsdonnx.passes.canonicalize import FindWeightsPass
    from qsdonnx.passes.factorize import FactorizeWeightsPass, PlanPass
    from qsdonnx.passes.aliases import FoldWeightAliasesPass
    from qsdonnx.passes.load import LoadPass

    model = make()
    cfg = dict(method="qsd", bits=bits, progress=False, min_elements=16, rotate=False)
    res = qsdonnx.optimize(model, validate=False, **cfg)
    layer = res.report.layers[0]
    dim, atoms, coef = QSD_FORMS[float(bits)]
    assert (layer["method"], layer["block_size"], layer["atoms"], layer["bits"]) == ("qsd", dim, atoms, coef)
    # the same pipeline up to the factorization gives the weight the graph must compute with
    ctx = _context(model, OptimizeConfig(**cfg))
    for p in (LoadPass(), FoldWeightAliasesPass(), FindWeightsPass(), CalibratePass(), PlanPass(),
              FactorizeWeightsPass()):
        p(ctx)
    What = ctx.factorizations["W"].dense()
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    W = next(t for t in ref.graph.initializer if t.name == "W")
    shape = tuple(W.dims)
    W.CopyFrom(nh.from_array((What if len(shape) == 2 else What.T.reshape(shape)).astype(np.float32), "W"))
    x_shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(5).standard_normal(x_shape).astype(np.float32)
    want = session(ref).run(None, {"x": x})[0]
    for level in LEVELS:
        got = session(res.model, graph_optimization_level=level).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
