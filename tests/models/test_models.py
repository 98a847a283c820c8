"""Tests of the real-model helpers in ``models/``.

The metric helpers are tested on hand-made inputs (fast, no model needed). Tests
marked ``real`` build / locate MiniLM and PP-OCRv4 (cached in ``$QSDONNX_CACHE`` or
``<repo>/.cache/models``) and check them against their reference behaviour.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

_REPO = Path(__file__).resolve().parents[2]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from models import data, minilm, ppocr  # noqa: E402

# Measured with the original PP-OCRv4 recogniser on the evaluation lines: CER 0.48 %
# (one line of 52 misread). The bound leaves room for ONNX Runtime / platform drift.
REC_CER_BOUND = 0.02


def _one_hot(indices, classes):
    out = np.full((len(indices), classes), -1.0, dtype=np.float32)
    out[np.arange(len(indices)), indices] = 1.0
    return out


# ----------------------------------------------------------------------------- fast


def test_ctc_decode_collapses_repeats_and_drops_blank():
    cs = ["blank", "a", "b", "c", " "]
    seq1 = [0, 1, 1, 0, 1, 2, 2, 2, 0, 0, 4, 3]  # a a _ a b b b _ _ ' ' c -> "aab c"
    seq2 = [0, 0, 0, 3, 3, 3, 0, 0, 0, 0, 0, 0]  # -> "c"
    logits = np.stack([_one_hot(seq1, len(cs)), _one_hot(seq2, len(cs))])
    assert ppocr.ctc_decode(logits, cs) == ["aab c", "c"]
    assert ppocr.ctc_decode(_one_hot([0, 0], len(cs)), cs) == [""]


def test_levenshtein_and_cer():
    assert ppocr.levenshtein("kitten", "sitting") == 3
    assert ppocr.levenshtein("", "abc") == 3
    assert ppocr.levenshtein("abc", "abc") == 0
    assert ppocr.cer(["abc", "xyz"], ["abc", "xyz"]) == 0.0
    assert ppocr.cer(["abd", ""], ["abc", "xy"]) == pytest.approx(3 / 5)
    assert ppocr.cer(["abcdef"], ["ab"]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        ppocr.cer(["a"], ["a", "b"])


def test_score_rec():
    cs = ["blank", "a", "b"]
    logits = np.stack([_one_hot([1, 0, 2], 3), _one_hot([1, 1, 1], 3)])
    s = ppocr.score_rec(logits, ["ab", "ab"], cs)
    assert s["cer"] == pytest.approx(1 / 4)
    assert s["exact"] == pytest.approx(0.5)


def test_minilm_score_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(12, 8))
    same = minilm.score(ref, ref * 3.0)
    assert same["mean_cosine"] == pytest.approx(1.0)
    assert same["min_cosine"] == pytest.approx(1.0)
    assert same["nn_agreement"] == 1.0
    flipped = ref.copy()
    flipped[0] = -flipped[0]
    s = minilm.score(ref, flipped)
    assert s["min_cosine"] == pytest.approx(-1.0)
    assert s["mean_cosine"] == pytest.approx((11 - 1) / 12)
    assert s["nn_agreement"] < 1.0


def test_text_sets_are_disjoint_and_large_enough():
    ev = data.minilm_eval_sentences()
    assert len(ev) >= 64 and len(data.MINILM_CALIB) >= 64
    assert not set(ev) & set(data.MINILM_CALIB)
    assert all(len(g) >= 2 for g in data.MINILM_EVAL_GROUPS)
    assert len(data.OCR_EVAL_LINES) >= 48 and len(data.OCR_CALIB_LINES) >= 48
    assert not set(data.OCR_EVAL_LINES) & set(data.OCR_CALIB_LINES)


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def minilm_path():
    return minilm.build()


@pytest.fixture(scope="module")
def rec_model():
    return ppocr.rec_path()


@pytest.mark.real
def test_minilm_export_matches_torch(minilm_path):
    import torch

    model = minilm.torch_model()
    feeds = minilm.encode(data.minilm_eval_sentences()[:16])
    diffs = minilm.max_abs_diff(minilm_path, model, feeds)
    assert max(diffs.values()) < 1e-4, diffs
    with torch.no_grad():
        _, emb = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), 1.0, atol=1e-5)


@pytest.mark.real
def test_minilm_graph_layout(minilm_path):
    import onnx

    proto = onnx.load(str(minilm_path))
    assert proto.ir_version == minilm.IR_VERSION
    assert [i.name for i in proto.graph.input] == list(minilm.INPUT_NAMES)
    assert [o.name for o in proto.graph.output] == list(minilm.OUTPUT_NAMES)
    inits = {t.name: t for t in proto.graph.initializer}
    weight_matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weight_matmuls) == 6 * 6
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] == "word_embeddings.weight"]
    assert len(gathers) == 1 and list(inits["word_embeddings.weight"].dims) == [30522, 384]


@pytest.mark.real
def test_minilm_paraphrase_closer_than_unrelated(minilm_path):
    sentences = [
        "The train to the airport leaves every fifteen minutes.",
        "Airport trains depart at fifteen-minute intervals.",
        "Add the eggs one at a time and whisk until smooth.",
    ]
    emb = minilm.embed(minilm_path, minilm.encode(sentences))
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.3


@pytest.mark.real
def test_minilm_eval_set_structure(minilm_path):
    emb = minilm.embed(minilm_path, minilm.eval_inputs())
    assert minilm.group_recall(emb) >= 0.95
    assert minilm.score(emb, emb)["nn_agreement"] == 1.0
    calib = minilm.calib_inputs()
    assert calib["input_ids"].dtype == np.int64 and calib["attention_mask"].dtype == np.int64
    assert calib["input_ids"].shape[0] == len(data.MINILM_CALIB)


@pytest.mark.real
def test_ppocr_models_and_charset(rec_model):
    import onnx

    proto = onnx.load(str(rec_model))
    assert proto.ir_version <= 10
    assert len(proto.graph.initializer) == 0
    assert sum(n.op_type == "Constant" for n in proto.graph.node) > 100
    cs = ppocr.charset(rec_model)
    assert cs[0] == "blank" and cs[-1] == " " and len(cs) == 6625
    assert ppocr.det_path().is_file()


@pytest.mark.real
def test_ppocr_rec_cer_on_eval_lines(rec_model):
    import onnxruntime as ort

    feeds = ppocr.rec_eval_inputs(rec_model)
    (name, batch), = feeds.items()
    assert batch.shape == (len(ppocr.rec_eval_texts()), 3, 48, 320) and batch.dtype == np.float32
    sess = ort.InferenceSession(str(rec_model), providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds)[0]
    assert out.shape[-1] == len(ppocr.charset(rec_model))
    s = ppocr.score_rec(out, ppocr.rec_eval_texts(), ppocr.charset(rec_model))
    assert s["cer"] < REC_CER_BOUND, s
    assert s["exact"] > 0.9, s
    calib = ppocr.rec_calib_inputs(rec_model)[name]
    assert calib.shape[0] == len(data.OCR_CALIB_LINES)
