"""The torch evaluation of ONNX graphs (used by end-to-end tuning) agrees with ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qsdonnx.torch_graph import TorchGraph, unsupported_ops

from conftest import F32, MODEL_BUILDERS, feeds_for, make_model, randn, rel_l2, run_model


@pytest.mark.parametrize("kind", sorted(k for k in MODEL_BUILDERS if k != "if"))
def test_matches_onnxruntime_on_the_tiny_models(kind):
    model = MODEL_BUILDERS[kind]()
    feeds = feeds_for(model)
    ref = run_model(model, feeds)
    with torch.no_grad():
        got = TorchGraph(model)(feeds)
    for r, g in zip(ref, got):  # the float16 model: ONNX Runtime rounds to float16, torch runs float32
        assert rel_l2(r.astype(np.float32), g.numpy()) < (1e-3 if r.dtype == np.float16 else 1e-5)


def _attention_block(opset: int) -> tuple:
    """A transformer-style block: shape arithmetic, attention with a mask, LayerNorm, Erf-GELU."""
    S, D, heads = 6, 16, 2
    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array((g.standard_normal((D, D)) * 0.3).astype(np.float32), n)
             for n in ("Wq", "Wk", "Wv", "Wo")]
    inits += [numpy_helper.from_array(g.standard_normal(D).astype(np.float32), "bq"),
              numpy_helper.from_array((1 + 0.1 * g.standard_normal(D)).astype(np.float32), "ln_g"),
              numpy_helper.from_array((0.1 * g.standard_normal(D)).astype(np.float32), "ln_b"),
              numpy_helper.from_array(np.array([0, 0, heads, D // heads], np.int64), "split_shape"),
              numpy_helper.from_array(np.array([0], np.int64), "ax0"),
              numpy_helper.from_array(np.array([1], np.int64), "ax1"),
              numpy_helper.from_array(np.array([-1], np.int64), "axm1"),
              numpy_helper.from_array(np.array([1, 2], np.int64), "ax12"),
              numpy_helper.from_array(np.array([2], np.int64), "two"),
              numpy_helper.from_array(np.array(0, np.int64), "zero"),
              numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
              numpy_helper.from_array(np.array(np.sqrt(D // heads), np.float32), "sqrt_d"),
              numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
              numpy_helper.from_array(np.array(0.5, np.float32), "half"),
              numpy_helper.from_array(np.array(1.0, np.float32), "one"),
              numpy_helper.from_array(np.array([1], np.int64), "starts"),
              numpy_helper.from_array(np.array([S], np.int64), "ends")]
    n = helper.make_node
    nodes = [
        n("MatMul", ["X", "Wq"], ["q0"]), n("Add", ["q0", "bq"], ["q"]),
        n("MatMul", ["X", "Wk"], ["k"]), n("MatMul", ["X", "Wv"], ["v"]),
        n("Shape", ["X"], ["xs"]), n("Gather", ["xs", "zero"], ["b0"], axis=0),
        n("Reshape", ["q", "split_shape"], ["qh"]), n("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        n("Reshape", ["k", "split_shape"], ["kh"]), n("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
        n("Reshape", ["v", "split_shape"], ["vh"]), n("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qt", "kt"], ["s0"]), n("Div", ["s0", "sqrt_d"], ["s1"]),
        n("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT), n("Sub", ["one", "mf"], ["mi"]),
        n("Mul", ["mi", "neg"], ["madd"]), n("Unsqueeze", ["madd", "ax12"], ["m4"]),
        n("Add", ["s1", "m4"], ["s2"]), n("Softmax", ["s2"], ["p"], axis=-1),
        n("MatMul", ["p", "vt"], ["o0"]), n("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
        n("Unsqueeze", ["b0", "ax0"], ["b1"]), n("Slice", ["xs", "ax1", "two"], ["sdim"]),
        n("Concat", ["b1", "sdim", "axm1"], ["o_shape"], axis=0),
        n("Reshape", ["o1", "o_shape"], ["o2"]), n("MatMul", ["o2", "Wo"], ["o3"]),
        n("Add", ["o3", "X"], ["r"]),
        n("LayerNormalization", ["r", "ln_g", "ln_b"], ["ln"], axis=-1, epsilon=1e-5),
        n("Div", ["ln", "sqrt2"], ["e0"]), n("Erf", ["e0"], ["e1"]), n("Add", ["e1", "one"], ["e2"]),
        n("Mul", ["ln", "e2"], ["e3"]), n("Mul", ["e3", "half"], ["gelu"]),
        n("Slice", ["gelu", "starts", "ends", "ax1"], ["sl"]),
        n("ReduceMean", ["sl", "ax1"] if opset >= 18 else ["sl"], ["Y"],
          **({} if opset >= 18 else {"axes": [1]}), keepdims=0),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("X", F32, [2, S, D]),
                               helper.make_tensor_value_info("mask", TensorProto.INT64, [2, S])],
                       [helper.make_tensor_value_info("Y", F32, [2, D])], inits, opset=opset, ir_version=8)
    mask = np.ones((2, S), np.int64)
    mask[1, 4:] = 0
    return model, {"X": randn((2, S, D), 9), "mask": mask}


@pytest.mark.parametrize("opset", [17, 18])
def test_matches_onnxruntime_on_an_attention_block(opset):
    model, feeds = _attention_block(opset)
    ref = run_model(model, feeds)[0]
    with torch.no_grad():
        got = TorchGraph(model)(feeds)[0].numpy()
    assert got.shape == ref.shape
    assert rel_l2(ref, got) < 1e-5


def test_overrides_replace_constants_and_carry_gradients():
    model, feeds = _attention_block(17)
    graph = TorchGraph(model)
    wq = torch.from_numpy(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "Wq")).copy())
    wq.requires_grad_(True)
    y = graph(feeds, {"Wq": wq})[0]
    y.pow(2).sum().backward()
    assert wq.grad is not None and float(wq.grad.abs().sum()) > 0
    with torch.no_grad():
        moved = graph(feeds, {"Wq": wq * 2})[0]
        plain = graph(feeds)[0]
    assert float((moved - plain).abs().max()) > 1e-3


def test_unknown_operators_are_named():
    model = MODEL_BUILDERS["if"]()
    assert unsupported_ops(model) == ["If"]
    with pytest.raises(NotImplementedError, match="If"):
        TorchGraph(model)


def test_unsupported_settings_of_known_operators_are_named_before_any_run():
    pool = helper.make_node("AveragePool", ["X"], ["Y"], kernel_shape=[2, 2], pads=[0, 0, 1, 1])
    cast = helper.make_node("Cast", ["X"], ["Z"], to=TensorProto.STRING)
    model = make_model([pool, cast], [helper.make_tensor_value_info("X", F32, [1, 1, 4, 4])],
                       [helper.make_tensor_value_info("Y", F32, [1, 1, 4, 4]),
                        helper.make_tensor_value_info("Z", TensorProto.STRING, [1, 1, 4, 4])])
    assert unsupported_ops(model) == ["AveragePool with asymmetric or automatic pads", "Cast to type 8"]


@pytest.mark.real
def test_matches_onnxruntime_on_the_real_models():
    pytest.importorskip("models")
    from models import minilm, ppocr
    import onnx

    from qsdonnx.runtime import session

    m = onnx.load(str(minilm.build()))
    feeds = {k: v[:4] for k, v in minilm.calib_inputs().items()}
    ref = session(m).run(None, feeds)
    with torch.no_grad():
        got = TorchGraph(m)(feeds)
    for r, g in zip(ref, got):
        assert rel_l2(r, g.numpy()) < 1e-5
    rec = onnx.load(str(ppocr.rec_path()))
    x = {"x": ppocr.rec_calib_inputs()["x"][:2]}
    ref = session(rec).run(None, x)[0]
    with torch.no_grad():
        got = TorchGraph(rec)(x)[0].numpy()
    assert rel_l2(ref, got) < 1e-5
