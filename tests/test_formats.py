"""The nbits and fused lowerings compute what the portable qdq lowering computes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qsdonnx
from qsdonnx.buildops import find_ops_library
from qsdonnx.runtime import session

LEVELS = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]


def _mlp_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    W1 = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    W2 = (rng.standard_normal((192, 256)) * 0.05).astype(np.float32)  # Gemm transB
    C2 = rng.standard_normal(192).astype(np.float32)
    b1 = rng.standard_normal(256).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "W1"], ["m"], name="mm"),
             h.make_node("Add", ["m", "b1"], ["a"], name="bias"),
             h.make_node("Relu", ["a"], ["r"], name="relu"),
             h.make_node("Gemm", ["r", "W2", "C2"], ["y"], name="gemm", transB=1, alpha=0.7, beta=1.5)]
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["n", 128])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 192])],
                     [nh.from_array(W1, "W1"), nh.from_array(W2, "W2"), nh.from_array(C2, "C2"),
                      nh.from_array(b1, "b1")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray, level) -> np.ndarray:
    return session(model, graph_optimization_level=level).run(None, {"x": x})[0]


def _compress(model, fmt: str, **kw) -> onnx.ModelProto:
    return qsdonnx.optimize(model, format=fmt, validate=False, progress=False, min_elements=1024, **kw).model


CASES = [
    dict(method="rtn", bits=4, symmetric=True),
    dict(method="rtn", bits=4, symmetric=False),
    dict(method="rtn", bits=8, block_size=64),
    dict(method="rtn", bits=2, block_size=16),
    dict(method="lplr", bits=4, rank=24),
    dict(method="rtn", bits=3, symmetric=True),
    dict(method="rtn", bits=3, symmetric=False, block_size=64),
    dict(method="lplr", bits=3, rank=24),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_nbits_matches_qdq(case):
    model = _mlp_model()
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)
    ref = _run(_compress(model, "qdq", **case), x, LEVELS[0])
    nb = _compress(model, "nbits", **case)
    assert sum(n.op_type == "MatMulNBits" for n in nb.graph.node) >= 2
    for level in LEVELS:
        np.testing.assert_allclose(_run(nb, x, level), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.skipif(find_ops_library() is None, reason="custom-op library not built (qsdonnx build-ops)")
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fused_matches_qdq(case):
    model = _mlp_model()
    x = np.random.default_rng(1).standard_normal((7, 128)).astype(np.float32)
    ref = _run(_compress(model, "qdq", **case), x, LEVELS[0])
    fused = _compress(model, "fused", **case)
    assert sum(n.op_type == "QsdMatMul" for n in fused.graph.node) == 2
    # The MatMul's bias Add and the Gemm's beta·C are folded into the op.
    products = {o for n in fused.graph.node if n.op_type == "QsdMatMul" for o in n.output}
    assert not any(n.op_type == "Add" and products & set(n.input) for n in fused.graph.node)
    for level in LEVELS:
        np.testing.assert_allclose(_run(fused, x, level), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_nbits_falls_back_for_dense_factors():
    model = _mlp_model()
    res = qsdonnx.optimize(model, method="svd", rank=16, format="nbits", validate=False, progress=False,
                           min_elements=1024)
    assert not any(n.op_type == "MatMulNBits" for n in res.model.graph.node)
    rows = [l for l in res.report.layers if l["status"] == "compressed"]
    assert rows and all("dense factor" in " ".join(l.get("fallback", [])) for l in rows)


@pytest.mark.parametrize("K,N,symmetric", [(64, 6625, True), (120, 65, False), (96, 66, True)])
def test_two_bit_weights_decode_exactly_at_any_width(K, N, symmetric):
    """2-bit codes whose row length is not a multiple of 4 (ONNX Runtime mis-decodes those)."""
    rng = np.random.default_rng(K + N)
    W = rng.standard_normal((K, N)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", K])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", N])], [nh.from_array(W, "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    res = qsdonnx.optimize(m, method="rtn", bits=2, symmetric=symmetric, validate=False, progress=False,
                           min_elements=1)
    What = session(res.model).run(None, {"x": np.eye(K, dtype=np.float32)})[0]
    rel = np.linalg.norm(W - What) / np.linalg.norm(W)
    assert rel == pytest.approx(res.report.layers[0]["rel_error"], rel=1e-5)
    assert rel < 0.45


def test_two_bit_conv_with_odd_kernel_length_decodes_exactly():
    rng = np.random.default_rng(5)
    Wc = rng.standard_normal((64, 3, 3, 3)).astype(np.float32)  # K = 27 along the blocked axis
    g = h.make_graph([h.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 64, 8, 8])], [nh.from_array(Wc, "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    res = qsdonnx.optimize(m, method="rtn", bits=2, validate=False, progress=False, min_elements=1)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    got = session(res.model).run(None, {"x": x})[0]
    import torch
    Wq = torch.from_numpy(np.ascontiguousarray(Wc))
    ref = torch.nn.functional.conv2d(torch.from_numpy(x), Wq, padding=1).numpy()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.6  # 2-bit, but decoded (a mis-decoded weight gives errors above 1)
