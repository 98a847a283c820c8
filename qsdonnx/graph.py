"""Small helpers for editing an ONNX graph: unique names, new initializers, node replacement."""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .factorize.packing import pack_bits
from .factorize.types import container_width

NP_TO_ONNX = {
    "float32": onnx.TensorProto.FLOAT,
    "float16": onnx.TensorProto.FLOAT16,
}

# ONNX integer element types by (bits, signed).
INT_TYPES = {
    (2, True): onnx.TensorProto.INT2,
    (2, False): onnx.TensorProto.UINT2,
    (4, True): onnx.TensorProto.INT4,
    (4, False): onnx.TensorProto.UINT4,
    (8, True): onnx.TensorProto.INT8,
    (8, False): onnx.TensorProto.UINT8,
}


def int_tensor(name: str, values: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    """A packed INT2/INT4/INT8 (or unsigned) tensor: flat row-major order, first value in the
    lowest bits of each byte, values two's complement when signed."""
    cbits = container_width(bits)
    dtype = INT_TYPES[(cbits, signed)]
    # Two's complement low bits, taken from one byte per code (codes fit their container, so
    # the narrowing is exact), never from a wider copy of the codes.
    flat = np.ascontiguousarray(values).astype(np.int8 if signed else np.uint8, copy=False).reshape(-1).view(np.uint8)
    mask = np.uint8((1 << cbits) - 1)
    raw = pack_bits(flat & mask, cbits)
    return helper.make_tensor(name, dtype, list(values.shape), raw.tobytes(), raw=True)


def float_tensor(name: str, values: np.ndarray, dtype: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values).astype(dtype), name)


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's payload as stored in the file (external data is not read)."""
    from .store import tensor_nbytes as stored_nbytes

    return stored_nbytes(t)


def node_key(node: onnx.NodeProto) -> str:
    """A node's name, or its first output when unnamed (unique in a valid graph)."""
    return node.name or node.output[0]


class GraphEdit:
    """Collects new initializers and node replacements, then applies them in topological order.

    Generated names are deterministic: ``<weight>.qsd.<part>``; a numeric suffix is added only
    when that name is already taken.
    """

    def __init__(self, model: onnx.ModelProto, base_dir=None, spill=None):
        self.model = model
        self.spill = spill  # a store.TensorSpill that new initializers are written to as they come
        self.base_dir = base_dir  # where the model's external data lives (qsdonnx.store)
        self.graph = model.graph
        self.taken: set[str] = set()
        for t in self.graph.initializer:
            self.taken.add(t.name)
        for v in list(self.graph.input) + list(self.graph.output) + list(self.graph.value_info):
            self.taken.add(v.name)
        for n in self.graph.node:
            self.taken.update(n.output)
            self.taken.update(n.input)
            if n.name:
                self.taken.add(n.name)
        self.new_initializers: list[onnx.TensorProto] = []
        self.committed_bytes = 0  # bytes of new initializers already moved into the graph
        self.before: dict[int, list[onnx.NodeProto]] = {}  # node index -> nodes emitted before it
        self.replace: dict[int, list[onnx.NodeProto]] = {}
        # protobuf hands out new wrapper objects on each access, so nodes are keyed by name.
        self.index = {node_key(n): i for i, n in enumerate(self.graph.node)}
        self.removed_weights: set[str] = set()
        self.shared: dict = {}  # small constants reused by every weight, by value (shared_const)

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The values of one of the model's tensors (external data read from ``base_dir``)."""
        from .store import tensor_array

        return tensor_array(tensor, self.base_dir)

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name = f"{base}.{k}"
            k += 1
        self.taken.add(name)
        return name

    def add_initializer(self, tensor: onnx.TensorProto) -> str:
        tensor.name = self.unique(tensor.name)
        if self.spill is not None:
            tensor = self.spill.put(tensor)
        self.new_initializers.append(tensor)
        return tensor.name

    def shared_const(self, name: str, values, dtype: str) -> str:
        """A small constant that depends only on ``name``, ``values`` and ``dtype``: stored once
        per model (``qsd.<name>``) and reused by every weight."""
        v = np.asarray(values).astype(dtype)
        key = (name, dtype, v.shape, v.tobytes())
        if key not in self.shared:
            self.shared[key] = self.add_initializer(numpy_helper.from_array(v, f"qsd.{name}"))
        return self.shared[key]

    def node(self, op: str, inputs: Iterable[str], name: str, outputs: Optional[list[str]] = None,
             domain: str = "", **attrs) -> onnx.NodeProto:
        node_name = self.unique(name)
        outs = outputs if outputs is not None else [self.unique(name + ".out")]
        return helper.make_node(op, list(inputs), outs, name=node_name, domain=domain or None, **attrs)

    def replace_node(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto],
                     prelude: Optional[list[onnx.NodeProto]] = None) -> None:
        i = self.index[node_key(node)]
        self.replace[i] = new_nodes
        if prelude:
            self.before.setdefault(i, []).extend(prelude)

    def new_initializer_bytes(self) -> int:
        return self.committed_bytes + sum(tensor_nbytes(t) for t in self.new_initializers)

    def commit(self) -> None:
        nodes: list[onnx.NodeProto] = []
        for i, n in enumerate(self.graph.node):
            nodes.extend(self.before.get(i, []))
            nodes.extend(self.replace.get(i, [n]))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        # Moved one at a time (appending copies a tensor), so no tensor is held twice for long.
        self.new_initializers.reverse()
        while self.new_initializers:
            t = self.new_initializers.pop()
            self.committed_bytes += tensor_nbytes(t)
            self.graph.initializer.append(t)
        remove_unused_initializers(self.model)


def all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of the subgraphs its nodes hold (If, Loop, Scan bodies)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from all_nodes(g)


def consumed_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name a node of the model (subgraphs included) reads, plus graph outputs."""
    used: set[str] = {o.name for o in model.graph.output}
    for n in all_nodes(model.graph):
        used.update(n.input)
    return used


def remove_unused_initializers(model: onnx.ModelProto) -> list[str]:
    """Drop initializers no node (in any subgraph) and no graph output refers to."""
    used = consumed_names(model)
    gone = [i for i, t in enumerate(model.graph.initializer) if t.name not in used]
    dropped = [model.graph.initializer[i].name for i in gone]
    if dropped:
        # Deleted in place: re-adding the kept ones would copy every tensor.
        for i in reversed(gone):
            del model.graph.initializer[i]
        names = set(dropped)
        inputs = [i for i in model.graph.input if i.name not in names]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    return dropped
