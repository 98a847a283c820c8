"""End-to-end sensitivity of each weight, measured in ONNX Runtime.

The planner's per-layer error ``e_l = tr(ΔᵀHΔ)/tr(WᵀHW)`` says how much a layer's own output
moves, not how much the model's output does: a LayerNorm, a residual path or a softmax can
shrink or amplify it.  Here every candidate weight becomes a graph input of one session; for
each weight in turn the model runs with only that weight replaced by a probe reconstruction,
and the relative squared change of the outputs, divided by the probe's ``e_l``, is the
weight's sensitivity ``α_l``.  The planner then minimizes ``Σ α_l·e_l`` (first-order,
additive model of the end-to-end error).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper
from tqdm import tqdm

from ..graph import node_key
from .base import Context, WeightRecord
from .canonicalize import node_attrs, weight_from_matrix
from .validate import run_feed

log = logging.getLogger("qsdonnx")


def measure_sensitivity(ctx: Context, probes: dict[str, list[tuple[np.ndarray, float]]], feeds: list[dict],
                        progress: bool = False) -> dict[str, float]:
    """``α_l`` for each weight in ``probes`` (name → [(probe matrix Ŵ in the (K, N) view, e_l), ...]):
    the largest ratio over the probes, so a layer whose damage grows faster than linearly at
    coarse settings is judged by its worst case."""
    from ..runtime import session

    from ..store import structure_copy

    model, big = structure_copy(ctx.model)  # the weights go to the session as they are
    recs = {r.name: r for r in ctx.records if r.name in probes}
    nodes = {node_key(n): n for n in model.graph.node}
    originals: dict[str, np.ndarray] = {}
    keep = []
    for t in list(model.graph.initializer) + big:
        if t.name in recs:
            originals[t.name] = ctx.weight_array(t)
            model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            keep.append(t)
    fixed = [t for t in big if t.name not in recs]
    fixed_names = {t.name for t in fixed}
    del model.graph.initializer[:]
    model.graph.initializer.extend(t for t in keep if t.name not in fixed_names)
    # Probabilities hide what matters for a decision (a near-tie that flips an argmax moves
    # them very little): outputs made by Softmax are measured on its input, the logits.
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = []
    for o in model.graph.output:
        n = producer.get(o.name)
        if n is not None and n.op_type in ("Softmax", "LogSoftmax"):
            logits = n.input[0]
            model.graph.output.append(onnx.helper.make_tensor_value_info(logits, o.type.tensor_type.elem_type, None))
            outputs.append(logits)
        else:
            outputs.append(o.name)
    sess = session(model, base_dir=ctx.base_dir, initializers=fixed)

    def run(weights: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = []
        for feed in feeds:
            outs.extend(np.asarray(v, np.float64).ravel() for v in run_feed(sess, outputs, {**feed, **weights}))
        return outs

    ref = run(originals)
    ref_energy = sum(float(r @ r) for r in ref) or 1.0
    alphas: dict[str, float] = {}
    for name in tqdm(list(probes), desc="sensitivity", unit="weight", disable=not progress, leave=False):
        rec: WeightRecord = recs[name]
        node = nodes[rec.nodes[0]]
        ratios = []
        for matrix, e in probes[name]:
            w = weight_from_matrix(rec.op, matrix, rec.shape, node_attrs(node), rec.view).astype(originals[name].dtype)
            got = run({**originals, name: np.ascontiguousarray(w)})
            change = sum(float((a - b) @ (a - b)) for a, b in zip(ref, got)) / ref_energy
            ratios.append(change / max(e, 1e-12))
        alphas[name] = max(ratios)
    return alphas
