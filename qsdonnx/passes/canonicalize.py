"""Finding the weights to compress and viewing each as a ``(K, N)`` matrix used as ``X @ W``."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import MutableMapping
from typing import Optional

import numpy as np
import onnx

from ..graph import node_key
from .aliases import RECURRENT_OPS, WEIGHT_SLOTS
from .base import Context, Pass, WeightRecord

FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16"}
QUANTIZED_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear",
                 "MatMulNBits", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul", "QGemm")
SUBGRAPH_OPS = {"If", "Loop", "Scan"}


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _walk_subgraph_nodes(graph: onnx.GraphProto, owner: str):
    for node in graph.node:
        yield node, owner
        for g in _subgraphs(node):
            yield from _walk_subgraph_nodes(g, owner)


def matrix_view(op: str, weight: np.ndarray, attrs: dict, slot: int = 1) -> tuple[str, np.ndarray]:
    """The ``(K, N)`` matrix of a weight (in input ``slot`` of its node) and the name of the view.

    MatMul ``B`` is used as is; a constant *first* MatMul input ``A`` (``A·X``: each column of
    ``X`` is an input vector) is viewed as ``Aᵀ``, so that blocks again run along the summed
    axis; Gemm uses ``alpha·B`` (or ``alpha·Bᵀ`` when transB), so alpha
    is folded into the weight; Conv ``(O, I/g, *k)`` becomes ``reshape(O, -1)ᵀ`` so each output
    channel's flattened kernel is one column; a Gather table ``(V, D)`` becomes its transpose,
    so a row (an embedding) is one column and blocks run along D.
    """
    if op == "MatMul":
        return ("matmul-left", weight.T) if slot == 0 else ("matmul", weight)
    if op == "Gemm":
        w = weight.T if attrs.get("transB", 0) else weight
        return "gemm", (w * np.asarray(attrs.get("alpha", 1.0), dtype=w.dtype)).astype(w.dtype)
    if op == "Conv":
        view = "conv" if attrs.get("group", 1) == 1 else "conv-grouped"
        return view, weight.reshape(weight.shape[0], -1).T
    if op == "Gather":
        return "embedding", weight.T
    if op in RECURRENT_OPS:
        # (directions, gates·hidden, inputs): each gate row reads the input (or the hidden state).
        return "recurrent", weight.reshape(-1, weight.shape[-1]).T
    if op == "ConvTranspose":
        # (inputs, outputs/group, *k): each input channel feeds every output tap, so the blocks
        # run along the input channels (the summed axis) in each column.
        return "deconv", weight.reshape(weight.shape[0], -1)
    if op in SUBGRAPH_OPS:
        # A weight read only inside If/Loop/Scan bodies, through ops that are not rewritten
        # (slices of an LSTM's gates, say): the tensor is quantized as it is, in blocks along its
        # last axis (the input axis of the usual (outputs, inputs) layout).
        return "tensor", weight.reshape(-1, weight.shape[-1]).T
    raise ValueError(op)


def weight_from_matrix(op: str, matrix: np.ndarray, shape: tuple[int, ...], attrs: dict,
                       view: str = "") -> np.ndarray:
    """Inverse of :func:`matrix_view` (``view``: the name it gave): the tensor that ``matrix``
    stands for (a numpy array or a torch tensor, kept in its type)."""
    if view == "matmul-left":
        return matrix.T
    if view == "tensor":
        return matrix.T.reshape(shape)
    if op == "MatMul":
        return matrix
    if op == "Gemm":
        w = matrix / float(attrs.get("alpha", 1.0))
        return w.T if attrs.get("transB", 0) else w
    if op == "Conv":
        return matrix.T.reshape(shape)
    if op == "Gather":
        return matrix.T
    if op in RECURRENT_OPS:
        return matrix.T.reshape(shape)
    if op == "ConvTranspose":
        return matrix.reshape(shape)
    raise ValueError(op)


def read_matrix(source) -> np.ndarray:
    """The float32 ``(K, N)`` matrix of a :meth:`WeightMatrices.source`."""
    if isinstance(source, np.ndarray):
        return source
    from ..store import tensor_array

    data, base_dir, op, attrs, slot = source
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return _own_matrix(op, tensor, tensor_array(tensor, base_dir, writable=True), attrs, slot)


def _keeps_rows(op: str, slot: int, tensor: onnx.TensorProto) -> bool:
    """Whether the matrix view's rows are the stored tensor's rows (its first axis), so a few
    of them can be read from external data without the rest: MatMul ``B``, ConvTranspose."""
    return (op == "MatMul" and slot == 1 and len(tensor.dims) == 2) or (op == "ConvTranspose" and len(tensor.dims) >= 3)


def row_reader(source):
    """``(read, (K, N))`` of a :meth:`WeightMatrices.source`: ``read(a, b)`` gives rows ``a:b``
    of its float32 matrix; read straight from the data file when the weight is external and
    its view keeps the stored rows, else from the matrix read whole."""
    from ..store import reads_rows, tensor_rows

    if not isinstance(source, np.ndarray):
        data, base_dir, op, attrs, slot = source
        tensor = onnx.TensorProto()
        tensor.ParseFromString(data)
        if reads_rows(tensor) and _keeps_rows(op, slot, tensor):
            K, N = int(tensor.dims[0]), int(np.prod(tensor.dims[1:]))
            return (lambda a, b: tensor_rows(tensor, base_dir, a, b).reshape(-1, N)), (K, N)
        source = read_matrix(source)
    W = source
    return (lambda a, b: W[a:b]), W.shape


def _own_matrix(op: str, tensor: onnx.TensorProto, values: np.ndarray, attrs: dict, slot: int) -> np.ndarray:
    """The float32 C-ordered matrix view of a tensor's values, the caller's to change: a copy,
    except of a fresh writable float32 read from external data (a whole weight less at peak)."""
    from ..store import is_external

    _, matrix = matrix_view(op, values, attrs, slot)
    if is_external(tensor) and matrix.flags.writeable:
        return np.ascontiguousarray(matrix, dtype=np.float32)
    return np.array(matrix, dtype=np.float32, order="C")


class WeightMatrices(MutableMapping):
    """``name -> (K, N)`` float32 matrix of every candidate weight, read from the model's
    initializer (or its external data) each time it is asked for and not kept:
    only weights a pass replaced (``ctx.weights[name] = W``, e.g. rotated ones) are held."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.views: dict[str, tuple[str, dict, int]] = {}  # name -> (op, attrs, slot) of its matrix view
        self.held: dict[str, np.ndarray] = {}

    def register(self, name: str, op: str, attrs: dict, slot: int = 1) -> None:
        self.views[name] = (op, attrs, slot)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.held:
            return self.held[name]
        if name not in self.views:
            raise KeyError(name)
        tensor = next((t for t in self.ctx.model.graph.initializer if t.name == name), None)
        if tensor is None:
            raise KeyError(f"{name} (no longer in the model)")
        op, attrs, slot = self.views[name]
        from ..store import tensor_array

        return _own_matrix(op, tensor, tensor_array(tensor, self.ctx.base_dir, writable=True), attrs, slot)

    def source(self, name: str):
        """What a worker needs to read the matrix itself: the array when it is held or
        in the protobuf, else ``(serialized tensor reference, folder, op, attrs, slot)`` for
        :func:`read_matrix` and :func:`row_reader` (external data: the worker reads it from the
        file; a copy of the reference, as the lowering edits the graph's own meanwhile)."""
        from ..store import is_external

        if name in self.held:
            return self.held[name]
        tensor = next((t for t in self.ctx.model.graph.initializer if t.name == name), None)
        if tensor is None or not is_external(tensor):
            return self[name]
        op, attrs, slot = self.views[name]
        return (tensor.SerializeToString(), self.ctx.base_dir, op, attrs, slot)

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.held[name] = value
        self.views.setdefault(name, ("MatMul", {}, 1))

    def __delitem__(self, name: str) -> None:
        if name not in self.views:
            raise KeyError(name)
        self.views.pop(name)
        self.held.pop(name, None)

    def pop(self, name: str, default=None):
        """Forgets a weight without reading it."""
        if name not in self.views:
            return default
        self.views.pop(name)
        return self.held.pop(name, default)

    def __iter__(self):
        return iter(list(self.views))

    def __len__(self) -> int:
        return len(self.views)


class FindWeightsPass(Pass):
    """Creates one ``WeightRecord`` per constant weight of MatMul, Gemm, Conv, Gather and the
    recurrent ops (LSTM, GRU, RNN: their ``W`` and ``R``) and ConvTranspose.

    A weight shared by several nodes of the same kind is compressed once and reused; anything
    that cannot be compressed is recorded as skipped with the reason, and the model goes on.
    """

    name = "find-weights"

    def run(self, ctx: Context) -> str:
        cfg = ctx.config
        graph = ctx.model.graph
        inits = {t.name: t for t in graph.initializer}
        graph_inputs = {i.name for i in graph.input}
        graph_outputs = {o.name for o in graph.output}
        uses: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in graph.node:
            for idx, name in enumerate(node.input):
                if name:
                    uses[name].append((node, idx))
        subgraph_uses: dict[str, str] = {}
        subgraph_readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # main-graph nodes whose bodies read it
        sub_candidates: list[tuple[onnx.NodeProto, str]] = []
        sub_constants: set[str] = set()  # tensors that are constants inside a body
        for node in graph.node:
            if node.op_type in SUBGRAPH_OPS or any(True for _ in _subgraphs(node)):
                owner = f"{node.op_type} {node_key(node)}"
                for g in _subgraphs(node):
                    sub_constants.update(t.name for t in g.initializer)
                    for sub, _ in _walk_subgraph_nodes(g, owner):
                        for name in sub.input:
                            subgraph_uses.setdefault(name, owner)
                            if name in inits and node not in subgraph_readers[name]:
                                subgraph_readers[name].append(node)
                        if sub.op_type == "Constant":
                            sub_constants.update(sub.output)
                        if sub.op_type in WEIGHT_SLOTS:
                            sub_candidates.append((sub, owner))

        weights = ctx.weights if isinstance(ctx.weights, WeightMatrices) else WeightMatrices(ctx)
        ctx.weights = weights
        records: dict[str, WeightRecord] = {}
        slot_of: dict[str, int] = {}  # the input of its nodes that each weight is
        for node in graph.node:
            op = node.op_type
            if op not in WEIGHT_SLOTS or node.domain not in ("", "ai.onnx"):
                continue
            attrs = node_attrs(node)
            node_name = node_key(node)
            for widx in WEIGHT_SLOTS[op]:
                if len(node.input) <= widx or node.input[widx] not in inits:
                    continue
                wname = node.input[widx]
                tensor = inits[wname]
                rec = records.get(wname)
                if rec is not None:
                    if node_name not in rec.nodes:
                        rec.nodes.append(node_name)
                    if rec.op != op or rec.extra.get("attrs_key") != _attrs_key(op, attrs, widx):
                        rec.skip(f"shared by nodes that need different rewrites ({rec.op} and {op})")
                    continue
                location = "constant-node" if wname in ctx.lifted else (
                    "external-data" if wname in ctx.external else "initializer")
                if wname in ctx.folded:
                    location += f" (folded: {ctx.folded[wname]})"
                if wname in graph_inputs:
                    # Old exporters (IR < 4) list every initializer as an input too; the weight is
                    # treated as the constant it is, and the rewritten model no longer lists it.
                    location += " (also listed as a graph input)"
                dims = tuple(int(d) for d in tensor.dims)
                np_type = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                rec = WeightRecord(name=wname, op=op, nodes=[node_name], shape=dims,
                                   dtype=FLOAT_TYPES.get(tensor.data_type, np.dtype(np_type).name),
                                   location=location)
                rec.extra["attrs_key"] = _attrs_key(op, attrs, widx)
                slot_of[wname] = widx
                rec.bytes_before = int(np.prod(dims)) * np.dtype(np_type).itemsize if dims else 0
                records[wname] = rec
                reason = self._why_not(rec, tensor, node, attrs)
                if reason:
                    rec.skip(reason)

        for wname, rec in records.items():
            slots = WEIGHT_SLOTS[rec.op]
            other = [n.op_type for n, i in uses[wname] if n.op_type != rec.op or i not in slots]
            if rec.status == "candidate" and other:
                rec.skip(f"also used as input of {', '.join(sorted(set(other)))} (the original must stay)")
            elif rec.status == "candidate" and wname in subgraph_uses:
                rec.skip(f"also used inside {subgraph_uses[wname]} (the original must stay)")
            elif rec.status == "candidate" and wname in graph_outputs:
                rec.skip("is a graph output")
            if rec.status != "candidate":
                continue
            if reason := _asked_to_skip(rec, cfg):
                rec.skip(reason)
            elif rec.op == "Gather" and not cfg.compress_embeddings:
                rec.skip("embedding tables not compressed (--no-embeddings)")
            if rec.status != "candidate":
                continue
            node = next(n for n, i in uses[wname] if n.op_type == rec.op)
            weight = ctx.weight_array(inits[wname])
            finite = np.isfinite(weight)
            if not finite.all():
                rec.skip(f"holds {int(finite.size - np.count_nonzero(finite))} NaN/Inf values (kept as it is)")
                del weight, finite
                continue
            del finite
            slot = slot_of[wname]
            view, matrix = matrix_view(rec.op, weight, node_attrs(node), slot)
            rec.view = view
            rec.matrix_shape = tuple(int(s) for s in matrix.shape)
            del weight, matrix  # (read again when factorized: one weight at a time in memory)
            weights.register(wname, rec.op, node_attrs(node), slot)
            if view == "embedding" and not cfg.compress_embeddings:
                rec.skip("embedding tables not compressed (--no-embeddings)")
                weights.pop(wname, None)

        for wname, owners in subgraph_readers.items():
            if wname in records or wname in uses or wname in graph_outputs:
                continue  # read in the main graph too: handled (or skipped) above
            rec = self._body_weight(ctx, wname, inits[wname], owners, wname in graph_inputs)
            if rec is not None:
                records[wname] = rec

        for sub, owner in sub_candidates:
            for widx in WEIGHT_SLOTS[sub.op_type]:
                wname = sub.input[widx] if len(sub.input) > widx else ""
                # (A body's computed input, e.g. a slice of an outer weight, is no weight of its own.)
                if wname and wname not in records and (wname in inits or wname in sub_constants):
                    rec = WeightRecord(name=wname, op=sub.op_type, nodes=[sub.name or sub.output[0]], shape=(),
                                       dtype="", location="subgraph")
                    rec.skip(f"inside {owner} (subgraph bodies are not rewritten)")
                    records[wname] = rec

        ctx.records = list(records.values())
        n_c = len(ctx.candidates())
        return f"{len(ctx.records)} weights found, {n_c} to compress"

    def _body_weight(self, ctx: Context, wname: str, tensor: onnx.TensorProto, owners: list[onnx.NodeProto],
                     listed_as_input: bool) -> Optional[WeightRecord]:
        """The record of a main-graph weight read only inside If/Loop/Scan bodies (view
        ``tensor``), or None for what is not a weight (integers, vectors: shapes and indices)."""
        cfg = ctx.config
        dims = tuple(int(d) for d in tensor.dims)
        if tensor.data_type not in FLOAT_TYPES or len(dims) < 2:
            return None
        owner = owners[0]
        rec = WeightRecord(name=wname, op=owner.op_type, nodes=[node_key(n) for n in owners], shape=dims,
                           dtype=FLOAT_TYPES[tensor.data_type],
                           location=("external-data" if wname in ctx.external else "initializer")
                           + f" (read inside {owner.op_type} {node_key(owner)})")
        rec.bytes_before = int(np.prod(dims)) * np.dtype(FLOAT_TYPES[tensor.data_type]).itemsize
        if listed_as_input:
            rec.skip("also listed as a graph input (a caller may feed it)")
        elif reason := _asked_to_skip(rec, cfg):
            rec.skip(reason)
        elif not np.isfinite(weight := ctx.weight_array(tensor)).all():
            rec.skip("holds NaN/Inf values (kept as it is)")
        if rec.status != "candidate":
            return rec
        rec.view, matrix = matrix_view(owner.op_type, weight, {})
        rec.matrix_shape = tuple(int(s) for s in matrix.shape)
        ctx.weights.register(wname, owner.op_type, {})
        return rec

    def _why_not(self, rec: WeightRecord, tensor: onnx.TensorProto, node: onnx.NodeProto, attrs: dict) -> str:
        if tensor.data_type not in FLOAT_TYPES:
            return f"weight type {onnx.helper.tensor_dtype_to_string(tensor.data_type)} is not a float type"
        nd = len(rec.shape)
        if rec.op in ("MatMul", "Gemm", "Gather") and nd != 2:
            return f"{nd}-D weight (only 2-D is supported for {rec.op})"
        if rec.op == "Conv" and nd not in (3, 4, 5):
            return f"{nd}-D Conv weight"
        if rec.op in RECURRENT_OPS and nd != 3:
            return f"{nd}-D {rec.op} weight"
        if rec.op == "ConvTranspose" and nd not in (3, 4, 5):
            return f"{nd}-D ConvTranspose weight"
        if rec.op == "Gather" and attrs.get("axis", 0) != 0:
            return "Gather along an axis other than 0"
        return ""


def _asked_to_skip(rec: WeightRecord, cfg) -> str:
    """Why the options leave ``rec`` alone (--min-elements, --exclude, --override), or ''."""
    if rec.numel < cfg.min_elements:
        return f"too small ({rec.numel} elements < {cfg.min_elements})"
    if cfg.is_excluded(rec.name):
        return "excluded by --exclude"
    if (ov := cfg.override_for(rec.name)) is not None and ov.skip:
        return "skipped by --override"
    return ""


def _attrs_key(op: str, attrs: dict, slot: int = 1) -> tuple:
    if op == "Gemm":
        return (attrs.get("transB", 0), float(attrs.get("alpha", 1.0)))
    if op == "Conv":
        return (attrs.get("group", 1),)
    if op == "Gather":
        return (attrs.get("axis", 0),)
    if op in RECURRENT_OPS or op == "MatMul":
        return (slot,)
    return ()
