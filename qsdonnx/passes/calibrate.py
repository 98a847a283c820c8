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
from ..store import release_pages, tensor_nbytes
from .base import Context, Pass, WeightRecord
from .bias import GraphIndex, find_bias_slots
from .canonicalize import node_attrs
from .layer_stats import MATRICES, SPILL_BYTES, HessianAccumulator, LayerStats, MatrixFiles, accumulator_bytes
from .segments import cut as segments_of
from .validate import fixed_batch, generated_inputs, load_feeds, run_feed

log = logging.getLogger("qsdonnx")

# Weights and accumulators one calibration session may hold; a larger model runs in segments.
SEGMENT_BYTES = 1 << 30
# Activations crossing a segment boundary kept in memory (beyond it: in a temporary folder).
ACTIVATION_CACHE_BYTES = 512 << 20


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
    """Fills ``ctx.calibration[weight]`` (a :class:`LayerStats`: ``H``, ``mean``, ``rows``, ...)
    for MatMul, Gemm and Conv weights.

    A model whose weights and accumulated matrices together exceed :data:`SEGMENT_BYTES` is run
    in consecutive segments within that budget (``passes.segments``): every batch through one
    segment, then the next, with the activations that cross a boundary cached (in memory up to
    :data:`ACTIVATION_CACHE_BYTES`, on disk beyond) and each segment's matrices finished before
    the next segment starts.  Other models run as one session."""

    name = "calibrate"

    def run(self, ctx: Context) -> str:
        from ..store import structure_copy

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
        # Layers reading the same tensor the same way (q, k and v projections) share one H.
        share: dict[str, str] = {}
        for name, users in targets.items():
            for node, rec in users:
                share.setdefault(rec.name, f"{name}|{rec.view}|{self._row_key(node, rec)}")
        # With CALDERA, every other batch is also summed on its own: the planner fits its
        # candidates on one half and predicts their error on the other (see passes.factorize).
        # Other methods are not fitted to data when the planner predicts their error.
        self.split = ctx.config.method == "caldera"
        self.targets, self.share = targets, share
        self.accs: dict[str, HessianAccumulator] = {}
        self.half: dict[str, HessianAccumulator] = {}
        feeds = calibration_feeds(ctx)
        mask_name = token_mask_input(ctx)
        masks = [None if mask_name is None else np.asarray(f[mask_name]) != 0 for f in feeds]
        model, weights = structure_copy(ctx.model)  # the weights go to the sessions as they are
        sizes = {t.name: tensor_nbytes(t) for t in weights}
        K_of = {key: ctx.record(w).matrix_shape[0] for w, key in share.items()}
        matrix_bytes = sum(4 * K * K for K in K_of.values())
        index = GraphIndex(ctx.model.graph)
        slots = {w: find_bias_slots(ctx.model, ctx.record(w), index) for w in share}
        self.stats_store = MatrixFiles() if matrix_bytes > SPILL_BYTES else None
        # (The structure copy keeps the nodes, in their order.)
        pos = {node_key(n): i for i, n in enumerate(ctx.model.graph.node)}
        first = {name: min(pos[node_key(node)] for node, _ in users) for name, users in targets.items()}
        cost = self._costs(model, sizes, first, K_of)
        segments = None
        if sum(cost) > SEGMENT_BYTES:
            segments = segments_of(model.graph, cost.__getitem__, SEGMENT_BYTES, sizes)
        bar = tqdm(total=len(feeds) * (len(segments) if segments else 1), desc="calibrating", unit="batch",
                   disable=not ctx.config.progress, leave=False)
        if segments is None or len(segments) == 1:
            self._one_session(ctx, model, weights, list(targets), feeds, masks, bar)
            self._finish(ctx, set(share.values()), slots)
        else:
            self._segmented(ctx, model, weights, segments, first, feeds, masks, slots, bar)
        bar.close()
        samples = sum(map(_samples, feeds))
        centered = sum(1 for w in share if w in ctx.calibration and slots[w])
        for w in share:
            if w in ctx.calibration and slots[w]:
                ctx.record(w).extra["bias_slots"] = slots[w]
        ctx.calib_info = {"samples": samples, "batches": len(feeds), "token_mask": mask_name,
                          "source": str(ctx.config.calib) if ctx.config.calib else "generated",
                          "segments": len(segments) if segments else 1}
        where = f", in {len(segments)} segments" if segments and len(segments) > 1 else ""
        return (f"{len(ctx.calibration)} layers calibrated on {samples} samples ({len(set(share.values()))} "
                f"distinct inputs; {centered} with a bias to absorb the mean error{where})")

    def _costs(self, model: onnx.ModelProto, sizes: dict, first: dict, K_of: dict) -> list[int]:
        """Bytes each node adds to a segment: the large weights it reads first, and the
        accumulators (and their result) of the inputs first read there."""
        from .segments import node_reads

        cost = [0] * len(model.graph.node)
        seen: set[str] = set()
        for i, node in enumerate(model.graph.node):
            for name in node_reads(node):
                if name in sizes and name not in seen:
                    seen.add(name)
                    cost[i] += sizes[name]
        keys: set[str] = set()
        for name, users in self.targets.items():
            for _, rec in users:
                key = self.share[rec.name]
                if key in keys:
                    continue
                keys.add(key)
                K = K_of[key]
                cost[first[name]] += accumulator_bytes(K) * (2 if self.split else 1) + 4 * K * K
        return cost

    def _add(self, name: str, value, batch: int, mask) -> None:
        x = torch.from_numpy(np.array(value, dtype=np.float32))
        done = set()
        for node, rec in self.targets[name]:
            key = self.share[rec.name]
            if key in done:
                continue
            done.add(key)
            rows = self._rows(x, node, rec)
            if rows is None:
                continue
            if mask is not None and rec.view in ("matmul", "gemm") and tuple(x.shape[:-1]) == mask.shape:
                # Padded positions compute activations no output depends on.
                rows = rows[torch.from_numpy(mask.reshape(-1))]
            self.accs.setdefault(key, HessianAccumulator(rec.matrix_shape[0])).add(rows)
            if self.split and batch % 2 == 0:
                self.half.setdefault(key, HessianAccumulator(rec.matrix_shape[0])).add(rows)

    def _one_session(self, ctx, model, weights, names, feeds, masks, bar) -> None:
        from ..runtime import session

        existing = {o.name for o in model.graph.output}
        for name in names:
            if name not in existing:
                rec_dtype = self.targets[name][0][1].dtype
                t = onnx.TensorProto.FLOAT16 if rec_dtype == "float16" else onnx.TensorProto.FLOAT
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, t, None))
        sess = session(model, base_dir=ctx.base_dir, initializers=weights)
        for batch, feed in enumerate(feeds):
            for name, value in zip(names, run_feed(sess, names, feed)):
                self._add(name, value, batch, masks[batch])
            bar.update(1)

    def _segmented(self, ctx, model, weights, segments, first, feeds, masks, slots, bar) -> None:
        from ..runtime import session
        from .segments import ActivationCache, segment_model

        big = {t.name: t for t in weights}
        small = {t.name: t for t in model.graph.initializer}
        last_read: dict[str, int] = {}
        for s, seg in enumerate(segments):
            for n in seg.inputs:
                last_read[n] = s
        seg_of = [0] * len(model.graph.node)
        for s, seg in enumerate(segments):
            for i in seg.nodes:
                seg_of[i] = s
        mine: dict[int, list[str]] = defaultdict(list)
        for name in self.targets:
            mine[seg_of[first[name]]].append(name)
        cache = ActivationCache(ACTIVATION_CACHE_BYTES)

        def value(b: int, n: str):
            return cache.get(b, n) if (b, n) in cache else feeds[b][n]

        try:
            for s, seg in enumerate(segments):
                names = mine.get(s, [])
                want = list(seg.outputs) + [n for n in names if n not in seg.inputs and n not in seg.outputs]
                active = bool(want or names)  # (else nothing later reads what it computes)
                sess = None
                if want:
                    sub = segment_model(model, seg, want, {n: value(0, n) for n in seg.inputs}, small)
                    sess = session(sub, base_dir=ctx.base_dir,
                                   initializers=[big[n] for n in seg.initializers if n in big])
                for b in range(len(feeds) if active else 0):
                    inputs = {n: value(b, n) for n in seg.inputs}
                    outs = dict(zip(want, run_feed(sess, want, inputs))) if sess is not None else {}
                    for n in seg.outputs:
                        cache.put(b, n, outs[n])
                    for n in names:
                        self._add(n, inputs[n] if n in inputs else outs[n], b, masks[b])
                    bar.update(1)
                del sess
                release_pages([big[n] for n in seg.initializers if n in big], ctx.base_dir)
                bar.update(0 if active else len(feeds))
                cache.drop({n for n in seg.inputs if last_read[n] <= s})
                self._finish(ctx, {self.share[r.name] for n in names for _, r in self.targets[n]}, slots)
        finally:
            cache.close()

    def _finish(self, ctx: Context, keys: set[str], slots: dict) -> None:
        """Each key's matrices, for the weights that read it (kept on disk when large); the
        accumulators are dropped."""
        for key in sorted(keys):
            acc = self.accs.pop(key, None)
            if acc is None:
                continue
            fit = self.half.pop(key, None)
            check = acc.minus(fit) if fit is not None else None
            users = [w for w, k in self.share.items() if k == key]
            variants = sorted({bool(slots[w]) for w in users})  # uncentred first
            out = {}
            for j, centered in enumerate(variants):
                stats = acc.result(centered=centered, in_place=j == len(variants) - 1)
                if fit is not None and fit.rows and check.rows:
                    stats["H_fit"] = fit.result(centered=centered)["H"]
                    stats["H_check"] = check.result(centered=centered)["H"]
                out[centered] = self._kept(stats)
            for w in users:
                ctx.calibration[w] = out[bool(slots[w])].copy()

    def _kept(self, stats: dict) -> LayerStats:
        if self.stats_store is None:
            return LayerStats(stats)
        files = {k: self.stats_store.save(stats.pop(k)) for k in MATRICES if k in stats}
        return LayerStats(stats, files, self.stats_store)

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
