"""Rotates the inputs of calibrated MatMul and Gemm layers (``--rotate``).

For every activation that feeds compressible layers, the graph gains one small rotation,
``X·R`` with ``R = diag(Q, …, Q)`` (see :mod:`qsdonnx.factorize.rotation`), built as

    Shape(X) ─────────────────────────────┐
    X → Reshape(−1, b) → MatMul(Q) → Reshape(shape of X) → X_rot

and every compressible layer reading ``X`` reads ``X_rot`` and holds ``Rᵀ·W`` instead of ``W``.
The rotated model computes what the original does; the layers' calibration statistics are
rotated with it (``H → Rᵀ·H·R``, ``μ → μ·R``), so everything after this pass (planning,
factorization, bias correction, tuning, lowering) works on the rotated weights unchanged.

Layers that share an input share its rotation (a transformer's query, key and value
projections rotate their input once), and one ``Q`` serves the whole model.  Its bytes (and
those of the reshape constant) are counted with the compressed weights and kept out of the
planner's budget.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from ..factorize.rotation import (random_orthogonal, rotatable, rotate_input, rotate_second_moment,
                                  rotate_weight)
from ..graph import GraphEdit, node_key
from .base import Context, Pass, WeightRecord
from .canonicalize import node_attrs, weight_from_matrix

ROTATED_STATS = ("H", "H_fit", "H_check")


def _eligible(rec: WeightRecord, ctx: Context, nodes: dict) -> str:
    if rec.view not in ("matmul", "gemm"):
        return "not a MatMul or Gemm"
    if rec.dtype != "float32":
        return "not float32"
    if rec.name not in ctx.calibration:
        return "not calibrated"
    if not rotatable(rec.matrix_shape[0], ctx.config.rotate_block):
        return f"input size {rec.matrix_shape[0]} not a multiple of {ctx.config.rotate_block}"
    if any(node_attrs(nodes[k]).get("transA", 0) for k in rec.nodes):
        return "Gemm with transA"
    return ""


class RotateInputsPass(Pass):
    """Block-rotates the inputs of calibrated MatMul/Gemm layers (see the module docstring)."""

    name = "rotate"

    def run(self, ctx: Context) -> str:
        b = ctx.config.rotate_block
        nodes = {node_key(n): n for n in ctx.model.graph.node}
        by_input: dict[str, list[WeightRecord]] = defaultdict(list)
        for rec in ctx.candidates():
            why_not = _eligible(rec, ctx, nodes)
            if why_not:
                rec.extra["not_rotated"] = why_not
                continue
            inputs = {nodes[k].input[0] for k in rec.nodes}
            for x in inputs:
                by_input[x].append(rec)
        if not by_input:
            return "no layer to rotate"
        Q = random_orthogonal(b, ctx.config.seed)
        edit = GraphEdit(ctx.model, ctx.base_dir)
        q_name = edit.add_initializer(numpy_helper.from_array(Q, "qsd.rotation"))
        flat = edit.shared_const(f"rotation_flat{b}", [-1, b], "int64")
        rotated: dict[str, WeightRecord] = {}
        for x, recs in by_input.items():
            consumers = sorted({k for r in recs for k in r.nodes if nodes[k].input[0] == x}, key=edit.index.get)
            tag = f"{x}.qsd.rotate"
            shape = edit.node("Shape", [x], f"{tag}.shape")
            rows = edit.node("Reshape", [x, flat], f"{tag}.rows")
            turned = edit.node("MatMul", [rows.output[0], q_name], f"{tag}.matmul")
            out = edit.node("Reshape", [turned.output[0], shape.output[0]], f"{tag}.out")
            for i, k in enumerate(consumers):
                node = onnx.NodeProto()
                node.CopyFrom(nodes[k])
                node.input[0] = out.output[0]
                edit.replace_node(nodes[k], [node], prelude=[shape, rows, turned, out] if i == 0 else None)
            for r in recs:
                rotated[r.name] = r
        # A weight read by several nodes is rotated once, and only when every node reads a rotated input.
        inits = {t.name: t for t in ctx.model.graph.initializer}
        for name, rec in rotated.items():
            W = rotate_weight(ctx.weights[name], Q)
            ctx.weights[name] = W
            attrs = node_attrs(nodes[rec.nodes[0]])
            tensor = weight_from_matrix(rec.op, W, rec.shape, attrs, rec.view).astype(np.float32)
            inits[name].CopyFrom(numpy_helper.from_array(tensor, name))
            stats = ctx.calibration[name]
            for key in ROTATED_STATS:
                if key in stats:
                    stats[key] = rotate_second_moment(stats[key], Q)
            if "mean" in stats:
                stats["mean"] = rotate_input(np.asarray(stats["mean"]), Q)
            rec.extra["rotation_block"] = b
        edit.commit()
        ctx.rotation = {"block": b, "inputs": len(by_input), "layers": len(rotated),
                        "bytes": edit.new_initializer_bytes()}
        return f"{len(rotated)} layers read {len(by_input)} inputs rotated in blocks of {b}"
