"""Bias slots and bias correction.

A layer ``Y = X·W + b`` whose bias is a constant of its own can absorb the mean of its
output error for free.  With ``μ = E[x]`` and ``Σ = E[(x − μ)ᵀ(x − μ)] = H − μᵀμ``,

    E‖x·(W − Ŵ) − δ‖²  is least at  δ = μ·(W − Ŵ),  where it equals  tr((W − Ŵ)ᵀ Σ (W − Ŵ)),

so such layers are fitted to the centred second moment ``Σ`` (calibration) and ``b + δ`` is
written back after factorization (this pass).  Layers without such a bias keep ``H = E[xᵀx]``,
which already counts the mean error.

The bias found per consumer node:

* ``MatMul`` whose only reader is an ``Add`` of a float ``(N,)`` initializer: that initializer;
* ``Gemm`` with a float ``(N,)`` or ``(1, N)`` initializer ``C`` (scaled by ``1 / beta``; the
  matrix view already holds ``alpha``);
* ``Conv`` with its bias input ``B`` of shape ``(N,)``.

The initializer must be read by that node only, since it is rewritten.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import node_key
from .base import Context, Pass, WeightRecord
from .canonicalize import node_attrs

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


class GraphIndex:
    """The readers of every tensor, the initializers and the graph outputs, built once."""

    def __init__(self, graph: onnx.GraphProto):
        self.readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.by_key: dict[str, onnx.NodeProto] = {}
        for n in graph.node:
            self.by_key[node_key(n)] = n
            for i in n.input:
                self.readers[i].append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}


def bias_add_of(index: GraphIndex, node: onnx.NodeProto) -> tuple[Optional[onnx.NodeProto], Optional[str]]:
    """The ``Add`` that is the only reader of ``node``'s output, and the Add's other input;
    ``(None, None)`` when there is none (or the output is also a graph output)."""
    y = node.output[0]
    r = index.readers.get(y, [])
    if y in index.outputs or len(r) != 1 or r[0].op_type != "Add" or r[0].domain not in ("", "ai.onnx"):
        return None, None
    add = r[0]
    other = add.input[1] if add.input[0] == y else add.input[0]
    return (add, other) if other != y else (None, None)


def find_bias_slots(model: onnx.ModelProto, rec: WeightRecord,
                    index: Optional[GraphIndex] = None) -> Optional[list[tuple[str, float]]]:
    """``[(initializer, factor), ...]``, one per consumer node of ``rec``, such that adding
    ``factor · δ`` to each initializer adds ``δ`` to the layer's output; None when some
    consumer has no bias of its own.  ``index`` (of ``model``) saves rebuilding it per weight."""
    if rec.view not in ("matmul", "gemm", "conv"):
        return None
    N = rec.matrix_shape[1]
    index = index or GraphIndex(model.graph)
    slots = []
    for key in rec.nodes:
        node = index.by_key.get(key)
        if node is None:
            return None
        name, factor = None, 1.0
        if node.op_type == "MatMul":
            name = bias_add_of(index, node)[1]
        elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            beta = float(node_attrs(node).get("beta", 1.0))
            if beta != 0.0:
                name, factor = node.input[2], 1.0 / beta  # alpha is folded into the matrix view
        elif node.op_type == "Conv" and len(node.input) > 2 and node.input[2]:
            name = node.input[2]
        t = index.inits.get(name) if name else None
        if t is None or t.data_type not in FLOATS or len(index.readers.get(name, [])) != 1:
            return None
        if tuple(t.dims) not in ((N,), (1, N)):
            return None
        slots.append((name, factor))
    return slots or None


def correct_bias(ctx: Context, rec, f, inits: dict | None = None) -> bool:
    """Adds ``δ = μ·(W − Ŵ)`` to the bias of one compressed layer fitted to a centred ``Σ``
    (``inits``: the graph's initializers by name); whether it did."""
    stats = ctx.calibration.get(rec.name) if ctx.calibration else None
    slots = rec.extra.get("bias_slots")
    if rec.status != "compressed" or not stats or not stats.get("centered") or not slots:
        return False
    if inits is None:
        inits = {t.name: t for t in ctx.model.graph.initializer}
    W = ctx.weights[rec.name].astype(np.float64)
    delta = np.asarray(stats["mean"], np.float64) @ (W - f.dense().astype(np.float64))
    for init_name, factor in slots:
        t = inits[init_name]
        b = ctx.weight_array(t)
        nb = (b.astype(np.float64) + factor * delta.reshape(b.shape)).astype(b.dtype)
        t.CopyFrom(numpy_helper.from_array(nb, init_name))
    rec.extra["bias_corrected"] = True
    return True


class BiasCorrectionPass(Pass):
    """Adds ``δ = μ·(W − Ŵ)`` to the bias of every compressed layer fitted to a centred ``Σ``."""

    name = "bias-correction"

    def run(self, ctx: Context) -> str:
        inits = {t.name: t for t in ctx.model.graph.initializer}
        done = sum(correct_bias(ctx, ctx.record(name), f, inits) for name, f in ctx.factorizations.items())
        return f"{done} biases corrected for the mean output error"
