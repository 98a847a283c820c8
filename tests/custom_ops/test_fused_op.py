"""qsdonnx::QsdMatMul custom op against a numpy reference of
Y = X . (deq(Q) + deq(L) . deq(R) + S) + bias."""

from __future__ import annotations

import os
import shutil
import zlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from qsdonnx import buildops, runtime  # noqa: E402


# --------------------------------------------------------------------------
# MatMulNBits packing and the reference
# --------------------------------------------------------------------------

def pack_codes(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """codes (cols, depth) unsigned -> uint8 (cols, kb, block*bits/8), low bits first."""
    cols, depth = codes.shape
    kb = -(-depth // block)
    padded = np.zeros((cols, kb * block), dtype=np.uint32)
    padded[:, :depth] = codes
    per = 8 // bits
    grouped = padded.reshape(cols, kb, block // per, per)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint32)
    for i in range(per):
        packed |= grouped[..., i] << (i * bits)
    return packed.astype(np.uint8)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """zp (cols, kb) -> uint8 (cols, ceil(kb*bits/8)), low bits first."""
    cols, kb = zp.shape
    per = 8 // bits
    nbytes = -(-kb * bits // 8)
    padded = np.zeros((cols, nbytes * per), dtype=np.uint32)
    padded[:, :kb] = zp
    grouped = padded.reshape(cols, nbytes, per)
    packed = np.zeros((cols, nbytes), dtype=np.uint32)
    for i in range(per):
        packed |= grouped[..., i] << (i * bits)
    return packed.astype(np.uint8)


class QuantFactor:
    """A random block-quantized (depth, cols) matrix and its packed form."""

    def __init__(self, rng, depth: int, cols: int, bits: int, block: int, zp_present=True):
        self.depth, self.cols, self.bits, self.block = depth, cols, bits, block
        kb = -(-depth // block)
        self.codes = rng.integers(0, 2 ** bits, size=(cols, depth))
        if zp_present:
            self.zp = rng.integers(0, 2 ** bits, size=(cols, kb))
        else:
            self.zp = np.full((cols, kb), 2 ** (bits - 1))
        signs = rng.choice([-1.0, 1.0], size=(cols, kb))
        self.scales = (signs * rng.uniform(0.02, 0.2, size=(cols, kb))).astype(np.float16)
        self.B = pack_codes(self.codes, bits, block)
        self.scales_flat = self.scales.reshape(-1)
        self.zp_packed = pack_zero_points(self.zp, bits) if zp_present else None

    def dense(self) -> np.ndarray:
        """Dequantized (depth, cols) in float64."""
        blk = np.arange(self.depth) // self.block
        zp = self.zp[:, blk]
        sc = self.scales.astype(np.float64)[:, blk]
        return ((self.codes - zp) * sc).T


class SparseFactor:
    def __init__(self, rng, K: int, N: int, density: float = 0.05):
        mask = rng.random((K, N)) < density
        vals = np.where(mask, rng.normal(0, 0.5, size=(K, N)), 0.0).astype(np.float16)
        mask &= vals != 0
        rows, cols = np.nonzero(mask)
        self.rowptr = np.zeros(K + 1, dtype=np.int32)
        np.add.at(self.rowptr, rows + 1, 1)
        self.rowptr = np.cumsum(self.rowptr).astype(np.int32)
        self.cols = cols.astype(np.int32)
        self.vals = vals[rows, cols].astype(np.float16)
        self.K, self.N = K, N

    def dense(self) -> np.ndarray:
        d = np.zeros((self.K, self.N))
        for k in range(self.K):
            s, e = self.rowptr[k], self.rowptr[k + 1]
            d[k, self.cols[s:e]] += self.vals[s:e].astype(np.float64)
        return d


def make_case(seed, K, N, *, q=None, lr=None, sparse=False, bias=False, zp_present=True):
    """q=(bits, block); lr=(rank, l_bits, l_block, r_bits, r_block)."""
    rng = np.random.default_rng(seed)
    case = {"K": K, "N": N}
    case["Q"] = QuantFactor(rng, K, N, *q, zp_present=zp_present) if q else None
    if lr:
        rank, lb, lblk, rb, rblk = lr
        case["L"] = QuantFactor(rng, K, rank, lb, lblk, zp_present=zp_present)
        case["R"] = QuantFactor(rng, rank, N, rb, rblk, zp_present=zp_present)
    else:
        case["L"] = case["R"] = None
    case["S"] = SparseFactor(rng, K, N) if sparse else None
    case["bias"] = rng.normal(size=N).astype(np.float32) if bias else None
    return case


def reference(case, x: np.ndarray) -> np.ndarray:
    K, N = case["K"], case["N"]
    x2 = x.reshape(-1, K).astype(np.float64)
    y = np.zeros((x2.shape[0], N))
    if case["Q"] is not None:
        y += x2 @ case["Q"].dense()
    if case["L"] is not None:
        t = (x2 @ case["L"].dense()).astype(np.float32).astype(np.float64)
        y += t @ case["R"].dense()
    if case["S"] is not None:
        y += x2 @ case["S"].dense()
    if case["bias"] is not None:
        y += case["bias"].astype(np.float64)
    return y.reshape(*x.shape[:-1], N)


def build_model(case, x_shape) -> onnx.ModelProto:
    K, N = case["K"], case["N"]
    inits = []
    names = [""] * 14

    def add(pos, name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        names[pos] = name

    attrs = {"K": K, "N": N, "q_bits": 0, "q_block": 0, "rank": 0, "l_bits": 0,
             "l_block": 0, "r_bits": 0, "r_block": 0, "has_sparse": 0, "has_bias": 0}
    for pos, key in ((1, "Q"), (4, "L"), (7, "R")):
        f = case[key]
        if f is None:
            continue
        add(pos, f"{key}_B", f.B)
        add(pos + 1, f"{key}_scales", f.scales_flat)
        if f.zp_packed is not None:
            add(pos + 2, f"{key}_zp", f.zp_packed)
        prefix = key.lower()
        attrs[f"{prefix}_bits"] = f.bits
        attrs[f"{prefix}_block"] = f.block
    if case["L"] is not None:
        attrs["rank"] = case["L"].cols
    if case["S"] is not None:
        s = case["S"]
        add(10, "S_rowptr", s.rowptr)
        add(11, "S_cols", s.cols)
        add(12, "S_vals", s.vals)
        attrs["has_sparse"] = 1
    if case["bias"] is not None:
        add(13, "bias", case["bias"])
        attrs["has_bias"] = 1
    names[0] = "X"
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node("QsdMatMul", names, ["Y"], domain="qsdonnx", **attrs)
    xin = helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))
    yout = helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(x_shape[:-1]) + [N])
    graph = helper.make_graph([node], "qsd_matmul_test", [xin], [yout], initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("qsdonnx", 1)],
        ir_version=10,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def assert_close(y, ref, rtol=1e-5):
    assert y.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

def _toolchain_missing() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler is installed"
    return None


@pytest.fixture(scope="module")
def ops_lib(tmp_path_factory):
    reason = _toolchain_missing()
    if reason:
        pytest.skip(f"cannot build the custom op library: {reason}")
    lib = buildops.build_ops(cuda=False, build_dir=tmp_path_factory.mktemp("qsdops-cpu"))
    mp = pytest.MonkeyPatch()
    mp.setenv(buildops.ENV_LIBRARY, str(lib))
    yield lib
    mp.undo()


def run_model(model, x, providers=None, threads=None):
    sess = runtime.session(model.SerializeToString(), providers=providers,
                           intra_op_num_threads=threads)
    return sess.run(None, {"X": x})[0]


CASES = {
    "q2_k100_b32": dict(K=100, N=24, q=(2, 32)),
    "q4_k100_b32": dict(K=100, N=24, q=(4, 32)),
    "q8_k100_b32": dict(K=100, N=24, q=(8, 32)),
    "q4_k96_b16": dict(K=96, N=33, q=(4, 16)),
    "q4_k200_b128": dict(K=200, N=17, q=(4, 128)),
    "q2_k520_b64": dict(K=520, N=40, q=(2, 64)),
    "q8_k300_b256": dict(K=300, N=5, q=(8, 256)),
    "q4_default_zp": dict(K=70, N=20, q=(4, 32), zp_present=False),
    "q4_k100_b24": dict(K=100, N=18, q=(4, 24)),
    "q8_k50_b20": dict(K=50, N=35, q=(8, 20)),
    "q2_k64_b12": dict(K=64, N=16, q=(2, 12)),
    "q4_k1000_b512": dict(K=1000, N=20, q=(4, 512)),
    "lowrank_only": dict(K=64, N=40, lr=(12, 4, 16, 8, 16)),
    "lowrank_2bit": dict(K=90, N=19, lr=(20, 2, 32, 2, 16)),
    "sparse_only": dict(K=48, N=30, sparse=True),
    "bias_only": dict(K=16, N=8, bias=True),
    "all_parts": dict(K=150, N=70, q=(4, 32), lr=(24, 4, 32, 8, 16), sparse=True, bias=True),
    "all_parts_2bit": dict(K=64, N=48, q=(2, 16), lr=(8, 8, 16, 4, 16), sparse=True, bias=True),
}


@pytest.mark.parametrize("M", [1, 3, 37])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(ops_lib, name, M):
    case = make_case(zlib.crc32(name.encode()) % 1000 + M, **CASES[name])
    x = np.random.default_rng(M).normal(size=(M, case["K"])).astype(np.float32)
    y = run_model(build_model(case, x.shape), x)
    assert_close(y, reference(case, x))


@pytest.mark.parametrize("shape", [(2, 5), (3, 1), (1, 70), (2, 3, 4)])
def test_leading_dims(ops_lib, shape):
    case = make_case(7, **CASES["all_parts"])
    x = np.random.default_rng(1).normal(size=(*shape, case["K"])).astype(np.float32)
    y = run_model(build_model(case, x.shape), x)
    assert y.shape == (*shape, case["N"])
    assert_close(y, reference(case, x))


def test_dynamic_batch_and_threads(ops_lib):
    case = make_case(11, K=384, N=200, q=(4, 32), lr=(32, 4, 32, 4, 32), sparse=True, bias=True)
    model = build_model(case, ("batch", case["K"]))
    sess1 = runtime.session(model.SerializeToString(), intra_op_num_threads=1)
    sess2 = runtime.session(model.SerializeToString(), intra_op_num_threads=2)
    for M in (1, 4, 129, 300, 600):
        x = np.random.default_rng(M).normal(size=(M, case["K"])).astype(np.float32)
        ref = reference(case, x)
        y1 = sess1.run(None, {"X": x})[0]
        y2 = sess2.run(None, {"X": x})[0]
        assert_close(y1, ref)
        np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("M", [1, 6])
def test_half_precision_edge_scales(ops_lib, M):
    """Scales that are float16 subnormals, signed zeros and extremes."""
    case = make_case(21, K=64, N=32, q=(4, 32))
    q = case["Q"]
    special = np.array([6e-8, -6e-8, 1e-5, -3e-5, 0.0, -0.0, 65504.0, -2.0 ** -14],
                       dtype=np.float16)
    flat = q.scales.reshape(-1).copy()
    flat[: special.size] = special
    q.scales = flat.reshape(q.scales.shape)
    q.scales_flat = q.scales.reshape(-1)
    x = np.random.default_rng(M).normal(size=(M, 64)).astype(np.float32)
    y = run_model(build_model(case, x.shape), x)
    assert_close(y, reference(case, x))


def test_empty_batch(ops_lib):
    case = make_case(3, **CASES["all_parts"])
    model = build_model(case, ("batch", case["K"]))
    x = np.zeros((0, case["K"]), dtype=np.float32)
    y = run_model(model, x)
    assert y.shape == (0, case["N"])


def test_bad_packed_shape_is_reported(ops_lib):
    case = make_case(5, K=64, N=16, q=(4, 32))
    model = build_model(case, (2, 64))
    for init in model.graph.initializer:
        if init.name == "Q_B":
            arr = numpy_helper.to_array(init)[:, :, :-1]
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), "Q_B"))
    x = np.ones((2, 64), dtype=np.float32)
    with pytest.raises(Exception, match="Q_B"):
        run_model(model, x)


def test_bad_attribute_is_reported(ops_lib):
    case = make_case(5, K=64, N=16, q=(4, 32))
    model = build_model(case, (2, 64))
    for a in model.graph.node[0].attribute:
        if a.name == "q_bits":
            a.i = 3
    with pytest.raises(Exception, match="q_bits"):
        run_model(model, np.ones((2, 64), dtype=np.float32))


def test_onnx_schema_registration():
    assert isinstance(runtime.register_onnx_schema(), bool)
    assert runtime.register_onnx_schema() is False
    assert onnx.defs.has("QsdMatMul", "qsdonnx")
    case = make_case(9, **CASES["all_parts"])
    model = build_model(case, ("batch", 3, case["K"]))
    model.graph.output[0].type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, case["N"]]


def test_missing_library_message(monkeypatch, tmp_path):
    monkeypatch.setenv(buildops.ENV_LIBRARY, str(tmp_path / "nothing.so"))
    case = make_case(5, K=32, N=16, q=(4, 32))
    model = build_model(case, (1, 32))
    with pytest.raises(RuntimeError, match="qsdonnx build-ops"):
        runtime.session(model.SerializeToString())


def test_plain_model_needs_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv(buildops.ENV_LIBRARY, str(tmp_path / "nothing.so"))
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    sess = runtime.session(model)
    out = sess.run(None, {"X": np.array([[-1, 0, 1, 2]], dtype=np.float32)})[0]
    np.testing.assert_array_equal(out, [[0, 0, 1, 2]])


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_ops_lib(tmp_path_factory):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    if shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("nvcc is not installed")
    reason = _toolchain_missing()
    if reason:
        pytest.skip(f"cannot build the custom op library: {reason}")
    lib = buildops.build_ops(cuda=True, build_dir=tmp_path_factory.mktemp("qsdops-cuda"))
    mp = pytest.MonkeyPatch()
    mp.setenv(buildops.ENV_LIBRARY, str(lib))
    yield lib
    mp.undo()


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 16, 37, 130])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_reference(cuda_ops_lib, name, M):
    case, x, sess = cuda_case(name, CASES[name], M)
    assert_close(sess.run(None, {"X": x})[0], reference(case, x), rtol=2e-5)


def cuda_case(name, spec, M):
    """A case, its input of M rows and a session on the CUDA execution provider."""
    case = make_case(zlib.crc32(name.encode()) % 1000 + M, **spec)
    x = np.random.default_rng(M).normal(size=(M, case["K"])).astype(np.float32)
    sess = runtime.session(build_model(case, x.shape).SerializeToString(),
                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    return case, x, sess


# Layer sizes of real models: the depth is split across blocks (small N, long K), rows come in
# several groups of 8, and 2-bit codes, low-rank factors and a bias share one launch.
CUDA_LARGE_CASES = {
    "q4_k4096_n1024_b32": dict(K=4096, N=1024, q=(4, 32), bias=True),
    "q2_k2048_n96_b64": dict(K=2048, N=96, q=(2, 64)),
    "q8_k1536_n384_b32": dict(K=1536, N=384, q=(8, 32)),
    "q2_lowrank64_k3072_n768": dict(K=3072, N=768, q=(2, 32), lr=(64, 4, 32, 4, 32), bias=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("name", sorted(CUDA_LARGE_CASES))
def test_cuda_large_matches_reference_and_repeats(cuda_ops_lib, name, M):
    case, x, sess = cuda_case(name, CUDA_LARGE_CASES[name], M)
    y = sess.run(None, {"X": x})[0]
    assert np.isfinite(y).all()
    assert_close(y, reference(case, x), rtol=2e-5)
    # Partial sums over the split depth are added in a fixed order: bit-identical reruns.
    for _ in range(3):
        np.testing.assert_array_equal(sess.run(None, {"X": x})[0], y)


_CUDA_GENERIC_SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, {root!r})
import tests.custom_ops.test_fused_op as t
from qsdonnx import runtime
for name in ("q4_k4096_n1024_b32", "q2_lowrank64_k3072_n768"):
    case = t.make_case(23, **t.CUDA_LARGE_CASES[name])
    for M in (1, 9, 40):
        x = np.random.default_rng(M).normal(size=(M, case["K"])).astype(np.float32)
        sess = runtime.session(t.build_model(case, x.shape).SerializeToString(),
                               providers=["CUDAExecutionProvider"])
        t.assert_close(sess.run(None, {{"X": x}})[0], t.reference(case, x), rtol=2e-5)
print("ok")
"""


@pytest.mark.gpu
def test_cuda_generic_kernels_on_word_layouts(cuda_ops_lib):
    """QSDONNX_CUDA_GENERIC=1 sends layouts the word kernel takes to the generic kernels,
    which must give the same products."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, QSDONNX_CUDA_GENERIC="1", QSDONNX_OPS_LIB=str(cuda_ops_lib))
    proc = subprocess.run([sys.executable, "-c", _CUDA_GENERIC_SCRIPT.format(root=root)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("bits,block,K", [(4, 32, 100), (8, 32, 100), (2, 16, 70), (4, 64, 256)])
def test_packing_matches_matmulnbits(ops_lib, bits, block, K):
    """The Q part agrees with ORT's com.microsoft.MatMulNBits on the same packed inputs."""
    N, M = 24, 5
    case = make_case(bits * 100 + block, K=K, N=N, q=(bits, block))
    q = case["Q"]
    x = np.random.default_rng(2).normal(size=(M, K)).astype(np.float32)
    inits = [
        numpy_helper.from_array(q.B, "B"),
        numpy_helper.from_array(q.scales_flat.astype(np.float32), "scales"),
        numpy_helper.from_array(q.zp_packed, "zp"),
    ]
    node = helper.make_node("MatMulNBits", ["X", "B", "scales", "zp"], ["Y"],
                            domain="com.microsoft", K=K, N=N, bits=bits, block_size=block,
                            accuracy_level=0)
    graph = helper.make_graph(
        [node], "nbits", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])], initializer=inits)
    nbits_model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10)
    try:
        ref_sess = runtime.session(nbits_model.SerializeToString(),
                                   graph_optimization_level="disable")
    except Exception as exc:  # bit widths this ORT build lacks
        pytest.skip(f"MatMulNBits with bits={bits} unavailable: {exc}")
    y_nbits = ref_sess.run(None, {"X": x})[0]
    y_ours = run_model(build_model(case, x.shape), x)
    assert_close(y_ours, y_nbits, rtol=1e-4)
    assert_close(y_ours, reference(case, x))


_ISA_SCRIPT = r"""
import sys
import numpy as np
sys.path.insert(0, {root!r})
import tests.custom_ops.test_fused_op as t
from qsdonnx import runtime
for name in ("all_parts", "q2_k520_b64", "q8_k100_b32", "lowrank_2bit", "q4_k96_b16", "q4_k100_b24"):
    case = t.make_case(17, **t.CASES[name])
    for M in (1, 7, 300):
        x = np.random.default_rng(M).normal(size=(M, case["K"])).astype(np.float32)
        y = runtime.session(t.build_model(case, x.shape)).run(None, {{"X": x}})[0]
        t.assert_close(y, t.reference(case, x))
for name in ("q4_k384_n200_b32", "all_parts", "all_parts_2bit", "lowrank_2bit", "q4_k90_b18"):
    case = t.make_case(19, **t.INT8_CASES[name])
    for M in (1, 7, 130):
        x = np.random.default_rng(M).normal(size=(M, case["K"])).astype(np.float32)
        y = runtime.session(t.build_model_int8(case, x.shape)).run(None, {{"X": x}})[0]
        t.assert_close(y, t.reference_int8(case, x), rtol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_instruction_set_variants(ops_lib, isa):
    """The baseline and AVX2 code paths (the default picks the best available),
    float and int8 activations."""
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, QSDONNX_CPU_ISA=isa, QSDONNX_OPS_LIB=str(ops_lib))
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT.format(root=root)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------
# int8 activations (act_int8 = 1)
# --------------------------------------------------------------------------

def quantize_activations(a: np.ndarray, block: int):
    """Per-row, per-block symmetric int8 quantization as the CPU kernel does it:
    q = round-half-even(a * (127 / absmax)) in float32, scale = absmax / 127."""
    a = np.asarray(a, dtype=np.float32)
    rows, depth = a.shape
    q = np.zeros((rows, depth), dtype=np.int64)
    scale = np.zeros((rows, depth), dtype=np.float64)
    for k0 in range(0, depth, block):
        blk = a[:, k0:k0 + block]
        amax = np.abs(blk).max(axis=1)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q[:, k0:k0 + block] = np.clip(np.rint(blk * inv[:, None]), -127, 127)
        scale[:, k0:k0 + block] = (amax / np.float32(127)).astype(np.float32)[:, None]
    return q, scale


def int8_product(a: np.ndarray, f: QuantFactor) -> np.ndarray:
    """quant(a) . deq(f): exact integer dot products per block, scaled per block."""
    q, sa = quantize_activations(a, f.block)
    y = np.zeros((a.shape[0], f.cols))
    for b, k0 in enumerate(range(0, f.depth, f.block)):
        w = (f.codes[:, k0:k0 + f.block] - f.zp[:, b:b + 1]).T  # (count, cols), integers
        dot = q[:, k0:k0 + f.block] @ w
        y += dot * sa[:, k0:k0 + 1] * f.scales[:, b].astype(np.float64)[None, :]
    return y


def reference_int8(case, x: np.ndarray) -> np.ndarray:
    """The reference with the int8-activation product for parts of <= 4 bits."""
    K, N = case["K"], case["N"]
    x2 = x.reshape(-1, K)
    y = np.zeros((x2.shape[0], N))
    x64 = x2.astype(np.float64)

    def product(a, f):
        return int8_product(a, f) if f.bits <= 4 else a.astype(np.float64) @ f.dense()

    if case["Q"] is not None:
        y += product(x2, case["Q"])
    if case["L"] is not None:
        t = product(x2, case["L"]).astype(np.float32)
        y += product(t, case["R"])
    if case["S"] is not None:
        y += x64 @ case["S"].dense()
    if case["bias"] is not None:
        y += case["bias"].astype(np.float64)
    return y.reshape(*x.shape[:-1], N)


def build_model_int8(case, x_shape) -> onnx.ModelProto:
    model = build_model(case, x_shape)
    model.graph.node[0].attribute.append(helper.make_attribute("act_int8", 1))
    return model


INT8_CASES = {name: CASES[name] for name in (
    "q2_k100_b32", "q4_k100_b32", "q8_k100_b32", "q4_k96_b16", "q4_k200_b128", "q2_k520_b64",
    "q4_default_zp", "q4_k100_b24", "q2_k64_b12", "q4_k1000_b512", "lowrank_only",
    "lowrank_2bit", "all_parts", "all_parts_2bit")}
INT8_CASES["q4_k384_n200_b32"] = dict(K=384, N=200, q=(4, 32), bias=True)
INT8_CASES["q4_k90_b18"] = dict(K=90, N=21, q=(4, 18))


@pytest.mark.parametrize("M", [1, 5, 37, 130])
@pytest.mark.parametrize("name", sorted(INT8_CASES))
def test_int8_activations(ops_lib, name, M):
    case = make_case(zlib.crc32(name.encode()) % 1000 + M, **INT8_CASES[name])
    x = np.random.default_rng(M + 100).normal(size=(M, case["K"])).astype(np.float32)
    x[0, :7] = 0.0  # a block of zeros when the block is small
    y = run_model(build_model_int8(case, x.shape), x)
    assert_close(y, reference_int8(case, x), rtol=1e-4)
    exact = reference(case, x)
    err = np.abs(y - exact).max() / np.abs(exact).max()
    assert err < 2e-2, err


def test_int8_activations_threads(ops_lib):
    case = make_case(12, K=384, N=300, q=(4, 32), lr=(32, 4, 32, 4, 32), sparse=True, bias=True)
    model = build_model_int8(case, ("batch", case["K"]))
    sess1 = runtime.session(model.SerializeToString(), intra_op_num_threads=1)
    sess2 = runtime.session(model.SerializeToString(), intra_op_num_threads=2)
    for M in (1, 4, 129, 300):
        x = np.random.default_rng(M).normal(size=(M, case["K"])).astype(np.float32)
        y1 = sess1.run(None, {"X": x})[0]
        y2 = sess2.run(None, {"X": x})[0]
        assert_close(y1, reference_int8(case, x), rtol=1e-4)
        np.testing.assert_array_equal(y1, y2)


def test_int8_attribute_is_checked(ops_lib):
    case = make_case(5, K=64, N=16, q=(4, 32))
    model = build_model_int8(case, (2, 64))
    model.graph.node[0].attribute[-1].i = 2
    with pytest.raises(Exception, match="act_int8"):
        run_model(model, np.ones((2, 64), dtype=np.float32))


def test_int8_activations_weights_as_inputs(ops_lib):
    """Weights fed at run time (not constant) are decoded at every call."""
    case = make_case(13, K=96, N=40, q=(4, 32), lr=(16, 2, 16, 4, 32), bias=True)
    x = np.random.default_rng(3).normal(size=(9, 96)).astype(np.float32)
    model = build_model_int8(case, x.shape)
    feeds = {"X": x}
    for name in ("Q_B", "L_B", "R_scales"):
        init = next(i for i in model.graph.initializer if i.name == name)
        arr = numpy_helper.to_array(init)
        model.graph.initializer.remove(init)
        model.graph.input.append(helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
        feeds[name] = arr
    sess = runtime.session(model.SerializeToString())
    y = sess.run(None, feeds)[0]
    assert_close(y, reference_int8(case, x), rtol=1e-4)
