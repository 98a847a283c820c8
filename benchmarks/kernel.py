"""``python -m benchmarks.kernel``: the fused ``QsdMatMul`` CPU kernel per instruction set.

One ``QsdMatMul`` of MiniLM's shapes (384 → 1536 and 1536 → 384) with 4-bit codes in blocks of
32, at M = 1, 8 and 128 rows, float and int8 activations, timed in one process per
instruction set (``QSDONNX_CPU_ISA`` caps the kernel's choice) next to ONNX Runtime's fp32
``MatMul`` of the same shape. Prints a markdown table of medians and their ratio to fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ((384, 1536), (1536, 384))
ROWS = (1, 8, 128)

_WORKER = r"""
import json, sys, time
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
sys.path.insert(0, {root!r})
from qsdonnx import runtime
from qsdonnx.factorize.packing import to_matmulnbits
from qsdonnx.factorize.rtn import rtn_factorize
from qsdonnx.runtime import DOMAIN, OP_NAME, OP_VERSION

def fused_model(W, act_int8):
    q = rtn_factorize(W, 4, block_size=32, symmetric=False).q
    K, N = W.shape
    codes, scales, zp = to_matmulnbits(q)
    inits = [numpy_helper.from_array(codes, "qc"),
             numpy_helper.from_array(scales.astype(np.float16), "qs"),
             numpy_helper.from_array(zp, "qz")]
    node = helper.make_node(OP_NAME, ["X", "qc", "qs", "qz"], ["Y"], domain=DOMAIN, K=K, N=N,
                            q_bits=4, q_block=32, rank=0, l_bits=0, l_block=0, r_bits=0, r_block=0,
                            has_sparse=0, has_bias=0, act_int8=act_int8)
    g = helper.make_graph([node], "k", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OP_VERSION)])
    m.ir_version = 9
    return m

def fp32_model(W):
    K, N = W.shape
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "k",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", N])],
                          [numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    return m

out = []
rng = np.random.default_rng(0)
for K, N in {shapes!r}:
    W = rng.normal(size=(K, N)).astype(np.float32)
    sessions = {{"fp32": runtime.session(fp32_model(W), intra_op_num_threads={threads}),
                "float": runtime.session(fused_model(W, 0), intra_op_num_threads={threads}),
                "int8": runtime.session(fused_model(W, 1), intra_op_num_threads={threads})}}
    for M in {rows!r}:
        x = rng.normal(size=(M, K)).astype(np.float32)
        times = {{k: [] for k in sessions}}
        for _ in range(3):
            for s in sessions.values():
                s.run(None, {{"X": x}})
        for _ in range({runs}):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {{"X": x}})
                times[k].append(time.perf_counter() - t)
        out.append({{"K": K, "N": N, "M": M, **{{k: float(np.median(v)) for k, v in times.items()}}}})
print(json.dumps(out))
"""


def run_isa(isa: str, threads: int, runs: int) -> list[dict]:
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    if isa != "best":
        env["QSDONNX_CPU_ISA"] = isa
    code = _WORKER.format(root=root, shapes=SHAPES, rows=ROWS, threads=threads, runs=runs)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "worker failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_flags() -> str:
    try:
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    have = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return " ".join(have) or "none of avx2/avx512"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", default="base,avx2,best",
                    help="instruction sets to cap the kernel at (best: what the CPU has)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args(argv)
    from qsdonnx.buildops import find_ops_library

    if find_ops_library() is None:
        print("error: custom-op library not built (run `qsdonnx build-ops`)", file=sys.stderr)
        return 2
    print(f"QsdMatMul, 4-bit codes, blocks of 32; {args.threads} thread(s); median of {args.runs} runs; "
          f"CPU flags: {cpu_flags()}; {time.strftime('%Y-%m-%d')}\n")
    print("| K → N | M | fp32 MatMul µs | ISA | fused float µs (×fp32) | fused int8 µs (×fp32) |")
    print("|---|---|---|---|---|---|")
    for isa in [s.strip() for s in args.isas.split(",") if s.strip()]:
        for r in run_isa(isa, args.threads, args.runs):
            f = r["fp32"]
            print(f"| {r['K']} → {r['N']} | {r['M']} | {f * 1e6:.0f} | {isa} | "
                  f"{r['float'] * 1e6:.0f} ({r['float'] / f:.2f}×) | {r['int8'] * 1e6:.0f} ({r['int8'] / f:.2f}×) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
