"""``python -m benchmarks.scale``: models too large for one protobuf, compressed in bounded memory.

Builds synthetic models whose weights are generated in chunks straight into one external-data
file (never held in memory as a whole):

* ``mlp6``: 6 blocks ``x -> MatMul(4096x14336) -> Relu -> MatMul(14336x4096) -> Add``, float32
  (12 weights, 2.63 GiB), opset 17;
* ``mlp12``: the same with 12 blocks (5.25 GiB), to show that peak memory does not grow with
  the number of layers;
* ``llama7b`` (with ``--7b``): 32 blocks of LLaMA-7B's shapes (4096x4096 x4, 4096x11008 x2,
  11008x4096) with RMS norms before the projections and before the gated feed-forward part,
  float16, 12.06 GiB.

For each model it runs, as separate processes, ``qsdonnx optimize --method rtn --bits 4
--no-validate`` (with its default of one worker thread per core, and with ``--jobs 1``), on
``mlp6`` also ``--method gptq --calib`` with 128 random input vectors, and
ONNX Runtime's ``MatMulNBitsQuantizer`` (4 bits, block 32, saved with external data; on the
7B-shaped model only with ``--peer-7b``, as it loads the whole model), and prints wall time,
peak RSS (the process's own, imports included, and that of all its processes together),
output size, and the relative error of both outputs against the original on one input (the
compressed model run in ONNX Runtime; the original computed in float32 one weight at a time,
which ONNX Runtime cannot do within this machine's memory for the 7B-shaped model). The
float16 model is written in the MatMulNBits format (``--format nbits``): ONNX Runtime runs
its QDQ form only by holding the weights in float32. With ``--7b`` it also times GPTQ on one weight of each of that model's shapes
and prints the projected time for all of them. Options: ``--models mlp6,mlp12``, ``--7b``,
``--work DIR`` (default: a temporary folder, removed at the end unless ``--keep``),
``--skip-peer``, ``--peer-7b``, ``--skip-gptq-projection``, ``--skip-gptq-calib``, ``--json FILE``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .metrics import measured_process

MODELS = {
    "mlp6": {"blocks": 6, "shapes": [(4096, 14336), (14336, 4096)], "dtype": np.float32, "relu": True},
    "mlp12": {"blocks": 12, "shapes": [(4096, 14336), (14336, 4096)], "dtype": np.float32, "relu": True},
    "llama7b": {"blocks": 32, "shapes": [(4096, 4096)] * 4 + [(4096, 11008), (4096, 11008), (11008, 4096)],
                "dtype": np.float16, "relu": False},
}
CHUNK_ROWS = 512
GPTQ_MODELS = ("mlp6",)  # GPTQ with calibration data: on the smaller model only (it takes minutes)
CALIB_SAMPLES = 128


def _write_weight(fh, rows: int, cols: int, dtype, seed: int) -> tuple[int, int]:
    """Appends a ``rows x cols`` weight (normal, scaled by 1/sqrt(rows)) in chunks; (offset, length)."""
    offset = fh.tell()
    rng = np.random.default_rng(seed)
    for r in range(0, rows, CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows - r)
        fh.write((rng.standard_normal((n, cols), dtype=np.float32) / np.sqrt(rows)).astype(dtype).tobytes())
    return offset, fh.tell() - offset


def _rms_norm(x: str, out: str, elem: int) -> list:
    """``out = x / sqrt(mean(x², last axis) + 1e-5)`` (opset 17)."""
    eps = helper.make_node("Constant", [], [f"{out}.eps"], value=helper.make_tensor(f"{out}.epsv", elem, [], [1e-5]))
    return [eps, helper.make_node("Mul", [x, x], [f"{out}.sq"]),
            helper.make_node("ReduceMean", [f"{out}.sq"], [f"{out}.ms"], axes=[-1], keepdims=1),
            helper.make_node("Add", [f"{out}.ms", f"{out}.eps"], [f"{out}.mse"]),
            helper.make_node("Sqrt", [f"{out}.mse"], [f"{out}.rms"]),
            helper.make_node("Div", [x, f"{out}.rms"], [out])]


def build(name: str, work: Path) -> Path:
    """The model file (and ``<name>.data``) in ``work``; built once."""
    spec = MODELS[name]
    path = work / f"{name}.onnx"
    if path.exists():
        return path
    dtype = spec["dtype"]
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    data_name = f"{name}.data"
    nodes, inits, x, seed = [], [], "x", 0
    with open(work / data_name, "wb") as fh:
        for b in range(spec["blocks"]):
            h = x
            shapes = spec["shapes"]
            # LLaMA: q, k, v, o projections (summed here), then gate/up and down.
            for j, (rows, cols) in enumerate(shapes):
                wname = f"b{b}.w{j}"
                offset, length = _write_weight(fh, rows, cols, dtype, seed)
                seed += 1
                t = TensorProto()
                t.name, t.data_type = wname, elem
                t.dims.extend([rows, cols])
                t.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                inits.append(t)
            if name.startswith("mlp"):
                nodes += [helper.make_node("MatMul", [x, "b%d.w0" % b], [f"b{b}.h"]),
                          helper.make_node("Relu", [f"b{b}.h"], [f"b{b}.r"]),
                          helper.make_node("MatMul", [f"b{b}.r", "b%d.w1" % b], [f"b{b}.o"]),
                          helper.make_node("Add", [x, f"b{b}.o"], [f"b{b}.y"])]
            else:
                # RMS norms before both halves, as in LLaMA (without them the residual stream
                # overflows float16 within a few blocks).
                nodes += _rms_norm(x, f"b{b}.n0", elem)
                xn = f"b{b}.n0"
                attn = [f"b{b}.p{j}" for j in range(4)]
                for j in range(3):
                    nodes.append(helper.make_node("MatMul", [xn, f"b{b}.w{j}"], [attn[j]]))
                nodes += [helper.make_node("Add", [attn[0], attn[1]], [f"b{b}.qk"]),
                          helper.make_node("Add", [f"b{b}.qk", attn[2]], [f"b{b}.qkv"]),
                          helper.make_node("MatMul", [f"b{b}.qkv", f"b{b}.w3"], [attn[3]]),
                          helper.make_node("Add", [x, attn[3]], [f"b{b}.a"])]
                nodes += _rms_norm(f"b{b}.a", f"b{b}.n1", elem)
                nodes += [helper.make_node("MatMul", [f"b{b}.n1", f"b{b}.w4"], [f"b{b}.g"]),
                          helper.make_node("MatMul", [f"b{b}.n1", f"b{b}.w5"], [f"b{b}.u"]),
                          helper.make_node("Sigmoid", [f"b{b}.g"], [f"b{b}.gs"]),
                          helper.make_node("Mul", [f"b{b}.g", f"b{b}.gs"], [f"b{b}.silu"]),
                          helper.make_node("Mul", [f"b{b}.silu", f"b{b}.u"], [f"b{b}.m"]),
                          helper.make_node("MatMul", [f"b{b}.m", f"b{b}.w6"], [f"b{b}.d"]),
                          helper.make_node("Add", [f"b{b}.a", f"b{b}.d"], [f"b{b}.y"])]
            x = f"b{b}.y"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", elem, ["batch", 4096])],
                              [helper.make_tensor_value_info("y", elem, ["batch", 4096])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qsdonnx-bench")
    model.ir_version = 8
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())
    return path


PEER = """import sys, onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
m = onnx.load(sys.argv[1])
q = MatMulNBitsQuantizer(m, bits=4, block_size=32, is_symmetric=True)
q.process()
q.model.save_model_to_file(sys.argv[2], use_external_data_format=True)
"""


def output_size(path: Path) -> int:
    """Bytes of a model file and the external data files it names."""
    import onnx

    from qsdonnx.store import external_info, is_external

    m = onnx.load(str(path), load_external_data=False)
    files = {external_info(t)["location"] for t in m.graph.initializer if is_external(t)}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def reference(src: Path, x: np.ndarray) -> np.ndarray:
    """The original model's output for ``x``, computed here in float32 one weight at a time
    (ONNX Runtime would hold every weight, in float32 for a float16 model: more than this
    machine's memory for the 7B-shaped one). The graph is the one :func:`build` makes."""
    from qsdonnx.store import tensor_array

    m = onnx.load(str(src), load_external_data=False)
    weights = {t.name: t for t in m.graph.initializer}
    w = lambda name: tensor_array(weights[name], src.parent).astype(np.float32)
    h = x.astype(np.float32)
    blocks = MODELS[src.stem]["blocks"]
    for b in range(blocks):
        if src.stem.startswith("mlp"):
            h = h + np.maximum(h @ w(f"b{b}.w0"), 0) @ w(f"b{b}.w1")
        else:
            n = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + 1e-5)
            qkv = n @ w(f"b{b}.w0") + n @ w(f"b{b}.w1") + n @ w(f"b{b}.w2")
            a = h + qkv @ w(f"b{b}.w3")
            n = a / np.sqrt(np.mean(a * a, axis=-1, keepdims=True) + 1e-5)
            g, u = n @ w(f"b{b}.w4"), n @ w(f"b{b}.w5")
            h = a + (g / (1 + np.exp(-g)) * u) @ w(f"b{b}.w6")
    return h


def rel_error(ref: np.ndarray, x: np.ndarray, out: Path) -> float:
    from qsdonnx.runtime import session

    sess = session(str(out))
    got = sess.run(None, {"x": x})[0].astype(np.float64)
    del sess
    return float(np.linalg.norm(ref - got) / np.linalg.norm(ref))


def gptq_projection(name: str, rows: int = 512) -> dict:
    """Seconds of GPTQ (4 bits, the default block, ``H`` from ``rows`` random input rows) on one
    weight of each distinct shape of ``name``, and the whole model's projected time: the sum
    over its weights of their shape's time (calibration runs not counted)."""
    import time
    from collections import Counter

    from qsdonnx.config import OptimizeConfig
    from qsdonnx.factorize.gptq import gptq_factorize
    from qsdonnx.passes.factorize import GPTQ_DAMP

    spec = MODELS[name]
    counts = Counter(spec["shapes"])
    block = OptimizeConfig().block_size
    rng = np.random.default_rng(0)
    per_shape = {}
    for (K, N) in counts:
        W = (rng.standard_normal((K, N), dtype=np.float32) / np.sqrt(K))
        X = rng.standard_normal((rows, K), dtype=np.float32)
        H = X.T @ X / rows
        t = time.perf_counter()
        gptq_factorize(W, H, 4, block, damp=GPTQ_DAMP, act_order=True)
        per_shape[f"{K}x{N}"] = time.perf_counter() - t
        del W, X, H
    total = spec["blocks"] * sum(c * per_shape[f"{K}x{N}"] for (K, N), c in counts.items())
    return {"per_shape_s": per_shape, "projected_s": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp6,mlp12")
    ap.add_argument("--7b", dest="big", action="store_true", help="also the LLaMA-7B-shaped float16 model")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--skip-gptq-projection", action="store_true")
    ap.add_argument("--skip-gptq-calib", action="store_true", help="no GPTQ run with calibration data")
    # ONNX Runtime's quantizer loads the whole model (6.6 GiB for mlp12's 5.25 GiB): on the
    # 12 GiB float16 model it would need more memory than a 24 GB machine has to spare.
    ap.add_argument("--peer-7b", action="store_true", help="also run ONNX Runtime's quantizer on the 7B-shaped model")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n] + (["llama7b"] if args.big else [])
    work = args.work or Path(tempfile.mkdtemp(prefix="qsdonnx-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in names:
            src = build(name, work)
            size = output_size(src)
            dtype = MODELS[name]["dtype"]
            x = np.random.default_rng(0).standard_normal((1, 4096)).astype(dtype)
            ref = reference(src, x)
            out = work / f"{name}.qsd.onnx"
            # The float16 model as ONNX Runtime's CPU users run it: MatMulNBits (its QDQ form
            # loads, but ONNX Runtime then holds the weights in float32).
            fmt = ["--format", "nbits"] if dtype == np.float16 else []
            row = {"model": name, "input_gib": size / 2**30, "format": "nbits" if fmt else "qdq"}
            runs = [("qsdonnx", ["--method", "rtn"]), ("qsdonnx_jobs1", ["--method", "rtn", "--jobs", "1"])]
            if name in GPTQ_MODELS and not args.skip_gptq_calib:
                calib = work / f"{name}.calib.npz"
                g = np.random.default_rng(1)
                np.savez(calib, x=g.standard_normal((CALIB_SAMPLES, 4096)).astype(dtype))
                runs.append(("qsdonnx_gptq", ["--method", "gptq", "--calib", str(calib)]))
            for tool, extra in runs:
                q = measured_process("qsdonnx.cli", ["optimize", str(src), "-o", str(out), "--bits",
                                                     "4", "--no-validate", "--quiet", *fmt, *extra], work / f"{name}.qsd.log")
                if q["rc"] == 0:
                    q.update(output_mib=output_size(out) / 2**20, rel_error=rel_error(ref, x, out))
                    for p in work.glob(out.name + "*"):
                        p.unlink()
                row[tool] = q
            if not args.skip_peer and (name != "llama7b" or args.peer_7b):
                peer_out = work / f"{name}.ort.onnx"
                script = work / "ort_nbits.py"
                script.write_text(PEER)
                p = measured_process(str(script), [str(src), str(peer_out)], work / f"{name}.ort.log")
                if p["rc"] == 0:
                    p.update(output_mib=output_size(peer_out) / 2**20, rel_error=rel_error(ref, x, peer_out))
                    for f in work.glob(peer_out.name + "*"):
                        f.unlink()
                row["ort_nbits"] = p
            rows.append(row)
            print(f"{name}: done", file=sys.stderr, flush=True)
            if args.json:  # (kept as it goes: a long run that stops early keeps what it measured)
                args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| model | input | tool | exit | wall time | peak RSS | peak RSS, all processes | output | rel. error (1 input) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    labels = {"qsdonnx": "qsdonnx rtn 4-bit", "qsdonnx_jobs1": "qsdonnx rtn 4-bit `--jobs 1`",
              "qsdonnx_gptq": f"qsdonnx gptq 4-bit `--calib` ({CALIB_SAMPLES} samples)",
              "ort_nbits": "ORT MatMulNBitsQuantizer 4-bit"}
    for r in rows:
        for tool, label in labels.items():
            c = r.get(tool)
            if c is None:
                continue
            ok = c["rc"] == 0
            size = f"{c['output_mib']:.0f} MiB" if ok else "-"
            err = f"{c['rel_error']:.4f}" if ok else (c["output"].strip().splitlines() or ["?"])[-1][:80]
            if tool != "ort_nbits" and r.get("format") == "nbits":
                label += " `--format nbits`"
            print(f"| {r['model']} | {r['input_gib']:.2f} GiB | {label} | {c['rc']} | {c['seconds']:.0f} s | "
                  f"{c['rss_mib'] / 1024:.2f} GiB | {c['tree_rss_mib'] / 1024:.2f} GiB | {size} | {err} |")
    projection = None
    if args.big and not args.skip_gptq_projection:
        projection = gptq_projection("llama7b")
        shapes = ", ".join(f"{k}: {v:.1f} s" for k, v in projection["per_shape_s"].items())
        print(f"\nllama7b, GPTQ 4-bit projected from one weight of each shape ({shapes}): "
              f"{projection['projected_s'] / 60:.0f} min for its {MODELS['llama7b']['blocks'] * len(MODELS['llama7b']['shapes'])} weights "
              "(factorization only, one process)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "gptq_projection": projection}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
