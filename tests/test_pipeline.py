"""End-to-end tests of ``qsdonnx.optimize`` on tiny hand-built ONNX models.

Each compressed model is run in ONNX Runtime next to the original on the same random inputs.
Floors used below (relative L2 error of the outputs, ``||y - y_hat|| / ||y||``):

* rtn 8-bit, block 32: < 1e-2 (measured ~5e-3 on these Gaussian weights);
* rtn 4-bit, block 32: < 0.15 (measured 0.08-0.14, the two-layer model compounding two layers);
* svd at the exact rank of a rank-r weight: < 1e-4 (float32 round-off, measured ~1e-6).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qsdonnx
import qsdonnx.errors
from qsdonnx.factorize.packing import unpack_stream
from conftest import (
    MIN_ELEMENTS, MODEL_BUILDERS, conv_model, default_opset, feeds_for, file_state, gemm_model, low_rank,
    make_model, matmul_model, ops, randn, rel_l2, run_model, save, shared_weight_model, two_layer_model,
    worst_rel_l2,
)

RTN8_FLOOR = 1e-2
RTN4_FLOOR = 0.15
EXACT_FLOOR = 1e-4


def optimize_file(tmp_path, kind_or_model, out_name="out.onnx", **options):
    """Saves the model (a MODEL_BUILDERS key or a ModelProto), optimizes it, returns
    (input path, output path, result)."""
    model = MODEL_BUILDERS[kind_or_model]() if isinstance(kind_or_model, str) else kind_or_model
    src = save(model, tmp_path / ("in_" + out_name))
    dst = tmp_path / out_name
    options.setdefault("progress", False)
    options.setdefault("min_elements", MIN_ELEMENTS)
    # Numbers below (bpw, code ranges) are for the symmetric grid unless a test says otherwise.
    options.setdefault("symmetric", True)
    result = qsdonnx.optimize(src, dst, **options)
    return src, dst, result


def compressed(result):
    return [l for l in result.report.layers if l["status"] == "compressed"]


def initializer_bytes(model: onnx.ModelProto, prefix: str) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith(prefix):
            total += len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
    return total


# ---------------------------------------------------------------------------------------------
# (a) round-to-nearest accuracy on every model kind, (c) checker / ORT / IR version
# ---------------------------------------------------------------------------------------------
ALL_KINDS = ["matmul", "two_layer", "gemm", "gemm_transA", "conv", "depthwise", "constant_node", "shared",
             "if", "fp16"]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("bits,floor", [(8, RTN8_FLOOR), (4, RTN4_FLOOR)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_rtn_output_error_and_valid_model(tmp_path, kind, bits, floor, symmetric):
    src, dst, res = optimize_file(tmp_path, kind, method="rtn", bits=bits, symmetric=symmetric)
    model = MODEL_BUILDERS[kind]()
    layers = compressed(res)
    assert layers, f"nothing compressed in {kind}: {res.report.layers}"
    assert all(l["bits"] == bits and l["method"] == "rtn" for l in layers)

    err = worst_rel_l2(src, dst, feeds_for(model))
    assert err < floor, f"{kind} rtn {bits}-bit: relative L2 {err:.3e} >= {floor}"
    # A lossy rewrite that changes nothing would be suspicious: the weights really were replaced.
    assert err > 0
    # The validator's own figure is measured the same way and must agree in size.
    assert res.report.validation["max_rel_l2"] < floor

    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version <= 13
    assert default_opset(out) >= 21
    assert "DequantizeLinear" in ops(out)
    # The original weight tensors are gone from the file.
    names = {t.name for t in out.graph.initializer}
    for l in layers:
        assert l["name"] not in names
    # Same outputs (names, dtypes, shapes) as the original, at both ORT optimization levels.
    feeds = feeds_for(model)
    ref = run_model(src, feeds)
    for level in ("disable_all", "all"):
        got = run_model(dst, feeds, optimization=level)
        assert [g.shape for g in got] == [r.shape for r in ref]
        assert max(rel_l2(r, g) for r, g in zip(ref, got)) < floor


def test_error_shrinks_with_more_bits(tmp_path):
    errs = {}
    for bits in (2, 3, 4, 8):
        src, dst, res = optimize_file(tmp_path, "matmul", out_name=f"b{bits}.onnx", method="rtn", bits=bits)
        errs[bits] = worst_rel_l2(src, dst, feeds_for(matmul_model()))
        assert res.report.layers[0]["rel_error"] == pytest.approx(errs[bits], rel=0.25)
    assert errs[8] < errs[4] < errs[3] < errs[2]


# ---------------------------------------------------------------------------------------------
# exactness of the 4-bit lowering against an independent numpy re-implementation
# ---------------------------------------------------------------------------------------------
def reference_rtn(W: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Documented symmetric RTN without the clipping search (``clip_search=False``): per block of ``block`` rows of the (K, N) matrix,
    ``s = max(-min(lo,0)/2^(b-1), max(hi,0)/(2^(b-1)-1))`` rounded *up* to float16,
    codes ``clip(round(W/s), -2^(b-1), 2^(b-1)-1)``, ``W_hat = codes * s``."""
    K, N = W.shape
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    out = np.empty_like(W)
    for b0 in range(0, K, block):
        blk = W[b0:b0 + block]
        lo = np.minimum(blk.min(axis=0), 0)
        hi = np.maximum(blk.max(axis=0), 0)
        need = np.maximum(-lo / -qmin, hi / qmax).astype(np.float32)
        s = need.astype(np.float16)
        s = np.where(s.astype(np.float32) < need, np.nextafter(s, np.float16(np.inf)), s).astype(np.float32)
        s = np.where(need > 0, s, 1.0).astype(np.float32)
        out[b0:b0 + block] = np.clip(np.round(blk / s), qmin, qmax) * s
    return out


def test_matmul_4bit_matches_reference_quantizer(tmp_path):
    W = randn((128, 64), 11)
    src, dst, res = optimize_file(tmp_path, matmul_model(weight=W), method="rtn", bits=4, block_size=32, clip_search=False)
    X = randn((4, 128), 12)
    got = run_model(dst, {"X": X})[0]
    want = X.astype(np.float64) @ reference_rtn(W, 4, 32).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # and the reported weight error is that of the same reconstruction
    Wq = reference_rtn(W, 4, 32)
    assert res.report.layers[0]["rel_error"] == pytest.approx(
        np.linalg.norm(W - Wq) / np.linalg.norm(W), rel=1e-4)


def test_gemm_4bit_folds_alpha_and_keeps_beta_bias(tmp_path):
    model = gemm_model(alpha=0.5, beta=2.0)
    B = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "B"))
    C = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "C"))
    src, dst, _ = optimize_file(tmp_path, model, method="rtn", bits=4, block_size=32, clip_search=False)
    X = randn((4, 128), 13)
    got = run_model(dst, {"X": X})[0]
    # the (K, N) matrix is alpha * B^T; quantization happens on that matrix
    want = X @ reference_rtn((0.5 * B.T).astype(np.float32), 4, 32) + 2.0 * C
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_4bit_matches_reference_quantizer(tmp_path):
    import torch

    model = conv_model()
    W = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "Wc"))
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "bc"))
    src, dst, _ = optimize_file(tmp_path, model, method="rtn", bits=4, block_size=32, clip_search=False)
    X = randn((1, 16, 15, 15), 14)
    got = run_model(dst, {"X": X})[0]
    # Conv (O, I, k, k) is the (I*k*k, O) matrix reshape(O, -1)^T; blocks run along I*k*k.
    Wq = reference_rtn(W.reshape(32, -1).T.copy(), 4, 32).T.reshape(W.shape)
    want = torch.nn.functional.conv2d(torch.from_numpy(X), torch.from_numpy(Wq), torch.from_numpy(b),
                                      stride=2, padding=1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# (b) full-rank SVD rewrites are exact
# ---------------------------------------------------------------------------------------------
SVD_CASES = {
    "matmul": (lambda: matmul_model(weight=low_rank(128, 64, 8, seed=20)), 8, ["MatMul", "MatMul"]),
    "gemm_transB_alpha_beta_bias": (lambda: gemm_model(rank=8, alpha=0.5, beta=2.0), 8, ["MatMul", "MatMul", "Add"]),
    "gemm_transA": (lambda: gemm_model(rank=8, trans_a=True, alpha=1.5, beta=0.25), 8,
                    ["Transpose", "MatMul", "MatMul", "Add"]),
    "conv_stride2_pads": (lambda: conv_model(rank=4), 4, ["Conv", "Conv"]),
}


@pytest.mark.parametrize("case", list(SVD_CASES))
def test_svd_at_exact_rank_is_exact(tmp_path, case):
    build, rank, expected_ops = SVD_CASES[case]
    model = build()
    src, dst, res = optimize_file(tmp_path, model, method="svd", rank=rank)
    [layer] = res.report.layers
    assert layer["status"] == "compressed", layer["reason"]
    assert layer["method"] == "svd" and layer["rank"] == rank
    assert layer["rel_error"] < EXACT_FLOOR
    err = worst_rel_l2(src, dst, feeds_for(model))
    assert err < EXACT_FLOOR, f"{case}: relative L2 {err:.3e}"
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    compute = [o for o in ops(out) if o in ("MatMul", "Conv", "Add", "Transpose", "Gemm")]
    for op in expected_ops:
        assert compute.count(op) >= expected_ops.count(op), compute
    assert "Gemm" not in compute


def test_svd_conv_split_is_kxk_then_1x1(tmp_path):
    src, dst, _ = optimize_file(tmp_path, conv_model(rank=4), method="svd", rank=4)
    out = onnx.load(str(dst))
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    first, second = convs
    a1 = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    a2 = {a.name: helper.get_attribute_value(a) for a in second.attribute}
    assert list(a1["strides"]) == [2, 2] and list(a1["pads"]) == [1, 1, 1, 1]
    assert list(a2.get("kernel_shape", [1, 1])) == [1, 1]
    assert list(a2.get("strides", [1, 1])) == [1, 1]
    assert list(a2.get("pads", [0, 0, 0, 0])) == [0, 0, 0, 0]
    assert second.input[0] == first.output[0]
    # the bias rides on the 1x1 Conv
    assert len(second.input) == 3 and second.input[2] == "bc"
    # shapes of the two kernels: (r, I, 3, 3) then (O, r, 1, 1)
    inferred = onnx.shape_inference.infer_shapes(out, data_prop=True)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    assert shapes[first.input[1]] == [4, 16, 3, 3]
    assert shapes[second.input[1]] == [32, 4, 1, 1]


def test_svd_full_rank_not_smaller_is_skipped_with_reason(tmp_path):
    # A float32 factorization at rank min(K, N) stores more than the weight itself.
    src, dst, res = optimize_file(tmp_path, "matmul", method="svd", rank=64)
    [layer] = res.report.layers
    assert layer["status"] == "skipped"
    assert "not be smaller" in layer["reason"]
    assert worst_rel_l2(src, dst, feeds_for(matmul_model())) == 0.0


# ---------------------------------------------------------------------------------------------
# (c) IR version
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ir,opset", [(8, 13), (9, 15), (10, 17)])
def test_ir_version_kept_when_it_allows_the_opset(tmp_path, ir, opset):
    model = matmul_model(opset=opset, ir_version=ir)
    src, dst, _ = optimize_file(tmp_path, model, method="rtn", bits=4)
    out = onnx.load(str(dst))
    assert default_opset(out) == 21
    assert out.ir_version == 10  # opset 21 came with IR 10; never beyond what ORT reads
    assert worst_rel_l2(src, dst, feeds_for(model)) < RTN4_FLOOR


def test_newest_ir_input_is_written_with_an_ir_ort_reads(tmp_path):
    # onnx 1.23 writes IR 14 by default; ONNX Runtime 1.31 reads up to IR 13.
    model = matmul_model()
    model.ir_version = onnx.IR_VERSION
    assert model.ir_version > 13
    src = save(model, tmp_path / "ir_new.onnx")
    dst = tmp_path / "ir_new_out.onnx"
    qsdonnx.optimize(src, dst, method="rtn", bits=4, validate=False, progress=False)
    out = onnx.load(str(dst))
    assert out.ir_version <= 13
    model.ir_version = 10
    y_ref = run_model(model, feeds_for(model))[0]
    y = run_model(dst, feeds_for(model))[0]
    assert rel_l2(y_ref, y) < RTN4_FLOOR


# ---------------------------------------------------------------------------------------------
# (d) Constant-node weights
# ---------------------------------------------------------------------------------------------
def test_constant_node_weight_is_compressed_and_constant_removed(tmp_path):
    src, dst, res = optimize_file(tmp_path, "constant_node", method="rtn", bits=4)
    [layer] = res.report.layers
    assert layer["status"] == "compressed"
    assert layer["location"] == "constant-node"
    assert layer["bpw"] == pytest.approx(4.5)
    out = onnx.load(str(dst))
    assert "Constant" not in ops(out)
    assert "Wconst" not in {t.name for t in out.graph.initializer}
    assert all("Wconst" not in n.input for n in out.graph.node)
    # the file shrank: 32 KiB of float32 weight became 4.5 bits per weight
    assert os.path.getsize(dst) < 0.25 * os.path.getsize(src)


# ---------------------------------------------------------------------------------------------
# (e) shared weights
# ---------------------------------------------------------------------------------------------
def test_shared_weight_compressed_once(tmp_path):
    src, dst, res = optimize_file(tmp_path, "shared", method="rtn", bits=4)
    [layer] = res.report.layers
    assert layer["status"] == "compressed"
    assert sorted(layer["nodes"]) == ["mm1", "mm2"]
    out = onnx.load(str(dst))
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1
    consumers = [n for n in out.graph.node if dq[0].output[0] in n.input]
    assert len(consumers) == 2 and all(n.op_type == "MatMul" for n in consumers)
    assert res.report.totals["weights_compressed"] == 1
    assert res.report.totals["compressed_bytes_after"] == layer["bytes_after"] == 4608

    # the same model with two separate (equal) copies stores two compressed weights
    _, dst2, res2 = optimize_file(tmp_path, shared_weight_model(distinct=True), out_name="distinct.onnx",
                                  method="rtn", bits=4)
    assert res2.report.totals["weights_compressed"] == 2
    assert os.path.getsize(dst) + 4000 < os.path.getsize(dst2)
    assert worst_rel_l2(src, dst, feeds_for(shared_weight_model())) < RTN4_FLOOR


# ---------------------------------------------------------------------------------------------
# (f) subgraphs
# ---------------------------------------------------------------------------------------------
def test_if_branch_matmul_skipped_with_subgraph_reason(tmp_path):
    src, dst, res = optimize_file(tmp_path, "if", method="rtn", bits=4)
    by_name = {l["name"]: l for l in res.report.layers}
    assert by_name["W_top"]["status"] == "compressed"
    for name in ("then_w", "else_w"):
        assert by_name[name]["status"] == "skipped"
        assert "subgraph" in by_name[name]["reason"]
    out = onnx.load(str(dst))
    if_node = next(n for n in out.graph.node if n.op_type == "If")
    for attr in if_node.attribute:
        body_ops = [n.op_type for n in attr.g.node]
        assert body_ops == ["Constant", "MatMul"]  # bodies untouched
    assert worst_rel_l2(src, dst, feeds_for(MODEL_BUILDERS["if"]())) < RTN4_FLOOR


def test_weight_also_used_in_subgraph_is_left_alone(tmp_path):
    W = randn((128, 128), 30)
    body = lambda n: helper.make_graph([helper.make_node("MatMul", ["h", "W"], [f"{n}_y"])], n, [],
                                       [helper.make_tensor_value_info(f"{n}_y", TensorProto.FLOAT, [4, 128])])
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["h"], name="top"),
         helper.make_node("If", ["c"], ["Y"], name="branch", then_branch=body("t"), else_branch=body("e"))],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 128]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 128])],
        [numpy_helper.from_array(W, "W")])
    # Its one weight cannot be compressed: nothing to do, said in one line, nothing written.
    with pytest.raises(qsdonnx.errors.NothingToCompress, match="inside If"):
        optimize_file(tmp_path, model, method="rtn", bits=4)
    assert not (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------------------------------------
# (g) float16 models stay float16
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_fp16_model_stays_fp16(tmp_path, scale_dtype):
    src, dst, res = optimize_file(tmp_path, "fp16", method="rtn", bits=4, scale_dtype=scale_dtype)
    [layer] = res.report.layers
    assert layer["status"] == "compressed" and layer["dtype"] == "float16"
    out = onnx.load(str(dst))
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    for n in out.graph.node:
        if n.op_type == "Cast":
            to = next(a.i for a in n.attribute if a.name == "to")
            assert to != TensorProto.FLOAT, f"Cast to float32 on the weight path: {n.name}"
    inferred = onnx.shape_inference.infer_shapes(out)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs
    for n in dqs:
        assert types[n.output[0]] == TensorProto.FLOAT16
    feeds = feeds_for(MODEL_BUILDERS["fp16"]())
    y = run_model(dst, feeds)[0]
    assert y.dtype == np.float16
    assert worst_rel_l2(src, dst, feeds) < RTN4_FLOOR
    # fp16 scales need no Cast at all; fp32 scales are cast (to fp16) before dequantizing
    n_cast = ops(out).count("Cast")
    assert n_cast == (0 if scale_dtype == "float16" else 1)


def test_fp16_svd_factors_are_fp16(tmp_path):
    W = low_rank(128, 64, 8, seed=31).astype(np.float16)
    model = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [4, 128])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [4, 64])],
        [numpy_helper.from_array(W, "W")])
    src, dst, res = optimize_file(tmp_path, model, method="svd", rank=8)
    out = onnx.load(str(dst))
    new = [t for t in out.graph.initializer if t.name.startswith("W.qsd")]
    assert new and all(t.data_type == TensorProto.FLOAT16 for t in new)
    # (128*8 + 8*64) fp16 values = 3 bits per weight
    assert res.report.layers[0]["bpw"] == pytest.approx(3.0)
    assert worst_rel_l2(src, dst, feeds_for(model)) < 5e-3  # fp16 factors and fp16 arithmetic


# ---------------------------------------------------------------------------------------------
# (h) external data
# ---------------------------------------------------------------------------------------------
def test_external_data_input(tmp_path, external_model):
    data = external_model.parent / "model.weights"
    before = {p: file_state(p) for p in (external_model, data)}
    listing = sorted(os.listdir(external_model.parent))
    dst = tmp_path / "out" / "model_q.onnx"
    dst.parent.mkdir()
    res = qsdonnx.optimize(external_model, dst, method="rtn", bits=8, progress=False)
    assert {p: file_state(p) for p in (external_model, data)} == before
    assert sorted(os.listdir(external_model.parent)) == listing
    assert [l["location"] for l in res.report.layers] == ["external-data", "external-data"]
    assert all(l["status"] == "compressed" for l in res.report.layers)
    # the output is self-contained: it runs from another directory without the data file
    moved = tmp_path / "elsewhere" / "m.onnx"
    moved.parent.mkdir()
    shutil.copy(dst, moved)
    assert os.listdir(dst.parent) == ["model_q.onnx"]
    model = two_layer_model()
    assert rel_l2(run_model(external_model, feeds_for(model))[0], run_model(moved, feeds_for(model))[0]) < RTN8_FLOOR
    assert res.report.totals["file_size_before"] == os.path.getsize(external_model) + os.path.getsize(data)


def test_large_input_writes_its_new_tensors_to_disk_as_they_are_made(tmp_path, external_model, monkeypatch):
    """Over the one-file limit (lowered here to the test model's size), each new tensor goes to a
    data file as soon as it is made; validation reads the packed 4-bit codes back from it, the
    output has external data, and no temporary file is left."""
    from qsdonnx.passes import save
    from qsdonnx.store import TensorSpill

    monkeypatch.setattr(save, "PROTOBUF_LIMIT", 2000)
    spilled = []
    put = TensorSpill.put

    def recording(self, tensor):
        out = put(self, tensor)
        if out.data_location == TensorProto.EXTERNAL:
            spilled.append((out.name, out.data_type))
        return out

    monkeypatch.setattr(TensorSpill, "put", recording)
    inodes = []
    close = TensorSpill.close
    monkeypatch.setattr(TensorSpill, "close", lambda self: (self.path.exists() and inodes.append(self.path.stat().st_ino))
                        or close(self))
    dst = tmp_path / "out" / "m.onnx"
    dst.parent.mkdir()
    res = qsdonnx.optimize(external_model, dst, method="rtn", bits=4, progress=False)
    assert sorted(os.listdir(dst.parent)) == ["m.onnx", "m.onnx.data"]
    assert {TensorProto.INT4, TensorProto.UINT4} & {t for _, t in spilled} and len(spilled) >= 2
    assert res.report.validation["max_rel_l2"] < 0.2  # the session read the spilled codes
    model = two_layer_model()
    got = run_model(dst, feeds_for(model))[0]
    assert rel_l2(run_model(external_model, feeds_for(model))[0], got) == pytest.approx(res.report.validation["max_rel_l2"], rel=0.5)
    header = onnx.load(str(dst), load_external_data=False)
    assert {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"} == {"m.onnx.data"}
    # The spilled tensors' file became the data file (renamed, not copied), with the model
    # file's permissions.
    data = os.stat(dst.with_name("m.onnx.data"))
    assert inodes and data.st_ino == inodes[-1]
    assert data.st_mode == os.stat(dst).st_mode


@pytest.mark.parametrize("jobs", [1, 2])
def test_external_weights_are_read_a_few_rows_at_a_time(tmp_path, external_model, monkeypatch, jobs):
    """Round-to-nearest reads an external weight from its data file a few block rows at a time
    (never whole), on one or two workers, and writes exactly the codes of the same model with
    its weights inside the protobuf."""
    from qsdonnx import store
    from qsdonnx.factorize import rtn
    from qsdonnx.passes import workers

    monkeypatch.setattr(rtn, "ROWS_ELEMENTS", 32 * 96)  # a few blocks of 32 rows per read
    monkeypatch.setattr(workers, "PARALLEL_MIN_ELEMENTS", 0)
    reads = []
    real = store.tensor_rows
    monkeypatch.setattr(store, "tensor_rows", lambda t, d, a, b: reads.append((t.name, a, b)) or real(t, d, a, b))
    dst = tmp_path / "ext.onnx"
    qsdonnx.optimize(external_model, dst, method="rtn", bits=4, jobs=jobs, progress=False)
    inline = tmp_path / "inline.onnx"
    qsdonnx.optimize(two_layer_model(), inline, method="rtn", bits=4, jobs=jobs, progress=False)
    K = {"fc1.weight": 128, "fc2.weight": 64}
    assert {n for n, _, _ in reads} == set(K)
    for name, rows in K.items():
        pieces = sorted((a, b) for n, a, b in reads if n == name)
        assert len(pieces) >= 2 and all(b - a < rows for a, b in pieces)
        # Consecutive pieces that cover the weight once.
        assert [a for a, _ in pieces] == [0] + [b for _, b in pieces[:-1]] and pieces[-1][1] == rows
    a, b = onnx.load(str(dst)), onnx.load(str(inline))
    got = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    want = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert got.keys() == want.keys() and len(got) >= 4
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# ---------------------------------------------------------------------------------------------
# (i) report JSON and bits per weight
# ---------------------------------------------------------------------------------------------
def test_report_json_totals(tmp_path):
    report = tmp_path / "report.json"
    src, dst, res = optimize_file(tmp_path, "two_layer", method="rtn", bits=4, report=report)
    data = json.loads(report.read_text())
    comp = [l for l in data["layers"] if l["status"] == "compressed"]
    assert len(comp) == 2
    elements = sum(int(np.prod(l["shape"])) for l in comp)
    after = sum(l["bytes_after"] for l in comp)
    assert data["totals"]["compressed_elements"] == elements == 128 * 64 + 64 * 96
    assert data["totals"]["bits_per_weight"] == pytest.approx(8.0 * after / elements, rel=1e-12)
    assert data["totals"]["compressed_bytes_before"] == 4 * elements
    assert data["totals"]["file_size_after"] == os.path.getsize(dst)
    for l in comp:
        assert l["bpw"] == pytest.approx(8.0 * l["bytes_after"] / np.prod(l["shape"]))
    assert data["validation"]["max_rel_l2"] == pytest.approx(res.report.validation["max_rel_l2"])


@pytest.mark.parametrize("bits,symmetric,bpw", [
    (4, True, 4.5),      # 4 bits + fp16 scale / 32
    (4, False, 4.625),   # + 4-bit zero point / 32
    (8, True, 8.5),
    (2, True, 2.5),
    (3, True, 3.5),      # 3-bit codes are stored as a 3-bit stream
    (3, False, 3.625),   # + zero points in their 4-bit container
])
def test_exact_bits_per_weight(tmp_path, bits, symmetric, bpw):
    src, dst, res = optimize_file(tmp_path, "matmul", method="rtn", bits=bits, block_size=32,
                                  symmetric=symmetric, scale_dtype="float16")
    [layer] = res.report.layers
    out = onnx.load(str(dst))
    # constants shared by every weight (the 3-bit stream's decoding) are counted with the first
    shared = initializer_bytes(out, "qsd.")
    assert shared < 256 and (shared > 0) == (bits == 3)
    assert layer["bpw"] == pytest.approx(bpw + 8.0 * shared / (128 * 64), abs=1e-12)
    assert res.report.totals["bits_per_weight"] == layer["bpw"]
    # the bytes reported are the bytes in the file
    assert initializer_bytes(out, "W.qsd") + shared == layer["bytes_after"] == bpw * 128 * 64 / 8 + shared


def test_fp32_scales_cost_more(tmp_path):
    _, _, res = optimize_file(tmp_path, "matmul", method="rtn", bits=4, block_size=32, scale_dtype="float32")
    assert res.report.layers[0]["bpw"] == 5.0  # the DESIGN example: 4-bit codes + fp32 scale per 32


# ---------------------------------------------------------------------------------------------
# (j) exclude, (k) asymmetric, (l) 2/3-bit
# ---------------------------------------------------------------------------------------------
def test_exclude_skips_matching_weights(tmp_path):
    src, dst, res = optimize_file(tmp_path, "two_layer", method="rtn", bits=4, exclude=("fc2",))
    by_name = {l["name"]: l for l in res.report.layers}
    assert by_name["fc1.weight"]["status"] == "compressed"
    assert by_name["fc2.weight"]["status"] == "skipped"
    assert "exclude" in by_name["fc2.weight"]["reason"]
    out = onnx.load(str(dst))
    kept = next(t for t in out.graph.initializer if t.name == "fc2.weight")
    original = next(t for t in two_layer_model().graph.initializer if t.name == "fc2.weight")
    np.testing.assert_array_equal(numpy_helper.to_array(kept), numpy_helper.to_array(original))
    assert "fc1.weight" not in {t.name for t in out.graph.initializer}
    assert res.report.totals["weights_compressed"] == 1


def test_exclude_everything_is_nothing_to_compress(tmp_path):
    with pytest.raises(qsdonnx.errors.NothingToCompress, match="2x excluded by --exclude"):
        optimize_file(tmp_path, "two_layer", method="rtn", bits=4, exclude=(r".*weight",))
    assert not (tmp_path / "out.onnx").exists()


def test_asymmetric(tmp_path):
    src, dst, res = optimize_file(tmp_path, "matmul", method="rtn", bits=4, symmetric=False)
    out = onnx.load(str(dst))
    [dq] = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq.input) == 3  # zero point given
    inits = {t.name: t for t in out.graph.initializer}
    assert inits[dq.input[0]].data_type == TensorProto.UINT4
    assert inits[dq.input[2]].data_type == TensorProto.UINT4
    err_asym = worst_rel_l2(src, dst, feeds_for(matmul_model()))
    assert err_asym < RTN4_FLOOR
    # on Gaussian blocks the zero point buys accuracy over the symmetric grid
    _, dst_sym, _ = optimize_file(tmp_path, "matmul", out_name="sym.onnx", method="rtn", bits=4)
    assert err_asym < worst_rel_l2(src, dst_sym, feeds_for(matmul_model()))


@pytest.mark.parametrize("kind", ["two_layer", "conv", "gemm"])
def test_two_bit_needs_opset_25(tmp_path, kind):
    src, dst, res = optimize_file(tmp_path, kind, method="rtn", bits=2)
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert default_opset(out) >= 25
    assert out.ir_version <= 13
    inits = {t.name: t for t in out.graph.initializer}
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(inits[n.input[0]].data_type == TensorProto.INT2 for n in dqs)
    model = MODEL_BUILDERS[kind]()
    err = worst_rel_l2(src, dst, feeds_for(model))
    # 2-bit: a coarse but informative approximation; rel_error is checked per layer too
    assert 0 < err < 1.0
    for l in compressed(res):
        assert 0 < l["rel_error"] < 0.75


def folded_initializers(path) -> dict[str, np.ndarray]:
    """The model's initializers after ONNX Runtime's constant folding (basic level)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(path) + ".folded.onnx"
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    folded = onnx.load(so.optimized_model_filepath)
    return {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}, folded


@pytest.mark.parametrize("symmetric", [True, False])
def test_three_bit_stream(tmp_path, symmetric):
    src, dst, res = optimize_file(tmp_path, "matmul", method="rtn", bits=3, symmetric=symmetric)
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    assert default_opset(out) == 21  # 3-bit codes widen to INT4: no need for opset 25
    inits = {t.name: t for t in out.graph.initializer}
    stream = numpy_helper.to_array(inits["W.qsd.Q_stream"])
    assert stream.dtype == np.uint8 and stream.size == 128 * 64 * 3 // 8  # 3 bits per code
    u = unpack_stream(stream, 3, 128 * 64).reshape(128, 64).astype(np.int64)
    assert u.max() == 7 and u.min() >= 0  # the whole 3-bit range, nothing more
    codes = u - 4 if symmetric else u
    # at load time ONNX Runtime folds the decoding into the INT4/UINT4 tensor it widens to
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
    folded = onnx.load(so.optimized_model_filepath)
    assert not any(n.op_type in ("Mod", "Div", "ReduceSum") for n in folded.graph.node)
    [dq] = [n for n in folded.graph.node if n.op_type == "DequantizeLinear"]
    widened = {t.name: t for t in folded.graph.initializer}[dq.input[0]]
    assert widened.data_type == (TensorProto.INT4 if symmetric else TensorProto.UINT4)
    np.testing.assert_array_equal(numpy_helper.to_array(widened), codes)
    # decoded on every run (no folding) or folded once: the same outputs
    feeds = feeds_for(matmul_model())
    np.testing.assert_array_equal(run_model(dst, feeds)[0], run_model(dst, feeds, "basic")[0])
    assert worst_rel_l2(src, dst, feeds) < 0.35


# (m) LPLR under a budget
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [2.0, 3.0, 4.5])
def test_lplr_meets_bits_per_weight_budget(tmp_path, budget):
    src, dst, res = optimize_file(tmp_path, "two_layer", method="lplr", bits=4, bits_per_weight=budget)
    layers = compressed(res)
    assert len(layers) == 2
    for l in layers:
        assert l["method"] == "lplr" and l["rank"] >= 1
    # The budget is over all compressed weights together (one layer may spend more than another).
    total = res.report.totals["bits_per_weight"]
    assert total <= budget
    assert total == pytest.approx(8.0 * sum(l["bytes_after"] for l in layers) / (128 * 64 + 64 * 96))
    # and it is actually used: rounding to whole ranks loses less than a third of it here
    assert total > 0.66 * budget
    out = onnx.load(str(dst))
    onnx.checker.check_model(out, full_check=True)
    err = worst_rel_l2(src, dst, feeds_for(two_layer_model()))
    assert err < 1.0


def test_lplr_larger_budget_gives_larger_rank_and_smaller_error(tmp_path):
    errs, ranks = [], []
    for budget in (2.0, 4.5):
        src, dst, res = optimize_file(tmp_path, "matmul", out_name=f"l{budget}.onnx", method="lplr", bits=4,
                                      bits_per_weight=budget)
        [layer] = res.report.layers
        assert layer["status"] == "compressed" and layer["method"] == "lplr"
        assert layer["bpw"] <= budget  # a single layer: its own bpw is the total
        ranks.append(layer["rank"])
        errs.append(worst_rel_l2(src, dst, feeds_for(matmul_model())))
    assert ranks[0] < ranks[1]
    assert errs[1] < errs[0]


def test_lplr_with_explicit_rank_counts_every_byte(tmp_path):
    # L (128, 16) 4-bit in blocks of 32 along 128: 16*64 B codes + 4*16 fp16 scales = 1152 B;
    # R (16, 64): one (clipped) block of 16 per column: 64*8 B codes + 64 fp16 scales = 640 B.
    src, dst, res = optimize_file(tmp_path, "matmul", method="lplr", bits=4, rank=16)
    [layer] = res.report.layers
    assert layer["status"] == "compressed" and layer["rank"] == 16
    assert layer["bytes_after"] == 1152 + 640
    assert layer["bpw"] == 1.75
    out = onnx.load(str(dst))
    assert initializer_bytes(out, "W.qsd") == 1792
    err = worst_rel_l2(src, dst, feeds_for(matmul_model()))
    # the output error follows the weight error (X is white noise, so they agree in expectation)
    assert err == pytest.approx(layer["rel_error"], rel=0.2)


def test_lplr_on_low_rank_weight_is_accurate(tmp_path):
    model = matmul_model(weight=low_rank(128, 64, 8, seed=21))
    src, dst, res = optimize_file(tmp_path, model, method="lplr", bits=8, rank=8)
    assert res.report.layers[0]["status"] == "compressed"
    assert worst_rel_l2(src, dst, feeds_for(model)) < RTN8_FLOOR  # 8-bit factors of an exact rank-8 weight


# ---------------------------------------------------------------------------------------------
# Gather embedding tables, validation inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,symmetric,floor", [(8, True, RTN8_FLOOR), (4, True, RTN4_FLOOR), (4, False, RTN4_FLOOR)])
def test_gather_embedding(tmp_path, bits, symmetric, floor):
    T = randn((256, 64), 40)
    model = make_model([helper.make_node("Gather", ["T", "ids"], ["Y"], name="emb")],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 5, 64])],
                       [numpy_helper.from_array(T, "T")])
    src, dst, res = optimize_file(tmp_path, model, method="rtn", bits=bits, symmetric=symmetric)
    [layer] = res.report.layers
    assert layer["status"] == "compressed" and layer["view"] == "embedding"
    ids = np.array([[0, 255, 17, 3, 3], [128, 1, 254, 64, 9]], np.int64)
    y = run_model(dst, {"ids": ids})[0]
    assert y.shape == (2, 5, 64)
    assert rel_l2(T[ids], y) < floor
    assert rel_l2(T[ids], y) == pytest.approx(layer["rel_error"], rel=0.5)


@pytest.mark.parametrize("width,symmetric", [(64, True), (64, False), (60, True)])
def test_gather_embedding_three_bit(tmp_path, width, symmetric):
    """3-bit tables are stored as a 3-bit stream per row (rows padded to 8 codes) and the
    gathered rows are decoded at run time."""
    T = randn((256, width), 45)
    model = make_model([helper.make_node("Gather", ["T", "ids"], ["Y"], name="emb")],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 5, width])],
                       [numpy_helper.from_array(T, "T")])
    src, dst, res = optimize_file(tmp_path, model, method="rtn", bits=3, symmetric=symmetric, block_size=32)
    [layer] = res.report.layers
    assert layer["status"] == "compressed" and layer["bits"] == 3
    codes = next(t for t in onnx.load(str(dst)).graph.initializer if t.name == "T.qsd.codes")
    assert numpy_helper.to_array(codes).shape == (256, -(-width // 8), 3)
    ids = np.array([[0, 255, 17, 3, 3], [128, 1, 254, 64, 9]], np.int64)
    for level in ("disable_all", "all"):
        y = run_model(dst, {"ids": ids}, level)[0]
        assert y.shape == (2, 5, width)
        assert rel_l2(T[ids], y) < 0.3
        assert rel_l2(T[ids], y) == pytest.approx(layer["rel_error"], rel=0.5)


def test_validation_uses_given_inputs_and_shapes(tmp_path):
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])],
                       [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 128])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 64])],
                       [numpy_helper.from_array(randn((128, 64), 41), "W")], opset=17, ir_version=9)
    X = randn((5, 128), 42)
    np.savez(tmp_path / "inputs.npz", X=X)
    src, dst, res = optimize_file(tmp_path, model, method="rtn", bits=4, inputs=tmp_path / "inputs.npz")
    want = rel_l2(run_model(src, {"X": X})[0], run_model(dst, {"X": X})[0])
    assert res.report.validation["samples"] == 5
    assert res.report.validation["max_rel_l2"] == pytest.approx(want, rel=1e-3)
    _, _, res2 = optimize_file(tmp_path, model, out_name="shaped.onnx", method="rtn", bits=4,
                               input_shapes=(("X", (3, 128)),), num_inputs=2)
    assert res2.report.validation["samples"] == 6


def test_api_accepts_model_proto_and_returns_model(tmp_path):
    model = matmul_model()
    res = qsdonnx.optimize(model, None, method="rtn", bits=8, progress=False)
    assert res.output is None and res.passed
    assert default_opset(res.model) == 21
    assert worst_rel_l2(model, res.model, feeds_for(model)) < RTN8_FLOOR
    # the caller's proto is not modified
    assert default_opset(model) == 13 and [t.name for t in model.graph.initializer] == ["W"]


def test_api_max_rel_error_and_keep_on_fail(tmp_path):
    src = save(matmul_model(), tmp_path / "m.onnx")
    with pytest.raises(qsdonnx.ValidationFailed):
        qsdonnx.optimize(src, tmp_path / "a.onnx", method="rtn", bits=4, max_rel_error=1e-9, progress=False)
    assert not (tmp_path / "a.onnx").exists()
    res = qsdonnx.optimize(src, tmp_path / "b.onnx", method="rtn", bits=4, max_rel_error=1e-9, keep_on_fail=True,
                           progress=False)
    assert res.passed is False and (tmp_path / "b.onnx").is_file()
    res = qsdonnx.optimize(src, tmp_path / "c.onnx", method="rtn", bits=8, max_rel_error=RTN8_FLOOR, progress=False)
    assert res.passed is True


def test_unknown_option_is_a_config_error(tmp_path):
    with pytest.raises(qsdonnx.ConfigError):
        qsdonnx.optimize(matmul_model(), None, no_such_option=1)


# ---------------------------------------------------------------------------------------------
# corner cases found while writing the tests above
# ---------------------------------------------------------------------------------------------
def test_gather_width_not_a_multiple_of_block(tmp_path):
    """A 48-wide table with blocks of 32: compress it correctly or skip it with the reason, but
    never write a graph that fails in ONNX Runtime."""
    T = randn((256, 48), 43)
    model = make_model([helper.make_node("Gather", ["T", "ids"], ["Y"], name="emb")],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 5, 48])],
                       [numpy_helper.from_array(T, "T")])
    src, dst, res = optimize_file(tmp_path, model, method="rtn", bits=4, block_size=32, validate=False)
    [layer] = res.report.layers
    ids = np.arange(10, dtype=np.int64).reshape(2, 5) * 25
    y = run_model(dst, {"ids": ids})[0]
    if layer["status"] == "compressed":
        assert rel_l2(T[ids], y) < RTN4_FLOOR
    else:
        assert "block" in layer["reason"]
        np.testing.assert_array_equal(y, T[ids])


def test_initializer_listed_as_graph_input_is_reported(tmp_path):
    """Older exporters list every initializer as a graph input too. Such a weight is
    overridable at run time; whatever is done with it must show up in the report."""
    W = randn((128, 64), 44)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 128]),
                               helper.make_tensor_value_info("W", TensorProto.FLOAT, [128, 64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 64])],
                              [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    src, dst, res = optimize_file(tmp_path, model, method="rtn", bits=4, validate=False)
    names = [l["name"] for l in res.report.layers]
    assert names == ["W"]
    layer = res.report.layers[0]
    assert layer["status"] == "compressed" or layer["reason"]


def test_gemm_beta_constant_not_counted_as_weight_bytes(tmp_path):
    """The bytes of a layer are those that replace the weight. With C a graph input the
    rewrite multiplies C by beta; that scalar, like beta*C for an initializer C, is not weight."""
    W = low_rank(128, 64, 8, seed=45)
    model = make_model([helper.make_node("Gemm", ["X", "W", "C"], ["Y"], beta=3.0)],
                       [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 128]),
                        helper.make_tensor_value_info("C", TensorProto.FLOAT, [4, 64])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 64])],
                       [numpy_helper.from_array(W, "W")])
    src, dst, res = optimize_file(tmp_path, model, method="svd", rank=8)
    assert worst_rel_l2(src, dst, feeds_for(model)) < EXACT_FLOOR
    [layer] = res.report.layers
    assert layer["bytes_after"] == (128 * 8 + 8 * 64) * 4
    assert layer["bpw"] == 6.0
    # and the same with C an initializer (beta*C is folded and not counted)
    _, _, res2 = optimize_file(tmp_path, gemm_model(rank=8, beta=2.0), out_name="c_init.onnx", method="svd", rank=8)
    assert res2.report.layers[0]["bytes_after"] == (128 * 8 + 8 * 64) * 4


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_jobs_give_identical_bytes(tmp_path, monkeypatch, method):
    import qsdonnx.passes.factorize as fz

    monkeypatch.setattr(fz, "PARALLEL_MIN_ELEMENTS", 0)  # the test model is small
    calls = []
    real = fz.factorized
    monkeypatch.setattr(fz, "factorized", lambda jobs, workers, *rest: calls.append(workers) or real(jobs, workers, *rest))
    model = two_layer_model()
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{model.graph.input[0].name: randn((32, 128), 8)})
    opts = dict(method=method, bits=4, calib=calib if method == "gptq" else None, tune_epochs=0, rotate=False)
    _, one, _ = optimize_file(tmp_path, model, out_name="one.onnx", jobs=1, **opts)
    _, two, res = optimize_file(tmp_path, model, out_name="two.onnx", jobs=2, **opts)
    assert calls == [1, 2]  # the first run had one worker, the second two
    assert one.read_bytes() == two.read_bytes()
    assert all(l["status"] == "compressed" for l in res.report.layers)


def test_run_notes_reach_the_report_and_its_table(tmp_path):
    """A budget without calibration data plans on weight errors alone: the run says so, in the
    report and in the printed table."""
    src, dst, res = optimize_file(tmp_path, "two_layer", bits_per_weight=4.0)
    assert any("no --calib data" in n for n in res.report.notes)
    assert "note: no --calib data" in res.report.format_table()
    _, _, plain = optimize_file(tmp_path, "two_layer", out_name="plain.onnx", method="rtn", bits=4)
    assert plain.report.notes == [] and "note:" not in plain.report.format_table()


def test_large_model_defaults(tmp_path, monkeypatch):
    """Above the large-model size, --calib neither tunes end to end nor rotates unless asked,
    and the report says so; asked for, they run."""
    import qsdonnx.api as api

    model = two_layer_model()
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{model.graph.input[0].name: randn((32, 128), 8)})
    _, _, small = optimize_file(tmp_path, model, method="gptq", bits=4, calib=calib)
    assert small.report.config["rotate"] is True and small.report.tuning
    monkeypatch.setattr(api, "LARGE_MODEL_BYTES", 1000)
    _, _, large = optimize_file(tmp_path, model, out_name="large.onnx", method="gptq", bits=4, calib=calib)
    assert large.report.config["rotate"] is False and not large.report.tuning
    note = next(n for n in large.report.notes if "not run by default" in n)
    assert "--tune-epochs N" in note and "--rotate" in note
    _, _, asked = optimize_file(tmp_path, model, out_name="asked.onnx", method="gptq", bits=4, calib=calib,
                                rotate=True, tune_epochs=1)
    assert asked.report.config["rotate"] is True and asked.report.tuning
    assert not any("not run by default" in n for n in asked.report.notes)


def test_jobs_admitted_by_memory(monkeypatch):
    """Jobs whose memory does not fit together run one at a time; their results keep order."""
    import threading

    from qsdonnx.passes import workers as wk

    monkeypatch.setattr(wk, "IN_FLIGHT_BYTES", 100)
    running, most = [0], [0]
    lock = threading.Lock()

    def job(source, choice, cfg, H, dense):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        import time
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return source, None

    monkeypatch.setattr(wk, "_job", job)
    jobs = [(i, None, None, None, "float32") for i in range(6)]
    got = [r[0] for r in wk.factorized(iter(jobs), 3, [60] * 6)]
    assert got == list(range(6)) and most[0] == 1
    most[0] = 0
    got = [r[0] for r in wk.factorized(iter(jobs), 3, [30] * 6)]
    assert got == list(range(6)) and most[0] == 3
