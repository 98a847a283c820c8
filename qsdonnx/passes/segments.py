"""A graph cut into consecutive segments, each run as a model of its own.

Calibration of a large model runs it one segment at a time: a segment's session holds only the
weights its nodes read, and only the activations that later segments read (its boundary) are
kept between segments, in memory up to a budget and on disk beyond it.  Nodes keep the graph's
topological order, so every tensor a segment reads is a graph input, an initializer, or the
output of this or an earlier segment.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import onnx


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a graph's nodes read from outside the graph (subgraphs included)."""
    inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads |= {n for n in node_reads(node) if n not in inner}
        inner |= set(node.output)
    return reads


def node_reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs and what its subgraphs (If, Loop, Scan) read from it."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            names += sorted(graph_reads(g))
    return names


@dataclass
class Segment:
    nodes: list[int]  # indices into graph.node
    inputs: list[str] = field(default_factory=list)  # activations it reads (graph inputs, earlier segments)
    outputs: list[str] = field(default_factory=list)  # activations later segments read
    initializers: list[str] = field(default_factory=list)


def cut(graph: onnx.GraphProto, cost: Callable[[int], int], budget: int,
        initializers: Iterable[str] = ()) -> list[Segment]:
    """Consecutive runs of ``graph``'s nodes whose summed ``cost(node index)`` stays within
    ``budget`` (a node costing more has a segment of its own), with each segment's boundary;
    ``initializers`` names tensors held apart from the graph (as its own initializers are)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i in range(len(graph.node)):
        c = cost(i)
        if groups[-1] and used + c > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += c
    inits = {t.name for t in graph.initializer} | set(initializers)
    produced_in: dict[str, int] = {}
    reads = [sorted(set(r for i in g for r in node_reads(graph.node[i]))) for g in groups]
    segments = []
    for s, g in enumerate(groups):
        for i in g:
            for o in graph.node[i].output:
                if o:
                    produced_in[o] = s
        segments.append(Segment(nodes=g))
    for s, seg in enumerate(segments):
        for name in reads[s]:
            if name in inits:
                seg.initializers.append(name)
            elif produced_in.get(name, -1) != s:
                if produced_in.get(name, -1) > s:
                    raise ValueError(f"the graph's nodes are not in topological order ({name!r} is read before "
                                     "the node that computes it)")
                seg.inputs.append(name)
                if name in produced_in:
                    src = segments[produced_in[name]]
                    if name not in src.outputs:
                        src.outputs.append(name)
    return segments


def segment_model(model: onnx.ModelProto, seg: Segment, outputs: list[str], inputs: dict[str, np.ndarray],
                  small: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """The model of one segment: its nodes, ``inputs`` (name -> an example value, for the input's
    type), the initializers of ``small`` it reads (the others are handed to the session apart)
    and ``outputs`` (their types are left to ONNX Runtime)."""
    from ..store import _copy_fields

    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    g = out.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node[i] for i in seg.nodes)
    for name, value in inputs.items():
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
        dims = [f"{name}_d{k}" for k in range(np.ndim(value))]
        g.input.append(onnx.helper.make_tensor_value_info(name, elem, dims))
    g.initializer.extend(small[n] for n in seg.initializers if n in small)
    g.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    return out


class ActivationCache:
    """Boundary activations per batch: in memory up to ``budget`` bytes, in a temporary folder beyond."""

    def __init__(self, budget: int):
        self.budget = budget
        self.held = 0
        self.values: dict[tuple[int, str], np.ndarray] = {}
        self.on_disk: dict[tuple[int, str], Path] = {}
        self._dir: Optional[Path] = None
        self._written = 0

    def put(self, batch: int, name: str, value) -> None:
        value = np.asarray(value)
        key = (batch, name)
        if self.held + value.nbytes <= self.budget:
            self.values[key] = value
            self.held += value.nbytes
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="qsdonnx-activations-"))
        self._written += 1
        path = self._dir / f"{self._written}.npy"
        np.save(path, value, allow_pickle=False)
        self.on_disk[key] = path

    def get(self, batch: int, name: str) -> np.ndarray:
        key = (batch, name)
        if key in self.values:
            return self.values[key]
        return np.load(self.on_disk[key], allow_pickle=False)

    def __contains__(self, key: tuple[int, str]) -> bool:
        return key in self.values or key in self.on_disk

    def drop(self, names: set[str]) -> None:
        for key in [k for k in self.values if k[1] in names]:
            self.held -= self.values.pop(key).nbytes
        for key in [k for k in self.on_disk if k[1] in names]:
            self.on_disk.pop(key).unlink(missing_ok=True)

    def close(self) -> None:
        self.values.clear()
        self.on_disk.clear()
        self.held = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
