"""``python -m benchmarks.parts``: which weights each row compresses, and a real run."""
from __future__ import annotations

import json

import pytest

from benchmarks import parts
from qsdonnx.config import OptimizeConfig, parse_override

NAMES = ["word_embeddings.weight", "position_embeddings",
         *(f"layers.{i}.{p}" for i in range(6) for p in (
             "attention.query.weight_t", "attention.key.weight_t", "attention.value.weight_t",
             "attention.out.weight_t", "intermediate.weight_t", "output.weight_t"))]


def _kept(pattern):
    cfg = OptimizeConfig(overrides=tuple(parse_override(o) for o in parts.overrides(pattern, "trellis:2")))
    kept = {}
    for n in NAMES:
        ov = cfg.override_for(n)
        if not (ov and ov.skip):
            kept[n] = ov
    return kept


def test_each_part_keeps_exactly_its_weights_and_the_table_setting():
    counts = {p: len(_kept(pat)) for p, pat in parts.PARTS.items()}
    # Counted by name: position_embeddings is among NAMES but feeds a Slice, so no run compresses it.
    assert counts == {"everything": 38, "word-embedding table": 1, "all linear layers": 36,
                      "attention query, key": 12, "attention value, output": 12,
                      "FFN intermediate": 6, "FFN output": 6}
    assert set(_kept(parts.PARTS["FFN output"])) == {f"layers.{i}.output.weight_t" for i in range(6)}
    table = _kept(parts.PARTS["word-embedding table"])["word_embeddings.weight"]
    assert (table.method, table.bits) == ("trellis", 2)
    assert _kept(None)["layers.0.attention.query.weight_t"] is None  # not touched by the table setting


@pytest.mark.real
@pytest.mark.slow
def test_parts_run_on_minilm(tmp_path):
    assert parts.main(["--method", "gptq", "--bits", "4", "--table", "pq:2", "--out", str(tmp_path),
                       "--work", str(tmp_path / "w")]) == 0
    rows = {r["part"]: r for r in json.loads((tmp_path / "parts.json").read_text())["rows"]}
    assert [rows[p]["weights"] for p in parts.PARTS] == [37, 1, 36, 12, 12, 6, 6]  # position_embeddings feeds a Slice: not a weight
    assert rows["word-embedding table"]["bits_per_weight"] == pytest.approx(2.18, abs=0.01)
    for r in rows.values():
        assert 0.9 < r["mean_cosine"] < 1.0 and r["min_cosine"] <= r["p10_cosine"] <= r["mean_cosine"]
    everything = rows["everything"]["loss"]
    assert everything == pytest.approx(1 - rows["everything"]["mean_cosine"]) and rows["everything"]["share"] == 1.0
    assert everything > max(r["loss"] for p, r in rows.items() if p != "everything")
    assert rows["all linear layers"]["loss"] > rows["attention query, key"]["loss"]
    assert "| FFN output | 6 |" in (tmp_path / "parts.md").read_text()
