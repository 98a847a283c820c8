"""Calibration: stream each target layer's input through ONNX Runtime and accumulate ``H = XᵀX``.

The original model is run with every target layer's input exposed as an extra graph output;
per batch, each activation is flattened to rows of the layer's reduction axis (Conv: unfolded
input patches in the weight's ``(C, kh, kw)`` order) and added into a float64 ``H``.  Only the
``K×K`` sums are kept, never the activations themselves.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import InputError
from ..graph import node_key
from .base import Context, Pass, WeightRecord
from .bias import GraphIndex, find_bias_slots
from .canonicalize import node_attrs
from .validate import fixed_batch, generated_inputs, load_feeds, run_feed

log = logging.getLogger("qsdonnx")


def _conv_rows(x: torch.Tensor, attrs: dict, kshape: list[int]) -> torch.Tensor | None:
    """Unfolded patches ``(n·L, C·kh·kw)`` of a 2-D Conv input, or None for other ranks/padding modes."""
    if x.dim() != 4 or len(kshape) != 2:
        return None
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    strides = list(attrs.get("strides", [1, 1]))
    dil = list(attrs.get("dilations", [1, 1]))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(2):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kshape[i] - 1) * dil[i] + 1 - size)
            lo = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads.append((lo, total - lo))
        x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        padding = 0
    elif auto_pad == "VALID":
        padding = 0
    else:
        p = list(attrs.get("pads", [0, 0, 0, 0]))
        if p[0] != p[2] or p[1] != p[3]:
            x = F.pad(x, (p[1], p[3], p[0], p[2]))
            padding = 0
        else:
            padding = (p[0], p[1])
    cols = F.unfold(x, kernel_size=kshape, dilation=dil, padding=padding, stride=strides)  # (n, K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class HessianAccumulator:
    """``Σ xᵀx`` and ``Σ x`` over rows ``x`` of one layer's input, with the row count.

    Each batch's product is formed in float32 (fast) and summed across batches in float64, so
    long calibration runs do not lose precision."""

    def __init__(self, K: int):
        self.H = torch.zeros(K, K, dtype=torch.float64)
        self.sum = torch.zeros(K, dtype=torch.float64)
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        self.H += (rows.T @ rows).to(torch.float64)
        self.sum += rows.sum(dim=0, dtype=torch.float64)
        self.rows += rows.shape[0]

    def minus(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """The sums over the rows this accumulator saw and ``other`` did not."""
        out = HessianAccumulator(self.H.shape[0])
        out.H, out.sum, out.rows = self.H - other.H, self.sum - other.sum, self.rows - other.rows
        return out

    def result(self, centered: bool = False) -> dict:
        """``H = E[xᵀx]``, or the covariance ``E[xᵀx] − μᵀμ`` when ``centered`` (for layers
        whose bias absorbs the mean error, see ``passes.bias``); ``mean = μ``."""
        n = max(self.rows, 1)
        mean = self.sum / n
        H = self.H / n
        if centered:
            H = H - torch.outer(mean, mean)
        return {"H": H.to(torch.float32).numpy(), "mean": mean.numpy(), "rows": self.rows,
                "centered": centered}


# With --calib, every HOLD_OUT_STRIDE-th batch (or the last one of a set of fewer batches) is kept out
# of every fitting step and is what the end-of-run validation measures on; calibration samples
# beyond --calib-samples are held out first, as they are not fitted anyway.
HOLD_OUT_STRIDE = 32
HOLD_OUT_MIN_BATCHES = 4
HOLD_OUT_MAX_SAMPLES = 32


def _samples(feed: dict) -> int:
    return len(next(iter(feed.values())))


def split_calibration(feeds: list[dict], cap: int) -> tuple[list[dict], list[dict]]:
    """(fitting, held-out) batches: at most ``cap`` samples are fitted; the rest of the data, or
    every :data:`HOLD_OUT_STRIDE`-th batch when there is none, is held out."""
    fit, held, total = [], [], 0
    if len(feeds) >= HOLD_OUT_MIN_BATCHES and sum(map(_samples, feeds)) <= cap:
        stride = min(HOLD_OUT_STRIDE, len(feeds))
        held = [f for i, f in enumerate(feeds) if i % stride == stride - 1]
        feeds = [f for i, f in enumerate(feeds) if i % stride != stride - 1]
    for f in feeds:
        if total >= cap:
            if sum(map(_samples, held)) < HOLD_OUT_MAX_SAMPLES:
                held.append(f)
            continue
        take = cap - total
        if take < _samples(f):
            rest = {k: v[take:] for k, v in f.items()}
            held.append({k: v[:HOLD_OUT_MAX_SAMPLES] for k, v in rest.items()})
            f = {k: v[:take] for k, v in f.items()}
        total += _samples(f)
        fit.append(f)
    return fit, held


def calibration_feeds(ctx: Context, warn: bool = True) -> list[dict]:
    """The batches every fitting step uses (with ``--calib``, the held-out ones are left out)."""
    return _calibration_split(ctx, warn)[0]


def held_out_feeds(ctx: Context) -> list[dict]:
    """Calibration batches no fitting step saw (empty without ``--calib`` or with too few batches)."""
    return _calibration_split(ctx, False)[1] if ctx.config.calib is not None else []


def _calibration_split(ctx: Context, warn: bool) -> tuple[list[dict], list[dict]]:
    if ctx.calib_split is not None:
        return ctx.calib_split
    cfg = ctx.config
    if cfg.calib is not None:
        path = Path(cfg.calib)
        if not path.exists():
            raise InputError(f"calibration data {path} does not exist")
        ctx.calib_split = split_calibration(load_feeds(path, ctx.original, cfg.calib_batch), cfg.calib_samples)
        return ctx.calib_split
    if warn:
        log.warning("no --calib data: calibrating on generated inputs; real data gives much better results")
    batch = fixed_batch(ctx.original) or cfg.calib_batch
    n = max(1, min(cfg.calib_samples, 32) // batch)
    feeds = generated_inputs(ctx.original, dict(_batched(cfg.input_shapes, batch)), n, cfg.seed + 1, batch=batch)
    ctx.calib_split = (feeds, [])
    return ctx.calib_split


MASK_INPUTS = ("attention_mask", "input_mask")


def token_mask_input(ctx: Context) -> str | None:
    """The graph input marking real (1) and padded (0) positions, per ``--calib-mask``."""
    choice = ctx.config.calib_mask
    inputs = {i.name: i for i in ctx.original.graph.input}
    if choice == "none":
        return None
    if choice != "auto":
        if choice not in inputs:
            raise InputError(f"--calib-mask {choice!r} is not an input of the model")
        return choice
    return next((n for n in MASK_INPUTS if n in inputs), None)


def _batched(shapes, batch):
    return [(name, (batch,) + tuple(s[1:])) for name, s in shapes]


class CalibratePass(Pass):
    """Fills ``ctx.calibration[weight] = {"H", "rows", "absmax"}`` for MatMul, Gemm and Conv weights."""

    name = "calibrate"

    def run(self, ctx: Context) -> str:
        from ..runtime import session

        targets: dict[str, list[tuple[onnx.NodeProto, WeightRecord]]] = defaultdict(list)
        nodes = {node_key(n): n for n in ctx.model.graph.node}
        for rec in ctx.candidates():
            if rec.view not in ("matmul", "matmul-left", "gemm", "conv"):
                continue
            for nk in rec.nodes:
                node = nodes[nk]
                targets[node.input[1 if rec.view == "matmul-left" else 0]].append((node, rec))
        if not targets:
            return "nothing to calibrate"
        from ..store import structure_copy

        model, weights = structure_copy(ctx.model)  # the weights go to the session as they are
        existing = {o.name for o in model.graph.output}
        for name in targets:
            if name not in existing:
                rec_dtype = targets[name][0][1].dtype
                t = onnx.TensorProto.FLOAT16 if rec_dtype == "float16" else onnx.TensorProto.FLOAT
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, t, None))
        sess = session(model, base_dir=ctx.base_dir, initializers=weights)
        names = list(targets)
        accs: dict[str, HessianAccumulator] = {}
        # With CALDERA, every other batch is also summed on its own: the planner fits its
        # candidates on one half and predicts their error on the other (see passes.factorize).
        # Other methods are not fitted to data when the planner predicts their error.
        split = ctx.config.method == "caldera"
        half: dict[str, HessianAccumulator] = {}
        feeds = calibration_feeds(ctx)
        samples = 0
        # Layers reading the same tensor the same way (q, k and v projections) share one H.
        share: dict[str, str] = {}
        for name, users in targets.items():
            for node, rec in users:
                share.setdefault(rec.name, f"{name}|{rec.view}|{self._row_key(node, rec)}")
        mask_name = token_mask_input(ctx)
        for batch, feed in enumerate(tqdm(feeds, desc="calibrating", unit="batch", disable=not ctx.config.progress,
                                          leave=False)):
            outs = run_feed(sess, names, feed)
            samples += len(next(iter(feed.values())))
            mask = None if mask_name is None else np.asarray(feed[mask_name]) != 0
            for name, value in zip(names, outs):
                x = torch.from_numpy(np.array(value, dtype=np.float32))
                done = set()
                for node, rec in targets[name]:
                    key = share[rec.name]
                    if key in done:
                        continue
                    done.add(key)
                    rows = self._rows(x, node, rec)
                    if rows is None:
                        continue
                    if mask is not None and rec.view in ("matmul", "gemm") and tuple(x.shape[:-1]) == mask.shape:
                        # Padded positions compute activations no output depends on.
                        rows = rows[torch.from_numpy(mask.reshape(-1))]
                    accs.setdefault(key, HessianAccumulator(rec.matrix_shape[0])).add(rows)
                    if split and batch % 2 == 0:
                        half.setdefault(key, HessianAccumulator(rec.matrix_shape[0])).add(rows)
        centered = 0
        index = GraphIndex(ctx.model.graph)
        for wname, key in share.items():
            if key in accs:
                rec = ctx.record(wname)
                slots = find_bias_slots(ctx.model, rec, index)
                if slots:
                    rec.extra["bias_slots"] = slots
                    centered += 1
                ctx.calibration[wname] = accs[key].result(centered=bool(slots))
                fit = half.get(key)
                check = accs[key].minus(fit) if fit is not None else None
                if fit is not None and fit.rows and check.rows:
                    ctx.calibration[wname]["H_fit"] = fit.result(centered=bool(slots))["H"]
                    ctx.calibration[wname]["H_check"] = check.result(centered=bool(slots))["H"]
        ctx.calib_info = {"samples": samples, "batches": len(feeds), "token_mask": mask_name,
                                       "source": str(ctx.config.calib) if ctx.config.calib else "generated"}
        return (f"{len(ctx.calibration)} layers calibrated on {samples} samples ({len(accs)} distinct "
                f"inputs; {centered} with a bias to absorb the mean error)")

    @staticmethod
    def _row_key(node: onnx.NodeProto, rec: WeightRecord) -> str:
        a = node_attrs(node)
        if rec.view == "conv":
            return repr(sorted((k, v) for k, v in a.items() if k != "group")) + repr(rec.shape[1:])
        return str(a.get("transA", 0))

    @staticmethod
    def _rows(x: torch.Tensor, node: onnx.NodeProto, rec: WeightRecord) -> torch.Tensor | None:
        K = rec.matrix_shape[0]
        if rec.view == "conv":
            return _conv_rows(x, node_attrs(node), list(rec.shape[2:]))
        if rec.view == "gemm" and node_attrs(node).get("transA", 0):
            x = x.T
        if rec.view == "matmul-left":
            # A·X: the input vectors are the columns of X (a 1-D X is one column).
            x = x.reshape(K, 1) if x.ndim == 1 else x
            x = x.transpose(-1, -2)
        if x.shape[-1] != K:
            return None
        return x.reshape(-1, K)
