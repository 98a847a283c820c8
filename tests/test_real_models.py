"""The acceptance numbers on the real models, measured on held-out evaluation data.

Calibration data (``calib_inputs``) and evaluation data (``eval_inputs``) are disjoint sets of
sentences / text lines written for this project (``models/data.py``).
"""
from __future__ import annotations

import numpy as np
import pytest

import qsdonnx
from qsdonnx.buildops import find_ops_library
from qsdonnx.runtime import session

models = pytest.importorskip("models")
from models import minilm, ppocr  # noqa: E402

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def minilm_path():
    return minilm.build()


@pytest.fixture(scope="module")
def minilm_ref(minilm_path):
    feeds = minilm.eval_inputs()
    return feeds, minilm.embed(str(minilm_path), feeds)


@pytest.fixture(scope="module")
def minilm_calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "minilm_calib.npz"
    np.savez(p, **minilm.calib_inputs())
    return p


@pytest.fixture(scope="module")
def rec_path():
    return ppocr.rec_path()


@pytest.fixture(scope="module")
def rec_ref(rec_path):
    x = ppocr.rec_eval_inputs()
    texts, cs = ppocr.rec_eval_texts(), ppocr.charset()
    out = session(str(rec_path)).run(None, x)[0]
    return x, texts, cs, ppocr.score_rec(out, texts, cs)


@pytest.fixture(scope="module")
def rec_calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "rec_calib.npz"
    np.savez(p, **ppocr.rec_calib_inputs())
    return p


def _minilm_score(model_path, minilm_ref):
    feeds, ref = minilm_ref
    return minilm.score(ref, minilm.embed(session(str(model_path)), feeds))


def _rec_score(model_path, rec_ref):
    x, texts, cs, _ = rec_ref
    return ppocr.score_rec(session(str(model_path)).run(None, x)[0], texts, cs)


def test_minilm_rtn4(minilm_path, minilm_ref, tmp_path):
    out = tmp_path / "m.onnx"
    res = qsdonnx.optimize(minilm_path, out, method="rtn", bits=4, validate=False, progress=False)
    assert res.report.totals["weights_compressed"] == 37  # 36 MatMul weights + the word embeddings
    assert res.report.totals["bits_per_weight"] <= 4.7
    s = _minilm_score(out, minilm_ref)
    assert s["mean_cosine"] >= 0.97, s
    assert s["nn_agreement"] >= 0.95, s


@pytest.mark.parametrize("method", ["svd", "lplr"])
def test_minilm_lowrank_methods_run_and_are_honest(method, minilm_path, minilm_ref, tmp_path):
    out = tmp_path / "m.onnx"
    res = qsdonnx.optimize(minilm_path, out, method=method, bits_per_weight=6.0, validate=False, progress=False)
    t = res.report.totals
    assert t["bits_per_weight"] <= 6.0
    # Counted from the stored initializers, the same way as the planner counts them.
    layers = [l for l in res.report.layers if l["status"] == "compressed"]
    assert t["compressed_bytes_after"] == sum(l["bytes_after"] for l in layers)
    s = _minilm_score(out, minilm_ref)
    # Low rank loses on weights without fast spectral decay: it still runs, and is far from exact.
    assert 0.0 < s["mean_cosine"] < 0.999, s


def test_ppocr_rec_rtn8(rec_path, rec_ref, tmp_path):
    out = tmp_path / "r.onnx"
    res = qsdonnx.optimize(rec_path, out, method="rtn", bits=8, validate=False, progress=False)
    locs = {l["location"] for l in res.report.layers if l["status"] == "compressed"}
    assert locs == {"constant-node"}  # Paddle keeps every weight in a Constant node
    assert out.stat().st_size <= 0.30 * rec_path.stat().st_size
    base = rec_ref[3]["cer"]
    assert _rec_score(out, rec_ref)["cer"] <= base + 0.005


def test_minilm_formats_agree(minilm_path, minilm_ref, tmp_path):
    feeds, _ = minilm_ref
    embs = {}
    fmts = ["qdq", "nbits"] + (["fused"] if find_ops_library() is not None else [])
    for fmt in fmts:
        out = tmp_path / f"m_{fmt}.onnx"
        qsdonnx.optimize(minilm_path, out, method="rtn", bits=4, format=fmt, validate=False, progress=False)
        embs[fmt] = minilm.embed(session(str(out)), feeds)
    for fmt in fmts[1:]:
        np.testing.assert_allclose(embs[fmt], embs["qdq"], atol=2e-5)


@pytest.mark.slow
def test_minilm_budget_3bpw_data_aware_beats_rtn(minilm_path, minilm_ref, minilm_calib, tmp_path):
    """One 3-bit-per-weight budget over all 37 weights, embeddings included."""
    scores = {}
    for method in ("auto", "rtn"):
        out = tmp_path / f"m_{method}.onnx"
        res = qsdonnx.optimize(minilm_path, out, method=method, bits_per_weight=3.0, calib=minilm_calib,
                               validate=False, progress=False)
        assert res.report.totals["bits_per_weight"] <= 3.0
        assert res.report.plan["spent_bytes"] <= res.report.plan["budget_bytes"]
        assert out.stat().st_size <= 0.20 * minilm_path.stat().st_size
        scores[method] = _minilm_score(out, minilm_ref)["mean_cosine"]
    # Measured 0.942 (auto) and 0.920 (rtn); the 0.98 goal at 3 bits per weight is not reached.
    assert scores["auto"] >= 0.95, scores
    assert scores["auto"] > scores["rtn"] + 0.01, scores


@pytest.mark.slow
def test_ppocr_rec_budget_4_5bpw_data_aware_beats_rtn(rec_path, rec_ref, rec_calib, tmp_path):
    cer = {}
    for method in ("auto", "rtn"):
        out = tmp_path / f"r_{method}.onnx"
        res = qsdonnx.optimize(rec_path, out, method=method, bits_per_weight=4.5, calib=rec_calib,
                               validate=False, progress=False)
        assert res.report.totals["bits_per_weight"] <= 4.5
        assert out.stat().st_size <= 0.20 * rec_path.stat().st_size
        cer[method] = _rec_score(out, rec_ref)["cer"]
    # Measured: original 0.48 %, auto 0.96 %, rtn 2.08 % on the 52 evaluation lines.
    assert cer["auto"] <= rec_ref[3]["cer"] + 0.01, cer
    assert cer["auto"] < cer["rtn"], cer
