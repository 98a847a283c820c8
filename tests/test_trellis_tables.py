"""Trellis-coded Gather tables end to end in ONNX Runtime: the graph decodes exactly the rows
the factorization holds (exact rows included), in every format and for int32 or int64 ids, and
stores what the report counts."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qsdonnx
from conftest import make_model, randn, rel_l2, run_model, save
from qsdonnx.buildops import find_ops_library
from qsdonnx.factorize.trellis import trellis_factorize, trellis_nbytes

V, D = 4096, 32


def table_model(id_type=TensorProto.INT64):
    rng = np.random.default_rng(5)
    T = (rng.normal(size=(V, D)) @ rng.normal(size=(D, D)) / np.sqrt(D)).astype(np.float32)
    W = randn((D, 16), 6)
    model = make_model([helper.make_node("Gather", ["T", "ids"], ["e"], name="emb"),
                        helper.make_node("MatMul", ["e", "W"], ["Y"], name="proj")],
                       [helper.make_tensor_value_info("ids", id_type, ["b", "t"])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", "t", 16])],
                       [numpy_helper.from_array(T, "T"), numpy_helper.from_array(W, "W")], opset=17)
    return model, T, W


FORMATS = ["qdq", "nbits"] + (["fused"] if find_ops_library() is not None else [])


def ids_with_exact_rows(exact):
    """Ids that include two of the exact rows (one twice, once counted from the end) beside coded
    rows, one of them also counted from the end."""
    e0, e1 = (int(v) for v in exact[:2])
    return np.array([[0, 4095, e0, 3, e1], [128, -1, 2000, e0 - V, 9]])


@pytest.mark.parametrize("fmt", FORMATS)
def test_trellis_table_decodes_to_the_factorization(tmp_path, fmt):
    model, T, W = table_model()
    src = save(model, tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    res = qsdonnx.optimize(src, dst, method="trellis", format=fmt, progress=False, exclude=("W",), validate=False)
    [layer] = [l for l in res.report.layers if l["name"] == "T"]
    assert layer["status"] == "compressed" and layer["method"] == "trellis"
    f = trellis_factorize(T.T.copy(), seed=0)
    assert len(f.q.exact_rows) == V // 1024
    ids = ids_with_exact_rows(f.q.exact_rows)
    y = run_model(dst, {"ids": ids})[0]
    rows = f.dense().T
    np.testing.assert_allclose(y, rows[ids] @ W, rtol=1e-5, atol=1e-5)
    e0 = ids[0, 2]
    exact = T[e0].astype(np.float16).astype(np.float32) @ W
    np.testing.assert_allclose(y[0, 2], exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[1, 3], exact, rtol=1e-5, atol=1e-5)  # the same row, as e0 - V
    assert 0.05 < rel_l2(T[ids] @ W, y) < 0.4  # 2 bits per value
    # Stored: symbols, lookup table, row scales, exact rows; plus the decoding subgraph's small
    # constants (unpacking: a uint8 mask, 3 uint8 shifts, 4 int64; states: the history length,
    # the axis and 4 slice starts and ends in int64, and 4 int32 weights; negative ids: 2 int64)
    consts = 1 + 3 + 4 * 8 + (2 + 8) * 8 + 4 * 4 + 2 * 8
    assert layer["bytes_after"] == trellis_nbytes(D, V) + consts
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)


def test_int32_ids(tmp_path):
    model, T, W = table_model(TensorProto.INT32)
    out = qsdonnx.optimize(save(model, tmp_path / "in.onnx"), tmp_path / "out.onnx", method="trellis",
                           exclude=("W",), validate=False, progress=False)
    f = trellis_factorize(T.T.copy(), seed=0)
    ids = ids_with_exact_rows(f.q.exact_rows)
    y = run_model(tmp_path / "out.onnx", {"ids": ids.astype(np.int32)})[0]
    np.testing.assert_allclose(y, f.dense().T[ids] @ W, rtol=1e-5, atol=1e-5)
    assert out.report.totals["weights_compressed"] == 1


def test_trellis_falls_back_to_rtn_off_tables_and_the_planner_offers_it():
    from qsdonnx.config import OptimizeConfig
    from qsdonnx.passes.base import WeightRecord
    from qsdonnx.passes.factorize import candidate_choices

    model, _, _ = table_model()
    res = qsdonnx.optimize(model, None, method="trellis", bits=4, progress=False, min_elements=256, validate=False)
    by = {l["name"]: l for l in res.report.layers}
    assert by["T"]["method"] == "trellis" and by["W"]["method"] == "rtn" and by["W"]["bits"] == 4

    def labels(V, method="auto"):
        rec = WeightRecord(name="T", op="Gather", nodes=["emb"], shape=(V, 384), dtype="float32",
                           location="initializer", view="embedding", matrix_shape=(384, V))
        return [c.label() for c in candidate_choices(rec, OptimizeConfig(method=method), False)]

    assert "trellis 2b" in labels(30522) and "pq 2b d=4" in labels(30522)
    assert labels(30522, "trellis") == ["trellis 2b"]
    assert "trellis 2b" not in labels(1000)  # too few rows for one shared lookup table
    # a table of 128k rows of 4096: offered only when asked for (minutes of Viterbi search)
    big = WeightRecord(name="T", op="Gather", nodes=["emb"], shape=(131072, 4096), dtype="float32",
                       location="initializer", view="embedding", matrix_shape=(4096, 131072))
    assert "trellis 2b" not in [c.label() for c in candidate_choices(big, OptimizeConfig(), False)]
    assert [c.label() for c in candidate_choices(big, OptimizeConfig(method="trellis"), False)] == ["trellis 2b"]
