"""End-to-end tuning of what compression left continuous.

Every layer was fitted on its own to its calibrated input (``‖(W − Ŵ)ᵀX‖``); the errors of
many layers then add up through the model.  This pass fits the continuous values that the
compressed model stores anyway (scales, codebooks, unquantized factors: see
:mod:`qsdonnx.factorize.tune`) together with the graph's own small float parameters (biases,
normalization gains and offsets) to the original model's outputs on the calibration data,
with the codes fixed.  The size of the model does not change.

The loss is the relative squared error of each float output against the original's, averaged
over the outputs (padded positions are left out where ``--calib-mask`` names a mask).  One
sample in five is held out: the values kept are those of the epoch with the least held-out
error, and when no epoch beats the untuned model nothing changes.
"""
from __future__ import annotations

import time

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..factorize.tune import Relative, TunableFactorization, tunable
from ..graph import node_key
from ..torch_graph import TorchGraph, unsupported_ops
from .base import Context, Pass
from .canonicalize import node_attrs, weight_from_matrix
from .factorize import measure_layer

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
# (op, input slot) where a float vector is a per-channel parameter the model learned: biases, norm gains and offsets.
PARAM_SLOTS = {("Add", 0), ("Add", 1), ("Sub", 0), ("Sub", 1), ("Mul", 0), ("Mul", 1),
               ("LayerNormalization", 1), ("LayerNormalization", 2), ("Conv", 2), ("Gemm", 2),
               ("BatchNormalization", 1), ("BatchNormalization", 2)}
HOLD_OUT_EVERY = 5
TUNE_LR = 1e-4  # Adam step on the relative changes δ; at 3e-4 PP-OCRv4 rec at 4.5 bpw diverged after two epochs
# Training batches per epoch at most (a fresh random draw each epoch), so that a large
# calibration set bounds the time tuning takes instead of stretching it.
TUNE_EPOCH_BATCHES = 16


def graph_parameters(model: onnx.ModelProto, exclude: set[str]) -> dict[str, np.ndarray]:
    """Float vectors (rank 1, more than one value) held in initializers or ``Constant`` nodes
    and read only at :data:`PARAM_SLOTS`, by name."""
    slots: dict[str, set] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name:
                slots.setdefault(name, set()).add((node.op_type, i) if node.domain in ("", "ai.onnx") else None)
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = node_attrs(node).get("value")
            if isinstance(value, onnx.TensorProto):
                tensors[node.output[0]] = value
    return {name: numpy_helper.to_array(t) for name, t in tensors.items()
            if name not in exclude and t.data_type in FLOAT_TYPES and len(t.dims) == 1 and t.dims[0] > 1
            and slots.get(name) and slots[name] <= PARAM_SLOTS}


def set_graph_parameter(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Writes ``value`` into the initializer or ``Constant`` node that holds ``name``."""
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value, name))
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(value, a.t.name))
                    return
    raise KeyError(name)


def _split(feeds: list[dict]) -> tuple[list[dict], list[dict]]:
    """Training and held-out batches: every :data:`HOLD_OUT_EVERY`-th sample is held out."""
    shapes = {tuple((k, v.shape[1:]) for k, v in sorted(f.items())) for f in feeds}
    if len(shapes) == 1:
        allf = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
        n = len(next(iter(allf.values())))
        held = np.arange(n) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
        if held.sum() == 0 or (~held).sum() == 0:
            return [], []
        size = max(len(next(iter(f.values()))) for f in feeds)
        train_idx, held_idx = np.flatnonzero(~held), np.flatnonzero(held)
        cut = lambda idx: [{k: v[idx[i:i + size]] for k, v in allf.items()} for i in range(0, len(idx), size)]
        return cut(train_idx), cut(held_idx)
    held = [f for i, f in enumerate(feeds) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    train = [f for i, f in enumerate(feeds) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    return (train, held) if held and train else ([], [])


class TunePass(Pass):
    """Fits scales, codebooks, biases and norms end to end (see the module docstring)."""

    name = "tune"

    def __init__(self, epochs: int, lr: float = TUNE_LR):
        self.epochs = epochs
        self.lr = lr

    def run(self, ctx: Context) -> str:
        from .calibrate import calibration_feeds, token_mask_input

        ctx.tuning = {}
        if self.epochs <= 0 or not ctx.factorizations:
            return "off"
        if not ctx.calib_info:
            return "skipped (no calibration data)"
        missing = unsupported_ops(ctx.model)
        if missing:
            ctx.tuning = {"skipped": f"no torch evaluation of {', '.join(missing)}"}
            return f"skipped ({ctx.tuning['skipped']})"
        tunables: dict[str, TunableFactorization] = {}
        for name, f in ctx.factorizations.items():
            t = tunable(f)
            if t is not None:
                tunables[name] = t
        train, held = _split(calibration_feeds(ctx, warn=False))
        if not tunables or not train:
            ctx.tuning = {"skipped": "nothing to tune" if not tunables else "too few calibration samples to hold some out"}
            return f"skipped ({ctx.tuning['skipped']})"
        start = time.perf_counter()
        graph = TorchGraph(ctx.model)
        reference = TorchGraph(ctx.original)
        nodes = {node_key(n): n for n in ctx.model.graph.node}
        views = {}
        for name in tunables:
            rec = ctx.record(name)
            views[name] = (rec.op, tuple(rec.shape), node_attrs(nodes[rec.nodes[0]]), rec.view)
        originals = graph_parameters(ctx.model, set(ctx.factorizations))
        gparams = {n: Relative(v.astype(np.float32), "value") for n, v in originals.items()}
        params = [p for t in tunables.values() for p in t.parameters()] + [g.delta for g in gparams.values()]
        mask_name = token_mask_input(ctx)
        with torch.no_grad():
            targets = [[t.detach() for t in reference(f)] for f in train + held]
        t_train, t_held = targets[:len(train)], targets[len(train):]

        def overrides() -> dict[str, torch.Tensor]:
            out = {n: weight_from_matrix(views[n][0], t.weight(), views[n][1], views[n][2], views[n][3]) for n, t in tunables.items()}
            out.update({n: g.value() for n, g in gparams.items()})
            return out

        def loss_of(feed: dict, target: list[torch.Tensor], ov: dict) -> torch.Tensor:
            outs = graph(feed, ov)
            mask = None if mask_name is None else torch.from_numpy(np.asarray(feed[mask_name]) != 0)
            terms = []
            for y, t in zip(outs, target):
                if not t.is_floating_point():
                    continue
                d2, t2 = (y - t) ** 2, t ** 2
                if mask is not None and t.dim() > mask.dim() and tuple(t.shape[:mask.dim()]) == tuple(mask.shape):
                    m = mask.reshape(tuple(mask.shape) + (1,) * (t.dim() - mask.dim())).to(t.dtype)
                    d2, t2 = d2 * m, t2 * m
                terms.append(d2.sum() / t2.sum().clamp_min(1e-30))
            return torch.stack(terms).mean()

        def held_loss() -> float:
            with torch.no_grad():
                ov = overrides()
                return float(np.mean([float(loss_of(f, t, ov)) for f, t in zip(held, t_held)]))

        opt = torch.optim.Adam(params, lr=self.lr)
        best = held_loss()
        first = best
        best_state = [p.detach().clone() for p in params]
        history = [round(first, 6)]
        rng = np.random.default_rng(ctx.config.seed)
        for _ in range(self.epochs):
            for i in rng.permutation(len(train))[:TUNE_EPOCH_BATCHES]:
                opt.zero_grad()
                loss_of(train[i], t_train[i], overrides()).backward()
                opt.step()
            h = held_loss()
            history.append(round(h, 6))
            if h < best:
                best = h
                best_state = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
        improved = best < first
        if improved:
            for name, t in tunables.items():
                before = ctx.factorizations[name].nbytes()
                f = ctx.factorizations[name] = t.result()
                assert f.nbytes() == before
                measure_layer(ctx.record(name), ctx.weights[name], f, ctx.calibration.get(name, {}).get("H"))
            for n, g in gparams.items():
                dt = originals[n].dtype
                set_graph_parameter(ctx.model, n, g.result(dt.name).astype(dt))
        ctx.tuning = {"epochs": self.epochs, "lr": self.lr, "held_out_loss": history, "kept": improved,
                      "layers": len(tunables), "graph_parameters": len(gparams),
                      "train_batches": len(train), "held_out_batches": len(held),
                      "seconds": round(time.perf_counter() - start, 2)}
        return (f"held-out relative error {first:.4g} -> {best:.4g} over {self.epochs} epochs "
                f"({len(tunables)} layers, {len(gparams)} graph parameters){'' if improved else '; not kept'}")
