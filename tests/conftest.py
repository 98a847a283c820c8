"""Shared builders for tiny ONNX models and helpers to run them in ONNX Runtime.

Every model is built with ``onnx.helper`` at an old opset (13-17) and IR version 8-10, so the
opset upgrade to 21/25 that block-wise DequantizeLinear needs is exercised on each of them.
Weights are drawn from a fixed seed; the low-rank variants are exact products ``A @ B`` so a
truncated SVD at that rank reproduces them to float32 round-off.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qsdonnx.runtime import session

F32 = TensorProto.FLOAT
F16 = TensorProto.FLOAT16


# --------------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------------
def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(shape, seed: int = 0, dtype=np.float32) -> np.ndarray:
    return rng(seed).standard_normal(shape).astype(dtype)


def low_rank(rows: int, cols: int, rank: int, seed: int = 0) -> np.ndarray:
    """A ``(rows, cols)`` float32 matrix of exact rank ``rank``."""
    g = rng(seed)
    a = g.standard_normal((rows, rank)).astype(np.float32)
    b = g.standard_normal((rank, cols)).astype(np.float32)
    return (a @ b / np.sqrt(rank)).astype(np.float32)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 13, ir_version: int = 8,
               name: str = "tiny") -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="qsdonnx-tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def conv3x3_model(O: int = 32, C: int = 32) -> onnx.ModelProto:
    """One bias-free 3×3 Conv (pads 1) on a ``(1, C, 12, 12)`` input, weight ``W``.  No bias: a
    bias would also absorb the mean output error (passes.bias), which the tests comparing
    against a rebuilt weight do not model."""
    W = np.random.default_rng(1).standard_normal((O, C, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])], "conv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 12, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, O, 12, 12])],
                          [numpy_helper.from_array(W, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def run_model(model, feeds: dict, optimization: str | None = "disable_all") -> list[np.ndarray]:
    """Runs a model file, bytes or ModelProto in ONNX Runtime (CPU) and returns all outputs."""
    sess = session(model if not isinstance(model, Path) else str(model),
                   graph_optimization_level=optimization)
    return sess.run(None, feeds)


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(got, np.float64).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def worst_rel_l2(ref_model, new_model, feeds: dict) -> float:
    """Largest relative L2 error over all outputs of ``new_model`` against ``ref_model``."""
    ref = run_model(ref_model, feeds)
    got = run_model(new_model, feeds)
    assert len(ref) == len(got)
    for r, g in zip(ref, got):
        assert r.shape == g.shape and r.dtype == g.dtype
    return max(rel_l2(r, g) for r, g in zip(ref, got))


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_state(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return sha256(path), st.st_size, st.st_mtime_ns


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# --------------------------------------------------------------------------------------------
# model builders (functions, so tests can build variants) and fixtures
# --------------------------------------------------------------------------------------------
def matmul_model(K: int = 128, N: int = 64, M: int = 4, seed: int = 0, weight: np.ndarray | None = None,
                 opset: int = 13, ir_version: int = 8, wname: str = "W") -> onnx.ModelProto:
    W = randn((K, N), seed) if weight is None else weight
    return make_model(
        [helper.make_node("MatMul", ["X", wname], ["Y"], name="mm")],
        [helper.make_tensor_value_info("X", F32, [M, K])],
        [helper.make_tensor_value_info("Y", F32, [M, N])],
        [numpy_helper.from_array(W, wname)], opset=opset, ir_version=ir_version)


def two_layer_model(seed: int = 0) -> onnx.ModelProto:
    """X(4,128) @ W1(128,64) -> Relu -> @ W2(64,96): two compressible MatMul weights."""
    W1, W2 = randn((128, 64), seed), randn((64, 96), seed + 1)
    return make_model(
        [helper.make_node("MatMul", ["X", "fc1.weight"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["hr"], name="relu"),
         helper.make_node("MatMul", ["hr", "fc2.weight"], ["Y"], name="mm2")],
        [helper.make_tensor_value_info("X", F32, [4, 128])],
        [helper.make_tensor_value_info("Y", F32, [4, 96])],
        [numpy_helper.from_array(W1, "fc1.weight"), numpy_helper.from_array(W2, "fc2.weight")],
        opset=14, ir_version=8)


def gemm_model(K: int = 128, N: int = 64, M: int = 4, alpha: float = 0.5, beta: float = 2.0,
               trans_a: bool = False, rank: int | None = None, seed: int = 1) -> onnx.ModelProto:
    """Gemm ``alpha * A' * B' + beta * C`` with transB=1 (B stored (N, K)) and a bias C (N,);
    with ``trans_a`` the input is (K, M) and transA=1."""
    Wkn = randn((K, N), seed) if rank is None else low_rank(K, N, rank, seed)
    B = np.ascontiguousarray(Wkn.T)  # (N, K) because transB=1
    C = randn((N,), seed + 7)
    x_shape = [K, M] if trans_a else [M, K]
    node = helper.make_node("Gemm", ["X", "B", "C"], ["Y"], name="gemm", alpha=alpha, beta=beta,
                            transB=1, transA=1 if trans_a else 0)
    return make_model(
        [node], [helper.make_tensor_value_info("X", F32, x_shape)],
        [helper.make_tensor_value_info("Y", F32, [M, N])],
        [numpy_helper.from_array(B, "B"), numpy_helper.from_array(C, "C")], opset=13, ir_version=8)


def conv_model(O: int = 32, I: int = 16, k: int = 3, H: int = 15, rank: int | None = None,
               seed: int = 2) -> onnx.ModelProto:
    """Conv group 1, k×k kernel, pads 1, stride 2, with bias; weight (O, I, k, k)."""
    if rank is None:
        W = randn((O, I, k, k), seed) * 0.2
    else:
        W = low_rank(I * k * k, O, rank, seed).T.reshape(O, I, k, k) * 0.2
    b = randn((O,), seed + 3)
    node = helper.make_node("Conv", ["X", "Wc", "bc"], ["Y"], name="conv", kernel_shape=[k, k],
                            pads=[1, 1, 1, 1], strides=[2, 2])
    out = (H + 2 - k) // 2 + 1
    return make_model(
        [node], [helper.make_tensor_value_info("X", F32, [1, I, H, H])],
        [helper.make_tensor_value_info("Y", F32, [1, O, out, out])],
        [numpy_helper.from_array(W.astype(np.float32), "Wc"), numpy_helper.from_array(b, "bc")],
        opset=15, ir_version=8)


def depthwise_conv_model(C: int = 64, k: int = 3, H: int = 12, seed: int = 3) -> onnx.ModelProto:
    """Depthwise Conv (group = C), weight (C, 1, k, k), pads 1, stride 1."""
    W = randn((C, 1, k, k), seed) * 0.3
    node = helper.make_node("Conv", ["X", "Wd"], ["Y"], name="dwconv", kernel_shape=[k, k],
                            pads=[1, 1, 1, 1], group=C)
    return make_model(
        [node], [helper.make_tensor_value_info("X", F32, [1, C, H, H])],
        [helper.make_tensor_value_info("Y", F32, [1, C, H, H])],
        [numpy_helper.from_array(W.astype(np.float32), "Wd")], opset=15, ir_version=8)


def constant_node_model(K: int = 128, N: int = 64, seed: int = 4) -> onnx.ModelProto:
    """MatMul whose weight is the output of a Constant node (as Paddle exports do)."""
    W = randn((K, N), seed)
    nodes = [helper.make_node("Constant", [], ["Wconst"], name="wconst",
                              value=numpy_helper.from_array(W, "Wconst_value")),
             helper.make_node("MatMul", ["X", "Wconst"], ["Y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("X", F32, [4, K])],
                      [helper.make_tensor_value_info("Y", F32, [4, N])], opset=13, ir_version=8)


def shared_weight_model(K: int = 128, N: int = 64, seed: int = 5, distinct: bool = False) -> onnx.ModelProto:
    """Two MatMuls on two inputs; both use ``W`` (or, with ``distinct``, two equal copies)."""
    W = randn((K, N), seed)
    w2 = "W_copy" if distinct else "W"
    inits = [numpy_helper.from_array(W, "W")]
    if distinct:
        inits.append(numpy_helper.from_array(W.copy(), "W_copy"))
    nodes = [helper.make_node("MatMul", ["X1", "W"], ["Y1"], name="mm1"),
             helper.make_node("MatMul", ["X2", w2], ["Y2"], name="mm2")]
    return make_model(nodes,
                      [helper.make_tensor_value_info("X1", F32, [4, K]),
                       helper.make_tensor_value_info("X2", F32, [3, K])],
                      [helper.make_tensor_value_info("Y1", F32, [4, N]),
                       helper.make_tensor_value_info("Y2", F32, [3, N])], inits, opset=13, ir_version=8)


def if_model(K: int = 128, N: int = 64, seed: int = 6) -> onnx.ModelProto:
    """Top-level MatMul (compressible) then an If whose branches each hold a MatMul with a
    Constant-node weight (not rewritten: subgraph bodies are left alone)."""
    W_top = randn((K, K), seed)
    W_then, W_else = randn((K, N), seed + 1), randn((K, N), seed + 2)

    def branch(name, W):
        nodes = [helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(W, f"{name}_wv")),
                 helper.make_node("MatMul", ["h", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", F32, [4, N])])

    nodes = [helper.make_node("MatMul", ["X", "W_top"], ["h"], name="mm_top"),
             helper.make_node("If", ["cond"], ["Y"], name="if_node",
                              then_branch=branch("then", W_then), else_branch=branch("else", W_else))]
    return make_model(nodes,
                      [helper.make_tensor_value_info("X", F32, [4, K]),
                       helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                      [helper.make_tensor_value_info("Y", F32, [4, N])],
                      [numpy_helper.from_array(W_top, "W_top")], opset=13, ir_version=8)


def fp16_matmul_model(K: int = 128, N: int = 64, seed: int = 7) -> onnx.ModelProto:
    W = (randn((K, N), seed) * 0.1).astype(np.float16)
    return make_model(
        [helper.make_node("MatMul", ["X", "W16"], ["Y"], name="mm16")],
        [helper.make_tensor_value_info("X", F16, [4, K])],
        [helper.make_tensor_value_info("Y", F16, [4, N])],
        [numpy_helper.from_array(W, "W16")], opset=13, ir_version=8)


def save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    assert (path.parent / location).is_file()
    return path


def feeds_for(model: onnx.ModelProto, seed: int = 123) -> dict:
    """Random inputs from the graph's (static) input types; bool inputs are True."""
    g = rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type == TensorProto.BOOL:
            feeds[vi.name] = np.ones(shape, np.bool_)
        else:
            feeds[vi.name] = g.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


MODEL_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "matmul": matmul_model,
    "two_layer": two_layer_model,
    "gemm": gemm_model,
    "gemm_transA": lambda: gemm_model(trans_a=True, alpha=1.5, beta=0.25),
    "conv": conv_model,
    "depthwise": depthwise_conv_model,
    "constant_node": constant_node_model,
    "shared": shared_weight_model,
    "if": if_model,
    "fp16": fp16_matmul_model,
}

# Weights below 4096 elements (the conv and depthwise kernels) need a lower threshold.
MIN_ELEMENTS = 256


@pytest.fixture
def external_model(tmp_path) -> Path:
    d = tmp_path / "ext"
    d.mkdir()
    return save_external(two_layer_model(), d / "model.onnx", "model.weights")
