"""End-to-end check: the original and the compressed model run in ONNX Runtime on the same inputs."""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import InputError
from .base import Context, Pass

log = logging.getLogger("qsdonnx")

ORT_INT_TYPES = {
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}
DEFAULT_OTHER_DIM = 32


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def fixed_batch(model: onnx.ModelProto) -> Optional[int]:
    """The batch size the graph's inputs fix on their first axis, or None when none fixes it
    (feeds are cut into batches of exactly this many samples)."""
    fixed = [vi.type.tensor_type.shape.dim[0].dim_value for vi in graph_inputs(model)
             if len(vi.type.tensor_type.shape.dim) >= 1 and vi.type.tensor_type.shape.dim[0].dim_value > 0]
    return min(fixed) if fixed else None


# Ops through which an index tensor reaches a Gather unchanged in value (only its type or layout).
INDEX_PASS_THROUGH = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Expand"}


def _gather_rows(model: onnx.ModelProto) -> dict[str, int]:
    """Graph inputs used as Gather indices (directly or through casts and reshapes), with the
    number of rows of the smallest table they index."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    inits[n.output[0]] = list(a.t.dims)
        elif n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name:
                consumers.setdefault(name, []).append((n, i))
    rows: dict[str, int] = {}
    for vi in graph_inputs(model):
        todo, seen = [vi.name], set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for n, i in consumers.get(name, []):
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                dims = inits.get(n.input[0]) if n.op_type == "Gather" else None
                if n.op_type == "Gather" and i == 1 and dims and -len(dims) <= axis < len(dims):
                    table_rows = int(dims[axis])
                    rows[vi.name] = min(rows.get(vi.name, table_rows), table_rows)
                elif n.op_type in INDEX_PASS_THROUGH and i == 0:
                    todo.extend(n.output)
    return rows


def generated_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], count: int, seed: int = 0,
                     batch: int = 1) -> list[dict[str, np.ndarray]]:
    """Inputs made from the graph's input types: normal floats, valid indices for Gather inputs,
    ones for other integers; dynamic dims from ``shapes`` or ``batch`` (first axis) / 32 (others)."""
    rng = np.random.default_rng(seed)
    gather_rows = _gather_rows(model)
    known = {vi.name for vi in graph_inputs(model)}
    unknown = sorted(set(shapes) - known)
    if unknown:
        raise InputError(f"--input-shape names {', '.join(unknown)}, which the model does not have as inputs "
                         f"(inputs: {', '.join(sorted(known))})")
    # A named dimension that is some input's first axis is the batch wherever it appears.
    batch_dims = {vi.type.tensor_type.shape.dim[0].dim_param for vi in graph_inputs(model)
                  if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_param}
    feeds = []
    for _ in range(count):
        feed = {}
        for vi in graph_inputs(model):
            tt = vi.type.tensor_type
            if vi.name in shapes:
                shape = shapes[vi.name]
            else:
                shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                              else batch if k == 0 or (d.dim_param and d.dim_param in batch_dims)
                              else DEFAULT_OTHER_DIM
                              for k, d in enumerate(tt.shape.dim))
            elem = tt.elem_type
            if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
                arr = rng.standard_normal(shape).astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
            elif elem in ORT_INT_TYPES:
                dt = ORT_INT_TYPES[elem]
                if vi.name in gather_rows:
                    arr = rng.integers(0, gather_rows[vi.name], size=shape).astype(dt)
                else:
                    arr = np.ones(shape, dt)
            else:
                raise InputError(f"cannot generate values for input {vi.name!r} of type "
                                 f"{onnx.helper.tensor_dtype_to_string(elem)}; pass --inputs")
            feed[vi.name] = arr
        feeds.append(feed)
    return feeds


def load_feeds(path: Path, model: onnx.ModelProto, batch: int = 8) -> list[dict[str, np.ndarray]]:
    """Feeds from an ``.npz`` (arrays named after graph inputs, first axis = samples) or a
    directory of them; each file is cut into batches of at most ``batch`` samples (exactly the
    batch size the model's inputs fix, when they fix one; a shorter remainder is then left out)."""
    path = Path(path)
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"input data {path} does not exist or holds no .npz files")
    names = [vi.name for vi in graph_inputs(model)]
    fixed = fixed_batch(model)
    if fixed is not None and fixed != batch:
        log.info("the model's inputs fix the batch at %d: feeding batches of %d", fixed, fixed)
        batch = fixed
    feeds = []
    for f in files:
        try:
            data = dict(np.load(f, allow_pickle=False))
        except Exception as exc:  # numpy raises several types for bad files
            raise InputError(f"cannot read {f} as .npz: {exc}") from None
        missing = [n for n in names if n not in data]
        if missing:
            raise InputError(f"{f} lacks arrays for inputs {', '.join(missing)} (has {', '.join(data) or 'none'})")
        n = min(len(data[k]) for k in names)
        for s in range(0, n, batch):
            if fixed is not None and s + batch > n:
                break
            feeds.append({k: data[k][s:s + batch] for k in names})
    return feeds


def output_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """max |a−b|, ‖a−b‖/‖a‖, cosine(a, b) and SQNR = 10·log10(‖a‖²/‖a−b‖²) dB."""
    a = ref.astype(np.float64).ravel()
    b = out.astype(np.float64).ravel()
    if a.size == 0:
        return {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0, "sqnr_db": math.inf}
    d = a - b
    na, nb, nd = np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(d)
    return {
        "max_abs": float(np.max(np.abs(d))),
        "rel_l2": float(nd / na) if na > 0 else float(nd),
        "cosine": float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb),
        "sqnr_db": float(10 * math.log10(na**2 / nd**2)) if nd > 0 and na > 0 else math.inf,
    }


def run_feed(sess: ort.InferenceSession, names: Sequence[str], feed: dict) -> list:
    """``sess.run`` whose failure on the given inputs is one input error naming their shapes."""
    try:
        return sess.run(list(names), feed)
    except Exception as exc:  # onnxruntime raises its own exception types for bad feeds
        shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in feed.items())
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"the model cannot run on the inputs ({shapes}): {msg}; give the shapes with "
                         f"--input-shape NAME:D1,D2,... or data with --inputs/--calib") from None


def run_all(sess: ort.InferenceSession, feeds: Sequence[dict]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    outs: dict[str, list] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, run_feed(sess, names, feed)):
            outs[n].append(np.asarray(v).ravel())
    return {n: np.concatenate(v) if v else np.zeros(0) for n, v in outs.items()}


def compare_models(original: Union[str, bytes, onnx.ModelProto], compressed: Union[str, bytes, onnx.ModelProto],
                   feeds: Sequence[dict], accuracy_level: int = 0, providers: Optional[list] = None) -> dict:
    """Runs both models; per output, the metrics of the compressed model at ORT_DISABLE_ALL and at
    the default optimization level against the original, and between the two levels."""
    from ..runtime import session
    from .save import MAX_ORT_IR

    if isinstance(original, onnx.ModelProto) and original.ir_version > MAX_ORT_IR:
        original = copy.deepcopy(original)
        original.ir_version = MAX_ORT_IR
    try:
        ref_sess = session(original, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ONNX Runtime cannot run the input model: {msg}") from None
    ref = run_all(ref_sess, feeds)
    levels = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    got = {k: run_all(session(compressed, providers=providers, graph_optimization_level=lvl,
                              accuracy_level_float=accuracy_level <= 1), feeds)
           for k, lvl in levels.items()}
    samples = sum(next((np.shape(v)[0] for v in f.values() if np.ndim(v)), 1) for f in feeds)
    result: dict = {"outputs": {}, "samples": int(samples), "batches": len(feeds)}
    for name in ref:
        result["outputs"][name] = {
            "disable_all": output_metrics(ref[name], got["disable_all"][name]),
            "default": output_metrics(ref[name], got["default"][name]),
            "levels_agree": output_metrics(got["disable_all"][name], got["default"][name]),
        }
    worst = max((m[k]["rel_l2"] for m in result["outputs"].values() for k in ("disable_all", "default")), default=0.0)
    result["max_rel_l2"] = worst
    disagree = max((m["levels_agree"]["rel_l2"] for m in result["outputs"].values()), default=0.0)
    result["level_disagreement"] = disagree
    return result


def validation_feeds(ctx: Context, model: onnx.ModelProto) -> tuple[list[dict], str]:
    """The inputs the end-of-run validation runs on, and where they come from: ``--inputs``, else
    calibration samples held out from every fitting step, else generated inputs."""
    cfg = ctx.config
    if cfg.inputs is not None:
        return load_feeds(cfg.inputs, model, cfg.calib_batch), f"inputs from {cfg.inputs}"
    if cfg.calib is not None:
        from .calibrate import held_out_feeds

        held = held_out_feeds(ctx)
        if held:
            n = sum(len(next(iter(f.values()))) for f in held)
            return held, f"{n} calibration samples held out from fitting"
    feeds = generated_inputs(model, dict(cfg.input_shapes), cfg.num_inputs, cfg.seed)
    why = "too few calibration batches to hold some out" if cfg.calib is not None else "no --inputs or --calib"
    return feeds, f"generated inputs only, {why}: accuracy on real data was not checked"


class ValidatePass(Pass):
    """Compares original and compressed outputs and records the metrics in the context."""

    name = "validate"

    def run(self, ctx: Context) -> str:
        from .save import MAX_ORT_IR

        original = str(ctx.input_path) if ctx.input_path is not None else ctx.original
        if ctx.original.ir_version > MAX_ORT_IR:
            original = ctx.original  # compare_models lowers the stamp to one ORT reads
        feeds, source = validation_feeds(ctx, ctx.original)
        ctx.validation = compare_models(original, ctx.model, feeds, accuracy_level=ctx.config.accuracy_level)
        ctx.validation["source"] = source
        if ctx.validation["level_disagreement"] > 1e-3:
            log.warning("compressed model gives different outputs at ORT_DISABLE_ALL and the default "
                        "optimization level (relative L2 %.2e)", ctx.validation["level_disagreement"])
        return f"max relative L2 error {ctx.validation['max_rel_l2']:.3e} over {ctx.validation['samples']} samples ({source})"
