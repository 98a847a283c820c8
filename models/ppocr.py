"""PP-OCRv4 (Chinese/English) detection and recognition models.

The ONNX files come from the ``rapidocr-onnxruntime`` wheel (install it with
``pip install --no-deps rapidocr-onnxruntime==1.4.4``). They are located through the
wheel's installed-file record, without importing the package (which imports
OpenCV), and copied into the model cache. These Paddle exports keep every weight in
a ``Constant`` node rather than in graph initializers; the copies are left that way.

Recognition is evaluated on synthetic text lines (``models.data``) rendered with the
DejaVu fonts and preprocessed like PP-OCR: height 48, aspect ratio kept, width
padded to 320, pixels normalised to [-1, 1], NCHW float32. Output logits
``[batch, 40, 6625]`` are decoded greedily with CTC.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import cache_dir as _cache_dir

DIST_NAME = "rapidocr-onnxruntime"
REC_FILE = "ch_PP-OCRv4_rec_infer.onnx"
DET_FILE = "ch_PP-OCRv4_det_infer.onnx"
MAX_IR_VERSION = 10
REC_HEIGHT = 48
REC_WIDTH = 320

FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",
    "/usr/share/fonts/TTF",
    "/usr/share/fonts/dejavu",
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
)
# (font file, pixel size) cycled over the text lines; every line gets one deterministically.
RENDER_STYLES = (
    ("DejaVuSans.ttf", 32),
    ("DejaVuSerif.ttf", 30),
    ("DejaVuSansMono.ttf", 28),
    ("DejaVuSans.ttf", 26),
    ("DejaVuSerif.ttf", 36),
    ("DejaVuSansMono.ttf", 34),
)


# --------------------------------------------------------------------------- model files


def _packaged(name: str) -> Path:
    try:
        dist = importlib.metadata.distribution(DIST_NAME)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"{DIST_NAME} is not installed; install it with "
            f"`pip install --no-deps {DIST_NAME}==1.4.4`"
        ) from exc
    for f in dist.files or ():
        if f.name == name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{name} not found in the {DIST_NAME} distribution")


def _copy_model(name: str, cache_dir: Path | str | None) -> Path:
    dest = _cache_dir(cache_dir) / name
    if dest.is_file():
        return dest
    import onnx

    src = _packaged(name)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        proto = onnx.load(str(src))
        if proto.ir_version > MAX_IR_VERSION:
            proto.ir_version = MAX_IR_VERSION
            onnx.save(proto, str(tmp))
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def rec_path(cache_dir: Path | str | None = None) -> Path:
    """Cached copy of the PP-OCRv4 text recognition model."""
    return _copy_model(REC_FILE, cache_dir)


def det_path(cache_dir: Path | str | None = None) -> Path:
    """Cached copy of the PP-OCRv4 text detection model."""
    return _copy_model(DET_FILE, cache_dir)


def charset(model_path: Path | str | None = None) -> list[str]:
    """CTC label list of the recognition model.

    Built like PaddleOCR / RapidOCR do: the ``character`` metadata entry split into
    lines, a space appended at the end and the CTC blank (``"blank"``) inserted at
    index 0, so that index ``i`` of the model's class axis is ``charset[i]``.
    """
    import onnx

    proto = onnx.load(str(rec_path() if model_path is None else model_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        raise KeyError(f"{model_path}: no 'character' entry in metadata_props")
    chars = meta["character"].splitlines()
    return ["blank", *chars, " "]


def input_name(model_path: Path | str | None = None) -> str:
    import onnx

    proto = onnx.load(str(rec_path() if model_path is None else model_path), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    return next(i.name for i in proto.graph.input if i.name not in inits)


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=None)
def font_file(name: str) -> Path:
    for root in FONT_DIRS:
        root_path = Path(root)
        direct = root_path / name
        if direct.is_file():
            return direct
        if root_path.is_dir():
            for hit in sorted(root_path.rglob(name)):
                return hit
    raise FileNotFoundError(
        f"font {name} not found (looked in {', '.join(FONT_DIRS)}); "
        "install it with `apt-get install fonts-dejavu-core`"
    )


@lru_cache(maxsize=None)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(font_file(name)), size)


def render_line(text: str, font: str = "DejaVuSans.ttf", size: int = 32):
    """Black text on a white background, tightly framed with a small margin (PIL ``L`` image)."""
    from PIL import Image, ImageDraw

    f = _font(font, size)
    ascent, descent = f.getmetrics()
    left, _, right, _ = f.getbbox(text, anchor="ls")
    pad_x = max(2, size // 8)
    pad_y = max(2, size // 6)
    width = int(right - min(left, 0)) + 2 * pad_x
    height = ascent + descent + 2 * pad_y
    img = Image.new("L", (width, height), 255)
    ImageDraw.Draw(img).text((pad_x - min(left, 0), pad_y + ascent), text, fill=0, font=f, anchor="ls")
    return img


def preprocess(images, height: int = REC_HEIGHT, width: int = REC_WIDTH) -> np.ndarray:
    """PP-OCR recognition preprocessing of PIL images into an ``[N, 3, height, width]`` batch.

    Each image is resized to ``height`` keeping its aspect ratio (squeezed to ``width``
    if wider), normalised to ``(x / 255 - 0.5) / 0.5`` and zero-padded on the right.
    """
    from PIL import Image

    batch = np.zeros((len(images), 3, height, width), dtype=np.float32)
    for i, img in enumerate(images):
        img = img.convert("RGB")
        w, h = img.size
        new_w = min(width, int(math.ceil(height * w / float(h))))
        arr = np.asarray(img.resize((new_w, height), Image.BILINEAR), dtype=np.float32)
        arr = (arr.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
        batch[i, :, :, :new_w] = arr
    return batch


def render_batch(lines, styles=RENDER_STYLES) -> np.ndarray:
    imgs = [render_line(t, *styles[i % len(styles)]) for i, t in enumerate(lines)]
    return preprocess(imgs)


def rec_eval_texts() -> list[str]:
    from .data import OCR_EVAL_LINES

    return list(OCR_EVAL_LINES)


def rec_calib_texts() -> list[str]:
    from .data import OCR_CALIB_LINES

    return list(OCR_CALIB_LINES)


def rec_eval_inputs(model_path: Path | str | None = None) -> dict[str, np.ndarray]:
    """``{input_name: [N, 3, 48, 320] float32}`` for the evaluation text lines."""
    return {input_name(model_path): render_batch(rec_eval_texts())}


def rec_calib_inputs(model_path: Path | str | None = None) -> dict[str, np.ndarray]:
    """``{input_name: [N, 3, 48, 320] float32}`` for the calibration text lines."""
    return {input_name(model_path): render_batch(rec_calib_texts())}


# --------------------------------------------------------------------------- metrics


def ctc_decode(logits: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC decoding of ``[N, T, C]`` scores: argmax, collapse repeats, drop blank (index 0)."""
    idx = np.asarray(logits).argmax(axis=-1)
    if idx.ndim == 1:
        idx = idx[None]
    out = []
    for row in idx:
        keep = np.ones(row.shape, dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(charset[j] for j in row[keep]))
    return out


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(preds: list[str], refs: list[str]) -> float:
    """Character error rate as a fraction: total edit distance / total reference characters."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    total = sum(len(r) for r in refs)
    edits = sum(levenshtein(p, r) for p, r in zip(preds, refs))
    return edits / max(total, 1)


def score_rec(outputs: np.ndarray, texts: list[str], charset: list[str]) -> dict[str, float]:
    """``cer`` (fraction) and ``exact`` (fraction of lines read exactly) of recogniser outputs."""
    preds = ctc_decode(outputs, charset)
    return {
        "cer": cer(preds, texts),
        "exact": float(np.mean([p == t for p, t in zip(preds, texts)])),
    }


def run_rec(session_or_model_path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run the recogniser with ONNX Runtime and return its ``[N, T, C]`` output."""
    import onnxruntime as ort

    sess = session_or_model_path
    if not isinstance(sess, ort.InferenceSession):
        src = sess.SerializeToString() if hasattr(sess, "SerializeToString") else str(sess)
        sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def rec_sanity(model_path: Path | str | None = None) -> dict[str, float]:
    """CER / exact-match rate of a recogniser on the evaluation lines."""
    path = rec_path() if model_path is None else model_path
    out = run_rec(path, rec_eval_inputs(path))
    return score_rec(out, rec_eval_texts(), charset(path))


__all__ = [
    "DET_FILE",
    "REC_FILE",
    "REC_HEIGHT",
    "REC_WIDTH",
    "RENDER_STYLES",
    "cer",
    "charset",
    "ctc_decode",
    "det_path",
    "input_name",
    "levenshtein",
    "preprocess",
    "rec_calib_inputs",
    "rec_calib_texts",
    "rec_eval_inputs",
    "rec_eval_texts",
    "rec_path",
    "rec_sanity",
    "render_batch",
    "render_line",
    "run_rec",
    "score_rec",
]
