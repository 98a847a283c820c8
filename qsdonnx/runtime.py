"""ONNX Runtime sessions for qsdonnx models.

``session()`` builds an ``onnxruntime.InferenceSession`` with the options the
project relies on:

* models containing ``qsdonnx::QsdMatMul`` nodes (the ``fused`` format) get
  the custom-op library registered (see ``qsdonnx.buildops``);
* ``session.qdq_matmulnbits_accuracy_level`` is set to ``"0"`` by default, so
  that ORT's ``DequantizeLinear -> MatMul`` to ``MatMulNBits`` fusion keeps the
  activations in float instead of quantizing them to int8 (ORT's default
  accuracy level 4 on CPU).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from .buildops import LIBRARY_NAME, find_ops_library

__all__ = [
    "DOMAIN",
    "OP_NAME",
    "OP_VERSION",
    "INPUT_NAMES",
    "ATTRIBUTE_NAMES",
    "ACCURACY_LEVEL_KEY",
    "model_uses_custom_ops",
    "register_onnx_schema",
    "session",
    "session_options",
]

DOMAIN = "qsdonnx"
OP_NAME = "QsdMatMul"
OP_VERSION = 1
ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"

# Inputs of QsdMatMul by position; absent ones are given as "".
INPUT_NAMES = (
    "X",
    "Q_B", "Q_scales", "Q_zp",
    "L_B", "L_scales", "L_zp",
    "R_B", "R_scales", "R_zp",
    "S_rowptr", "S_cols", "S_vals",
    "bias",
)
ATTRIBUTE_NAMES = (
    "K", "N", "q_bits", "q_block", "rank", "l_bits", "l_block", "r_bits", "r_block",
    "has_sparse", "has_bias", "act_int8",
)

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "disable_all": "ORT_DISABLE_ALL",
    "none": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}


def _graph_uses_domain(graph: onnx.GraphProto, domain: str) -> bool:
    for node in graph.node:
        if node.domain == domain:
            return True
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and _graph_uses_domain(attr.g, domain):
                return True
            if attr.type == onnx.AttributeProto.GRAPHS and any(
                _graph_uses_domain(g, domain) for g in attr.graphs
            ):
                return True
    return False


def model_uses_custom_ops(model: onnx.ModelProto) -> bool:
    """Whether the model imports or uses the ``qsdonnx`` operator domain."""
    if any(op.domain == DOMAIN for op in model.opset_import):
        return True
    if any(n.domain == DOMAIN for f in model.functions for n in f.node):
        return True
    return _graph_uses_domain(model.graph, DOMAIN)


def _load_header(path_or_bytes: Any) -> onnx.ModelProto:
    if isinstance(path_or_bytes, onnx.ModelProto):
        return path_or_bytes
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return onnx.load_from_string(bytes(path_or_bytes))
    return onnx.load(os.fspath(path_or_bytes), load_external_data=False)


def _resolve_opt_level(level: Any):
    import onnxruntime as ort

    if level is None:
        return None
    if isinstance(level, ort.GraphOptimizationLevel):
        return level
    if isinstance(level, str):
        key = level.strip().lower()
        name = _OPT_LEVELS.get(key, level.strip().upper())
        if not hasattr(ort.GraphOptimizationLevel, name):
            raise ValueError(f"unknown graph optimization level {level!r}")
        return getattr(ort.GraphOptimizationLevel, name)
    if isinstance(level, int):
        by_value = {int(v): v for v in ort.GraphOptimizationLevel.__members__.values()}
        if level not in by_value:
            raise ValueError(f"unknown graph optimization level {level!r}")
        return by_value[level]
    raise TypeError(f"graph_optimization_level must be a string, an int or "
                    f"onnxruntime.GraphOptimizationLevel, not {type(level).__name__}")


def _ops_library_or_raise() -> Path:
    lib = find_ops_library()
    if lib is None:
        env = os.environ.get("QSDONNX_OPS_LIB")
        where = f" (QSDONNX_OPS_LIB={env} does not exist)" if env else ""
        raise RuntimeError(
            f"this model uses the qsdonnx custom ops but {LIBRARY_NAME} is not built{where}; "
            "run `qsdonnx build-ops` first"
        )
    return lib


def ort_log_severity() -> int:
    """ONNX Runtime's log severity for qsdonnx's sessions: errors only (3) unless the
    ``qsdonnx`` logger shows info (-v: warnings, 2) or debug (-vv: everything, 0)."""
    level = logging.getLogger("qsdonnx").getEffectiveLevel()
    return 0 if level <= logging.DEBUG else 2 if level <= logging.INFO else 3


def session_options(
    *,
    graph_optimization_level: Any = None,
    intra_op_num_threads: int | None = None,
    accuracy_level_float: bool = True,
    custom_ops: bool = False,
):
    """``onnxruntime.SessionOptions`` as used by :func:`session`.

    ``custom_ops=True`` registers the qsdonnx custom-op library (RuntimeError if
    it is not built).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = ort_log_severity()
    ort.set_default_logger_severity(so.log_severity_level)
    level = _resolve_opt_level(graph_optimization_level)
    if level is not None:
        so.graph_optimization_level = level
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    if accuracy_level_float:
        so.add_session_config_entry(ACCURACY_LEVEL_KEY, "0")
    if custom_ops:
        so.register_custom_ops_library(str(_ops_library_or_raise()))
    return so


def session(
    path_or_bytes: Any,
    providers: Sequence[Any] | None = None,
    graph_optimization_level: Any = None,
    intra_op_num_threads: int | None = None,
    accuracy_level_float: bool = True,
    base_dir: Any = None,
    initializers: Sequence[onnx.TensorProto] = (),
):
    """Create an ``onnxruntime.InferenceSession`` for a model file, bytes or ModelProto.

    A ModelProto whose initializers are in external data (loaded without it) gets those
    tensors from ``base_dir`` (the folder of the file they came from) as memory-mapped buffers,
    so the weights are neither copied into the protobuf nor serialized.  ``initializers`` are
    more tensors of the graph given apart from ``path_or_bytes`` (a ModelProto), handed to ONNX
    Runtime the same way (e.g. those :func:`qsdonnx.store.structure_copy` left out).

    ``providers`` defaults to ``["CPUExecutionProvider"]``. The qsdonnx custom-op
    library is registered when the model uses the ``qsdonnx`` domain.
    ``accuracy_level_float`` keeps float activations in ORT's MatMulNBits fusion
    (``session.qdq_matmulnbits_accuracy_level = 0``); False leaves ORT's default.
    """
    import onnxruntime as ort

    model = _load_header(path_or_bytes)
    uses_ops = model_uses_custom_ops(model)
    so = session_options(
        graph_optimization_level=graph_optimization_level,
        intra_op_num_threads=intra_op_num_threads,
        accuracy_level_float=accuracy_level_float,
        custom_ops=uses_ops,
    )
    if providers is None:
        providers = ["CPUExecutionProvider"]
    keep: list = []
    if isinstance(path_or_bytes, onnx.ModelProto):
        source, keep = _weights_apart(path_or_bytes, base_dir, so, list(initializers))
    elif isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        source = bytes(path_or_bytes)
    else:
        source = os.fspath(path_or_bytes)
    sess = ort.InferenceSession(source, sess_options=so, providers=list(providers))
    sess._qsdonnx_weights = keep  # ONNX Runtime reads these buffers for the session's life
    return sess


def _weights_apart(model: onnx.ModelProto, base_dir: Any, so, extra: list) -> tuple[bytes, list]:
    """The model's graph serialized without its large initializers, which are handed to ONNX
    Runtime as buffers instead (memory-mapped external data, or views of the protobuf's bytes):
    a session costs no second copy of the weights."""
    import onnxruntime as ort

    from .store import SUB_BYTE_TYPES, external_stub, inline_copy, is_external, structure_copy, tensor_array

    inputs = {i.name for i in model.graph.input}
    light, big = structure_copy(model, whole_bytes_only=True)
    if any(t.name in inputs for t in big):
        # Initializers listed as graph inputs (older IRs) are overridable inputs; keep them in.
        light, big = structure_copy(model, min_bytes=1 << 62)
    # Packed sub-byte tensors cannot be handed over as numpy buffers: those in external data
    # join the graph as copies of their stored bytes.
    packed = [t for t in big if t.data_type in SUB_BYTE_TYPES]
    if packed:
        light.graph.initializer.extend(inline_copy(t, base_dir) for t in packed)
        big = [t for t in big if t.data_type not in SUB_BYTE_TYPES]
    big = big + extra
    values = []
    for t in big:
        if is_external(t):
            values.append(np.ascontiguousarray(tensor_array(t, base_dir, mapped=True)))
        elif t.raw_data:
            from .store import np_dtype

            values.append(np.frombuffer(t.raw_data, dtype=np_dtype(t.data_type)).reshape(tuple(t.dims)))
        else:
            values.append(onnx.numpy_helper.to_array(t))
    ort_values = [ort.OrtValue.ortvalue_from_numpy(v) for v in values]
    for t, v in zip(big, values):
        # ONNX Runtime wants each initializer declared in the graph; the stub's data is never read.
        light.graph.initializer.append(external_stub(t, "qsdonnx-weights-in-memory", v.nbytes))
    if big:
        so.add_external_initializers([t.name for t in big], ort_values)
    return light.SerializeToString(), [values, ort_values, so]


_schema_lock = threading.Lock()


def _infer_qsd_matmul(ctx) -> None:
    x_type = ctx.get_input_type(0)
    if x_type is None or not x_type.HasField("tensor_type"):
        return
    out = onnx.TypeProto()
    out.tensor_type.elem_type = onnx.TensorProto.FLOAT
    tt = x_type.tensor_type
    n_attr = ctx.get_attribute("N")
    if tt.HasField("shape") and n_attr is not None and len(tt.shape.dim) >= 1:
        dims = list(tt.shape.dim)
        for d in dims[:-1]:
            out.tensor_type.shape.dim.add().CopyFrom(d)
        out.tensor_type.shape.dim.add().dim_value = int(n_attr.i)
    ctx.set_output_type(0, out)


def register_onnx_schema() -> bool:
    """Register an ONNX schema for ``qsdonnx::QsdMatMul`` v1 (idempotent).

    ``onnx.checker.check_model`` accepts nodes of unregistered domains without
    it; registering makes the checker validate the node's inputs, types and
    attributes and lets ``onnx.shape_inference`` infer the output shape.
    Returns True if the schema was registered by this call.
    """
    from onnx import defs

    with _schema_lock:
        if defs.has(OP_NAME, DOMAIN):
            return False
        P = defs.OpSchema.FormalParameter
        opt = defs.OpSchema.FormalParameterOption.Optional
        types = {
            "X": "float", "bias": "float",
            "Q_B": "uint8", "Q_zp": "uint8", "L_B": "uint8", "L_zp": "uint8",
            "R_B": "uint8", "R_zp": "uint8",
            "Q_scales": "float16", "L_scales": "float16", "R_scales": "float16",
            "S_vals": "float16",
            "S_rowptr": "int32", "S_cols": "int32",
        }
        inputs = [
            P(name, f"tensor({types[name]})", "", param_option=(
                defs.OpSchema.FormalParameterOption.Single if name == "X" else opt))
            for name in INPUT_NAMES
        ]
        outputs = [P("Y", "tensor(float)", "X . W_hat (+ bias)")]
        attrs = [
            defs.OpSchema.Attribute(name, defs.OpSchema.AttrType.INT, "",
                                    required=name in ("K", "N"))
            for name in ATTRIBUTE_NAMES
        ]
        schema = defs.OpSchema(
            OP_NAME, DOMAIN, OP_VERSION,
            "Y = X . (deq(Q) + deq(L) . deq(R) + S) (+ bias) with MatMulNBits-packed factors",
            inputs=inputs, outputs=outputs, attributes=attrs,
        )
        schema.set_type_and_shape_inference_function(_infer_qsd_matmul)
        defs.register_schema(schema)
        return True
