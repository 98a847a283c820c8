"""``python -m benchmarks.gpu``: the CUDA kernel of ``QsdMatMul`` against a dense fp16 MatMul
and ONNX Runtime's 4-bit ``MatMulNBits``, on the CUDA execution provider.

Each case is a chain of layers (so that one ``Run`` streams far more weight bytes than the GPU's
L2 cache holds and ONNX Runtime's per-run overhead is shared by many layers), at M = 1, 4, 16
and 128 rows. All variants compute the same weights: the dense fp16 model holds the
dequantized codes, ``MatMulNBits`` and ``QsdMatMul`` the same packed 4-bit codes (``QsdMatMul``
also at 2 bits, and 2 bits plus a rank-64 correction with 4-bit factors). Inputs and outputs stay
on the GPU (I/O binding); variants are timed interleaved and the median is kept.

Achieved bandwidth is the weight bytes of one run over its time, next to the device's measured
copy bandwidth (bytes read plus written by a large device-to-device copy). Needs
``onnxruntime-gpu`` and the custom-op library built with CUDA (``qsdonnx build-ops --cuda``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

CHAINS = {
    "8192→8192 ×8": [(8192, 8192)] * 8,
    "4096↔14336 ×8": [(4096, 14336), (14336, 4096)] * 4,
}
ROWS = (1, 4, 16, 128)
COMPARED = ("MatMulNBits 4-bit (fp16 X)", "QsdMatMul 4-bit")  # same codes as the fp16 model
BLOCK = 32
RANK = 64


class PackedLayer:
    """Random block-quantized (K, N) weights in MatMulNBits' layout, scaled so a chain of them
    keeps activations near unit size."""

    def __init__(self, rng, K: int, N: int, bits: int, block: int = BLOCK):
        self.K, self.N, self.bits, self.block = K, N, bits, block
        kb = -(-K // block)
        per = 8 // bits
        self.codes = rng.integers(0, 256, size=(N, kb, block // per), dtype=np.uint8)
        mid = 1 << (bits - 1)
        zp = rng.integers(mid - 1, mid + 1, size=(N, kb)).astype(np.uint8)
        self.zp_values = zp
        zbytes = -(-kb * bits // 8)
        zpad = np.zeros((N, zbytes * per), np.uint8)
        zpad[:, :kb] = zp
        zpk = np.zeros((N, zbytes), np.uint8)
        for i in range(per):
            zpk |= (zpad[:, i::per] << (i * bits)).astype(np.uint8)
        self.zp = zpk
        spread = np.sqrt((4.0 ** bits - 1) / 12.0)
        self.scales = (rng.uniform(0.5, 1.5, size=(N, kb)) / (spread * np.sqrt(K))).astype(np.float16)

    def dense(self) -> np.ndarray:
        """Dequantized (K, N) float32."""
        per = 8 // self.bits
        mask = (1 << self.bits) - 1
        u = np.stack([(self.codes >> (i * self.bits)) & mask for i in range(per)], axis=-1)
        u = u.reshape(self.N, -1, self.block).astype(np.float32)
        w = (u - self.zp_values[:, :, None]) * self.scales.astype(np.float32)[:, :, None]
        return np.ascontiguousarray(w.reshape(self.N, -1)[:, : self.K].T)

    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zp.nbytes


def _model(nodes, inits, x_type, K0, N_last, domains):
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("X", x_type, ["m", K0])],
                          [helper.make_tensor_value_info("Y", x_type, ["m", N_last])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]
                          + [helper.make_opsetid(d, 1) for d in domains])
    m.ir_version = 10
    return m


def _names(i, n):
    return ("X" if i == 0 else f"h{i}", "Y" if i == n - 1 else f"h{i + 1}")


def dense_model(layers):
    nodes, inits = [], []
    for i, lay in enumerate(layers):
        x, y = _names(i, len(layers))
        inits.append(numpy_helper.from_array(lay.dense().astype(np.float16), f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [y]))
    return _model(nodes, inits, TensorProto.FLOAT16, layers[0].K, layers[-1].N, [])


def nbits_model(layers):
    nodes, inits = [], []
    for i, lay in enumerate(layers):
        x, y = _names(i, len(layers))
        inits += [numpy_helper.from_array(lay.codes, f"B{i}"),
                  numpy_helper.from_array(lay.scales.reshape(-1), f"s{i}"),
                  numpy_helper.from_array(lay.zp, f"z{i}")]
        nodes.append(helper.make_node("MatMulNBits", [x, f"B{i}", f"s{i}", f"z{i}"], [y],
                                      domain="com.microsoft", K=lay.K, N=lay.N, bits=lay.bits,
                                      block_size=lay.block, accuracy_level=0))
    return _model(nodes, inits, TensorProto.FLOAT16, layers[0].K, layers[-1].N, ["com.microsoft"])


def fused_model(layers, factors=None):
    """``QsdMatMul`` chain; ``factors[i] = (L, R)`` adds ``deq(L)·deq(R)`` to layer i."""
    from qsdonnx.runtime import DOMAIN, OP_NAME

    nodes, inits = [], []
    for i, lay in enumerate(layers):
        x, y = _names(i, len(layers))
        names = [x, f"B{i}", f"s{i}", f"z{i}"]
        inits += [numpy_helper.from_array(lay.codes, f"B{i}"),
                  numpy_helper.from_array(lay.scales.reshape(-1), f"s{i}"),
                  numpy_helper.from_array(lay.zp, f"z{i}")]
        attrs = dict(K=lay.K, N=lay.N, q_bits=lay.bits, q_block=lay.block, rank=0, l_bits=0,
                     l_block=0, r_bits=0, r_block=0, has_sparse=0, has_bias=0)
        if factors is not None:
            L, R = factors[i]
            for key, f in (("L", L), ("R", R)):
                inits += [numpy_helper.from_array(f.codes, f"{key}B{i}"),
                          numpy_helper.from_array(f.scales.reshape(-1), f"{key}s{i}"),
                          numpy_helper.from_array(f.zp, f"{key}z{i}")]
                names += [f"{key}B{i}", f"{key}s{i}", f"{key}z{i}"]
                attrs[f"{key.lower()}_bits"] = f.bits
                attrs[f"{key.lower()}_block"] = f.block
            attrs["rank"] = L.N
        nodes.append(helper.make_node(OP_NAME, names, [y], domain=DOMAIN, **attrs))
    return _model(nodes, inits, TensorProto.FLOAT, layers[0].K, layers[-1].N, [DOMAIN])


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy (torch)."""
    import torch

    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() * 4 / statistics.median(times)


class Runner:
    def __init__(self, model, x_dtype):
        import onnxruntime as ort

        from qsdonnx import runtime

        self.ort = ort
        self.sess = runtime.session(model.SerializeToString(),
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        if self.sess.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError("the CUDA execution provider did not load")
        self.x_dtype = x_dtype

    def bind(self, x: np.ndarray):
        self.io = self.sess.io_binding()
        self.x = self.ort.OrtValue.ortvalue_from_numpy(x.astype(self.x_dtype), "cuda", 0)
        self.io.bind_ortvalue_input("X", self.x)
        self.io.bind_output("Y", "cuda")

    def run(self) -> float:
        t = time.perf_counter()
        self.sess.run_with_iobinding(self.io)
        return time.perf_counter() - t

    def output(self) -> np.ndarray:
        return self.io.copy_outputs_to_cpu()[0].astype(np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--chains", default=",".join(CHAINS), help="which chains to run")
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="values of M")
    ap.add_argument("--variants", default="", help="run only variants whose name contains this")
    args = ap.parse_args(argv)
    rows = tuple(int(r) for r in args.rows.split(","))
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("error: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)", file=sys.stderr)
        return 2
    import torch

    from qsdonnx.buildops import find_ops_library

    if find_ops_library() is None:
        print("error: custom-op library not built (run `qsdonnx build-ops --cuda`)", file=sys.stderr)
        return 2
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name(0)
    print(f"{dev}; onnxruntime {ort.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write); "
          f"median of {args.runs} interleaved runs; blocks of {BLOCK}; {time.strftime('%Y-%m-%d')}\n")
    print("| chain | variant | weight MB | M=" + " | M=".join(map(str, rows)) + " | rel. diff vs fp16 |")
    print("|---|---|---|" + "---|" * len(rows) + "---|")
    rng = np.random.default_rng(0)
    for cname in [c.strip() for c in args.chains.split(",") if c.strip()]:
        shapes = CHAINS[cname]
        q4 = [PackedLayer(rng, K, N, 4) for K, N in shapes]
        q2 = [PackedLayer(rng, K, N, 2) for K, N in shapes]
        lr = [(PackedLayer(rng, K, RANK, 4), PackedLayer(rng, RANK, N, 4)) for K, N in shapes]
        variants = {
            "fp16 MatMul": (lambda: dense_model(q4), np.float16, sum(K * N * 2 for K, N in shapes)),
            "MatMulNBits 4-bit (fp16 X)": (lambda: nbits_model(q4), np.float16, sum(l.nbytes() for l in q4)),
            "QsdMatMul 4-bit": (lambda: fused_model(q4), np.float32, sum(l.nbytes() for l in q4)),
            "QsdMatMul 2-bit": (lambda: fused_model(q2), np.float32, sum(l.nbytes() for l in q2)),
            f"QsdMatMul 2-bit + rank {RANK}": (
                lambda: fused_model(q2, lr), np.float32,
                sum(l.nbytes() for l in q2) + sum(a.nbytes() + b.nbytes() for a, b in lr)),
        }
        variants = {k: v for k, v in variants.items()
                    if k == "fp16 MatMul" or args.variants in k}
        runners = {k: Runner(build(), dt) for k, (build, dt, _) in variants.items()}
        results = {k: {} for k in runners}
        diffs = {k: 0.0 for k in COMPARED if k in runners}
        for M in rows:
            x = rng.normal(size=(M, shapes[0][0])).astype(np.float32)
            for r in runners.values():
                r.bind(x)
                for _ in range(3):
                    r.run()
            ref = runners["fp16 MatMul"].output()
            for k in diffs:
                d = np.linalg.norm(runners[k].output() - ref) / np.linalg.norm(ref)
                diffs[k] = max(diffs[k], float(d))
            times = {k: [] for k in runners}
            for _ in range(args.runs):
                for k, r in runners.items():
                    times[k].append(r.run())
            for k in runners:
                results[k][M] = statistics.median(times[k])
        for k, (_, _, nbytes) in variants.items():
            cells = []
            for M in rows:
                t = results[k][M]
                cells.append(f"{t * 1e6:.0f} µs, {nbytes / t / 1e12:.2f} TB/s ({nbytes / t / bw:.0%})")
            d = f"{diffs[k]:.1e}" if k in diffs else ""
            print(f"| {cname} | {k} | {nbytes / 1e6:.0f} | " + " | ".join(cells) + f" | {d} |")
        del runners
    return 0


if __name__ == "__main__":
    sys.exit(main())
