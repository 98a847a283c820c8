"""Smoke test of the benchmark harness: ``python -m benchmarks.run --quick`` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
@pytest.mark.slow
def test_quick_benchmark_writes_json_tables_and_plots(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    results = json.loads((out / "results.json").read_text())
    for model in results["models"]:
        assert (out / f"{model}.md").is_file()
        assert (out / f"{model}.png").stat().st_size > 1000
    assert "minilm" in results["models"]
    assert results["machine"]["cpus"] >= 1 and "--quick --out " + str(out) in results["command"]

    rows = {r["name"]: r for r in results["models"]["minilm"]["variants"]}
    fp32 = rows["fp32"]
    assert fp32["status"] == "ok" and fp32["metrics"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert fp32["rel_err"] == 0.0

    peer = rows["ort-nbits 4b b32"]
    assert peer["family"] == "peer"
    if peer["status"] == "ok":
        # 4-bit codes + fp32 scale + 4-bit zero point per 32 weights
        assert peer["bpw"] == pytest.approx(4 + 32 / 32 + 4 / 32, abs=1e-6)
        assert peer["metrics"]["mean_cosine"] > 0.9
    else:
        assert peer["note"], "a peer that did not run must say why"

    rtn = rows["qsdonnx rtn 4b"]
    assert rtn["status"] == "ok", rtn.get("note")
    assert rtn["bpw"] == pytest.approx(4.5, abs=0.3)
    assert rtn["metrics"]["mean_cosine"] > 0.9
    assert rtn["file_bytes"] < 0.3 * fp32["file_bytes"]

    gptq = rows["qsdonnx gptq 3.0bpw"]
    assert gptq["status"] == "ok" or gptq["note"], "a failed variant must keep its error"

    table = (out / "minilm.md").read_text()
    assert "| fp32 |" in table and "| qsdonnx rtn 4b |" in table and "| ort-nbits 4b b32 |" in table
    assert "## minilm" in proc.stdout


@pytest.mark.skipif(__import__("qsdonnx.buildops", fromlist=["x"]).find_ops_library() is None,
                    reason="custom-op library not built")
def test_kernel_benchmark_prints_a_table(capsys):
    from benchmarks import kernel

    assert kernel.main(["--runs", "2", "--isas", "base,best"]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| 384") or l.startswith("| 1536")]
    assert len(rows) == 2 * len(kernel.SHAPES) * len(kernel.ROWS)
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[2]) > 0 and "×" in cells[4] and "×" in cells[5]


@pytest.mark.skipif(__import__("qsdonnx.buildops", fromlist=["x"]).find_ops_library() is None,
                    reason="custom-op library not built")
def test_gpu_benchmark_models_compute_the_same_weights():
    """The GPU benchmark's three model kinds hold the same weights: on the CPU, the fused chain
    matches a float64 product of the dequantized layers, MatMulNBits and fp16 MatMul match it to
    fp16 rounding, and the low-rank variant adds exactly deq(L)·deq(R)."""
    import numpy as np

    from benchmarks import gpu
    from qsdonnx import runtime

    rng = np.random.default_rng(3)
    shapes = [(256, 512), (512, 256)]
    q4 = [gpu.PackedLayer(rng, K, N, 4) for K, N in shapes]
    q2 = [gpu.PackedLayer(rng, K, N, 2) for K, N in shapes]
    lr = [(gpu.PackedLayer(rng, K, 64, 4), gpu.PackedLayer(rng, 64, N, 4)) for K, N in shapes]
    x = rng.normal(size=(3, 256)).astype(np.float32)

    def rel(y, ref):
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    ref = x.astype(np.float64)
    for lay in q4:
        ref = ref @ lay.dense().astype(np.float64)
    # the chain keeps activations near unit size, so no layer over- or underflows fp16
    assert 0.3 < np.linalg.norm(ref) / np.linalg.norm(x) < 3
    assert rel(runtime.session(gpu.fused_model(q4)).run(None, {"X": x})[0], ref) < 1e-5
    x16 = x.astype(np.float16)
    assert rel(runtime.session(gpu.nbits_model(q4)).run(None, {"X": x16})[0], ref) < 3e-3
    assert rel(runtime.session(gpu.dense_model(q4)).run(None, {"X": x16})[0], ref) < 3e-3

    ref = x.astype(np.float64)
    for lay, (a, b) in zip(q2, lr):
        ref = ref @ (lay.dense().astype(np.float64) + a.dense().astype(np.float64) @ b.dense())
    assert rel(runtime.session(gpu.fused_model(q2, lr)).run(None, {"X": x})[0], ref) < 1e-5
    assert sum(l.nbytes() for l in q4) == sum(K * N // 2 + K * N // 32 * 2 + N * (K // 32 // 2)
                                               for K, N in shapes)


def test_gpu_benchmark_without_cuda_says_so(capsys):
    import onnxruntime as ort

    from benchmarks import gpu

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    assert gpu.main(["--runs", "1"]) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err
