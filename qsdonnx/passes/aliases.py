"""Seeing weights the way exporters store them: through aliases and small constant subgraphs.

Exporters rarely hand a MatMul its weight directly.  PyTorch reads a shared matrix through one
``Identity`` per use; float16 exports ``Cast`` a float16 constant to float32 before the MatMul;
others ``Transpose``, ``Reshape`` or ``Unsqueeze`` a constant, or keep it in a ``Constant`` node.
This pass resolves every weight input (see :data:`WEIGHT_SLOTS`) back to a constant:

* a chain of ``Identity`` nodes is an alias: the consumer reads the source tensor itself, so
  every consumer of a shared weight reads one initializer and the weight is compressed once;
* ``Cast``, ``Transpose``, ``Reshape``, ``Unsqueeze``, ``Squeeze`` and ``Flatten`` of a constant
  (with constant shape/axes inputs) are evaluated once, and the result becomes the initializer
  the consumer reads;
* a ``Constant`` node at the root of such a chain (or feeding the slot itself) is lifted.

Nodes left without consumers are removed; sources no longer read are dropped at commit.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph import all_nodes, remove_unused_initializers
from .base import Context, Pass

# Inputs that hold a weight, by op: what the rest of the pipeline compresses.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1), "Gemm": (1,), "Conv": (1,), "Gather": (0,),
    "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2), "ConvTranspose": (1,),
}
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# Ops whose weight is quantized as is and dequantized straight into its input slot.
IN_PLACE_OPS = RECURRENT_OPS + ("ConvTranspose",)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _reshape(x: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(node: onnx.NodeProto, consts: list) -> Optional[list[int]]:
    if len(consts) > 1 and consts[1] is not None:
        return [int(a) for a in consts[1]]
    axes = _attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(node, x, consts):
    axes = _axes(node, consts)
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


def _squeeze(node, x, consts):
    axes = _axes(node, consts)
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))


def _flatten(node, x, consts):
    axis = int(_attr(node, "axis", 1)) % max(x.ndim, 1) if x.ndim else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


FOLDS: dict[str, Callable] = {
    "Cast": lambda node, x, c: x.astype(onnx.helper.tensor_dtype_to_np_dtype(int(_attr(node, "to")))),
    "Transpose": lambda node, x, c: np.transpose(x, _attr(node, "perm")),
    "Reshape": lambda node, x, c: _reshape(x, c[1], int(_attr(node, "allowzero", 0))),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
}
# Inputs beyond the data input that must be constant for the fold (shape, axes).
FOLD_ARITY = {"Cast": 1, "Transpose": 1, "Reshape": 2, "Unsqueeze": 2, "Squeeze": 2, "Flatten": 1}


def einsum_matmul(equation: str, weight: int) -> Optional[bool]:
    """Whether a two-operand Einsum with a 2-D constant operand (``weight``: 0 or 1) is a MatMul
    ``X·W``: the activation's last index is summed with one index of the weight and the output
    is the activation's other indices, in order, then the weight's other index (``...k,kn->...n``,
    ``bsd,fd->bsf``).  Returns None when it is not; otherwise whether the weight is stored
    transposed (``(N, K)``)."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    ops = lhs.split(",")
    if len(ops) != 2:
        return None
    w, x = ops[weight], ops[1 - weight]
    if not arrow:  # implicit output: the indices seen once, in alphabetical order, after "..."
        letters = [c for c in lhs if c.isalpha()]
        out = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    body = x[3:] if x.startswith("...") else x
    if len(w) != 2 or not w.isalpha() or w[0] == w[1] or not body.isalpha() or not body:
        return None
    if len(set(body)) != len(body) or "." in out[3:] or (out.startswith("...") != x.startswith("...")):
        return None
    k = body[-1]
    if k not in w:
        return None
    n = w[1] if w[0] == k else w[0]
    if n in body or out != x[:-1] + n:
        return None
    return w[0] == n


class FoldWeightAliasesPass(Pass):
    """Resolves every weight input to an initializer (see the module docstring)."""

    name = "fold-aliases"

    def run(self, ctx: Context) -> str:
        graph = ctx.model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.graph_outputs = {o.name for o in graph.output}
        self.ctx = ctx
        self.removed: set[str] = set()  # keys of nodes replaced by an initializer
        self.lifted = self.folded = self.aliased = self.einsums = 0
        for node in graph.node:
            if node.op_type == "Einsum" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
                self._einsum_as_matmul(node)
        for node in graph.node:
            for slot in WEIGHT_SLOTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
                if len(node.input) <= slot or not node.input[slot]:
                    continue
                source = self._resolve(node.input[slot])
                if source is not None and source != node.input[slot]:
                    node.input[slot] = source
                    self.aliased += 1
        self._drop_dead_nodes()
        remove_unused_initializers(ctx.model)
        return (f"{self.lifted} Constant-node weights lifted, {self.folded} constant subgraphs folded, "
                f"{self.aliased} weight inputs read through aliases"
                + (f", {self.einsums} Einsum nodes read as MatMul" if self.einsums else ""))

    def _einsum_as_matmul(self, node: onnx.NodeProto) -> None:
        """Rewrites an Einsum that is ``X·W`` with a constant 2-D ``W`` (see :func:`einsum_matmul`)
        into that MatMul (a weight stored ``(N, K)`` becomes a transposed initializer)."""
        equation = _attr(node, "equation", b"")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        for slot in (1, 0):
            transposed = einsum_matmul(equation, slot)
            if transposed is None:
                continue
            name = node.input[slot]
            if self._producer_is_constant(name) is False:
                continue
            source = self._resolve(name)
            if source is None or len(self.inits[source].dims) != 2:
                continue
            if transposed:
                t = numpy_helper.from_array(np.ascontiguousarray(self.ctx.weight_array(self.inits[source]).T),
                                            f"{source}.einsum_t")
                if t.name not in self.inits:
                    self.ctx.model.graph.initializer.append(t)
                    self.inits[t.name] = self.ctx.model.graph.initializer[-1]
                    chain = self.ctx.folded.get(source, "")
                    self.ctx.folded[t.name] = f"{chain} -> Einsum transposed".lstrip(" ->")
                    if source in self.ctx.external:
                        self.ctx.external.add(t.name)
                source = t.name
            x = node.input[1 - slot]
            node.op_type = "MatMul"
            del node.attribute[:]
            del node.input[:]
            node.input.extend([x, source])
            self.einsums += 1
            return

    def _producer_is_constant(self, name: str) -> Optional[bool]:
        """False when ``name`` is certainly not a constant (a graph input or a computed tensor
        that no fold resolves); None when :meth:`_resolve` has to decide."""
        if name in self.inits:
            return True
        node = self.producer.get(name)
        if node is None:
            return False
        return None if node.op_type in ("Constant", "Identity") + tuple(FOLDS) else False

    def _resolve(self, name: str) -> Optional[str]:
        """The initializer that ``name`` stands for (creating it when a fold is needed), or None."""
        if name in self.inits:
            return name
        node = self.producer.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Constant":
            value = _attr(node, "value")
            if not isinstance(value, onnx.TensorProto):
                return None
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = name
            self._add(tensor, node)
            self.ctx.lifted.add(name)
            self.lifted += 1
            return name
        if node.op_type == "Identity":
            if name in self.graph_outputs:
                return None
            return self._resolve(node.input[0])
        fold = FOLDS.get(node.op_type)
        if fold is None or len(node.input) < 1 or name in self.graph_outputs:
            return None
        source = self._resolve(node.input[0])
        if source is None:
            return None
        consts = [None]
        for extra in node.input[1:FOLD_ARITY[node.op_type]]:
            src = self._resolve(extra) if extra else None
            if extra and src is None:
                return None
            consts.append(numpy_helper.to_array(self.inits[src]) if src else None)
        try:
            value = fold(node, self.ctx.weight_array(self.inits[source]), consts)
        except (ValueError, TypeError, IndexError):
            return None
        self._add(numpy_helper.from_array(np.ascontiguousarray(value), name), node)
        chain = self.ctx.folded.get(source, "")
        self.ctx.folded[name] = f"{chain} -> {node.op_type}".lstrip(" ->") if chain else node.op_type
        if source in self.ctx.external:
            self.ctx.external.add(name)
        self.folded += 1
        return name

    def _add(self, tensor: onnx.TensorProto, node: onnx.NodeProto) -> None:
        self.ctx.model.graph.initializer.append(tensor)
        self.inits[tensor.name] = self.ctx.model.graph.initializer[-1]
        self.removed.add(node.output[0])

    def _drop_dead_nodes(self) -> None:
        """Removes the nodes replaced by initializers and alias nodes no one reads any more."""
        graph = self.ctx.model.graph
        keep = [n for n in graph.node if n.output[0] not in self.removed] if self.removed else list(graph.node)
        while True:
            used = {o.name for o in graph.output}
            for n in keep:
                used.update(n.input)
                for a in n.attribute:
                    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                        used.update(_subgraph_inputs(a))
            dead = [n for n in keep if n.op_type in ("Identity",) + tuple(FOLDS) + ("Constant",)
                    and n.domain in ("", "ai.onnx") and not any(o in used for o in n.output)]
            if not dead:
                break
            dead_ids = {n.output[0] for n in dead}
            keep = [n for n in keep if n.output[0] not in dead_ids]
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)


def _subgraph_inputs(attr: onnx.AttributeProto) -> set[str]:
    graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
    return {name for g in graphs for n in all_nodes(g) for name in n.input}
