"""Sparse quantized factors (QSD with --sparsity) are stored as values + row indices and rebuilt
in the graph exactly as the factorization defines them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qsdonnx
from qsdonnx.runtime import session


def _matmul(W: np.ndarray) -> onnx.ModelProto:
    K, N = W.shape
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", K])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", N])], [nh.from_array(W, "W")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("fmt", ["qdq", "nbits"])
def test_sparse_qsd_factors_rebuilt_exactly(fmt):
    rng = np.random.default_rng(0)
    K, N, r = 96, 80, 8
    W = (rng.standard_normal((K, r)) * (rng.random((K, r)) < 0.5)) @ rng.standard_normal((r, N))
    W = W.astype(np.float32)
    res = qsdonnx.optimize(_matmul(W), method="qsd", rank=r, bits=4, block_size=16, sparsity=0.75,
                           format=fmt, validate=False, progress=False, min_elements=1)
    ops = {n.op_type for n in res.model.graph.node}
    assert "ScatterElements" in ops  # the sparse factor is rebuilt in the graph, not stored dense
    # Feeding the identity reads the rebuilt weight Ŵ straight out of the model.
    What = session(res.model).run(None, {"x": np.eye(K, dtype=np.float32)})[0]
    layer = next(l for l in res.report.layers if l["status"] == "compressed")
    rel = np.linalg.norm(W - What) / np.linalg.norm(W)
    assert rel == pytest.approx(layer["rel_error"], rel=1e-4, abs=1e-6)
    assert np.linalg.matrix_rank(What, tol=1e-4 * np.abs(What).max()) <= r
    # Three quarters of each factor column are zero and not stored: fewer bytes than dense factors.
    dense = qsdonnx.optimize(_matmul(W), method="qsd", rank=r, bits=4, block_size=16, validate=False,
                             progress=False, min_elements=1)
    assert layer["bytes_after"] < next(l for l in dense.report.layers if l["status"] == "compressed")["bytes_after"]
