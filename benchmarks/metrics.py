"""Task metrics, output error, latency and peak memory of ONNX models in ONNX Runtime (CPU).

Sessions are made with ``qsdonnx.runtime.session_options`` (custom-op library registered for
``fused`` models, float activations in ORT's QDQ→MatMulNBits fusion) with thread spinning turned
off, so that the idle thread pools of the other sessions measured in the same process do not
compete with the one being timed.

``python -m benchmarks.metrics MODEL FEEDS.npz --threads T --runs R`` loads one model, runs it
``R`` times on the feeds and prints its own peak RSS as JSON; :func:`peak_rss` calls it in a
fresh process per model.
"""
from __future__ import annotations

import abc

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

SEQ_LEN = 128


# --------------------------------------------------------------------------- sessions


ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"


def ops_library_for(path: Path | str) -> Optional[str]:
    """The qsdonnx custom-op library if the model uses the qsdonnx domain, else None
    (RuntimeError if it does and the library is not built)."""
    import onnx
    from qsdonnx.buildops import find_ops_library
    from qsdonnx.runtime import model_uses_custom_ops

    if not model_uses_custom_ops(onnx.load(str(path), load_external_data=False)):
        return None
    lib = find_ops_library()
    if lib is None:
        raise RuntimeError("model uses the qsdonnx custom ops but the library is not built")
    return str(lib)


def make_session(path: Path | str, threads: int, ops_lib: Optional[str] = None,
                 opt_level: Optional[str] = None):
    """An ONNX Runtime CPU session for a model file with ``threads`` intra-op threads.

    Same policy as ``qsdonnx.runtime.session`` (float activations in the QDQ→MatMulNBits fusion,
    custom-op library ``ops_lib`` registered), built here without importing qsdonnx so that the
    peak-memory processes carry no torch import; spinning is off (see the module docstring).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry(ACCURACY_LEVEL_KEY, "0")
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if opt_level is not None:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opt_level)
    if ops_lib:
        so.register_custom_ops_library(str(ops_lib))
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def run_batched(sess, feeds: dict[str, np.ndarray], batch: int = 8) -> list[np.ndarray]:
    """All outputs of ``sess`` on ``feeds``, run ``batch`` samples at a time and concatenated."""
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    n = len(next(iter(feeds.values())))
    parts: list[list[np.ndarray]] = []
    for s in range(0, n, batch):
        parts.append(sess.run(None, {k: v[s:s + batch] for k, v in feeds.items()}))
    return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]


# --------------------------------------------------------------------------- accuracy


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    """‖ref − got‖₂ / ‖ref‖₂ over all elements."""
    a = np.asarray(ref, np.float64).ravel()
    b = np.asarray(got, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def worst_rel_l2(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    """Largest relative L2 error over a model's outputs."""
    return max(rel_l2(r, g) for r, g in zip(ref, got))


class Task(abc.ABC):
    """One model's evaluation: its outputs on the eval data, the task metric and how to show it."""

    name: str
    metric_key: str           # the number plotted against bpw
    metric_label: str
    higher_is_better: bool

    @abc.abstractmethod
    def outputs(self, sess) -> list[np.ndarray]:
        """The model's outputs on the evaluation data."""

    @abc.abstractmethod
    def score(self, ref_outputs: list[np.ndarray], outputs: list[np.ndarray]) -> dict:
        """The task metric of ``outputs`` against the fp32 ``ref_outputs``."""

    @abc.abstractmethod
    def format_metric(self, m: dict, fp32: dict) -> str:
        """One table cell for the metric."""

    @abc.abstractmethod
    def latency_feeds(self) -> dict[str, dict[str, np.ndarray]]:
        """Named input batches for the latency columns."""


class MiniLMTask(Task):
    """all-MiniLM-L6-v2: sentence-embedding cosine to fp32 and nearest-neighbour agreement."""

    name = "minilm"
    metric_key = "mean_cosine"
    metric_label = "mean embedding cosine vs fp32"
    higher_is_better = True

    def __init__(self):
        from models import minilm
        self._m = minilm
        self.feeds = minilm.eval_inputs()
        self.output_index = list(minilm.OUTPUT_NAMES).index("sentence_embedding")

    def outputs(self, sess) -> list[np.ndarray]:
        return run_batched(sess, self.feeds)

    def score(self, ref_outputs, outputs) -> dict:
        i = self.output_index
        return self._m.score(ref_outputs[i], outputs[i])

    def format_metric(self, m: dict, fp32: dict) -> str:
        return f"cos {m['mean_cosine']:.4f} (min {m['min_cosine']:.3f}), NN {100 * m['nn_agreement']:.0f}%"

    def latency_feeds(self) -> dict[str, dict[str, np.ndarray]]:
        ids, mask = self.feeds["input_ids"], self.feeds["attention_mask"]
        return {"b1": tiled_tokens(ids, mask, 1), "b8": tiled_tokens(ids, mask, 8)}


class PPOCRRecTask(Task):
    """PP-OCRv4 recognition: character error rate of greedy CTC decoding on rendered lines."""

    name = "ppocr_rec"
    metric_key = "cer"
    metric_label = "CER (%) on rendered text lines"
    higher_is_better = False

    def __init__(self):
        from models import ppocr
        self._m = ppocr
        self.path = ppocr.rec_path()
        self.feeds = ppocr.rec_eval_inputs(self.path)
        self.texts = ppocr.rec_eval_texts()
        self.charset = ppocr.charset(self.path)

    def outputs(self, sess) -> list[np.ndarray]:
        return run_batched(sess, self.feeds)

    def score(self, ref_outputs, outputs) -> dict:
        got = self._m.score_rec(outputs[0], self.texts, self.charset)
        ref = self._m.score_rec(ref_outputs[0], self.texts, self.charset)
        return {"cer": 100.0 * got["cer"], "exact": got["exact"], "fp32_cer": 100.0 * ref["cer"],
                "agree_with_fp32": float(np.mean(
                    np.array(self._m.ctc_decode(outputs[0], self.charset))
                    == np.array(self._m.ctc_decode(ref_outputs[0], self.charset))))}

    def format_metric(self, m: dict, fp32: dict) -> str:
        return f"CER {m['cer']:.2f}% (fp32 {m['fp32_cer']:.2f}%), exact {100 * m['exact']:.0f}%"

    def latency_feeds(self) -> dict[str, dict[str, np.ndarray]]:
        return {"b8": {k: np.ascontiguousarray(v[:8]) for k, v in self.feeds.items()}}


def tiled_tokens(ids: np.ndarray, mask: np.ndarray, batch: int, seq: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """``batch`` rows of exactly ``seq`` real tokens: each row starts with one evaluation
    sentence and continues with the following ones ([CLS] … [SEP] kept at both ends), so every
    position is attended to (mask all ones)."""
    cls, sep = int(ids[0, 0]), None
    bodies = []
    for row, m in zip(ids, mask):
        toks = row[m.astype(bool)]
        sep = int(toks[-1])
        bodies.append(toks[1:-1])
    out = np.empty((batch, seq), dtype=np.int64)
    for b in range(batch):
        toks, j = [cls], b
        while len(toks) < seq - 1:
            toks.extend(int(t) for t in bodies[j % len(bodies)])
            toks.append(sep)
            j += 1
        toks = toks[:seq - 1] + [sep]
        out[b] = toks
    return {"input_ids": out, "attention_mask": np.ones_like(out)}


TASKS: dict[str, Callable[[], Task]] = {"minilm": MiniLMTask, "ppocr_rec": PPOCRRecTask}


# --------------------------------------------------------------------------- latency


def interleaved_latency(sessions: dict[str, object], feeds: dict[str, np.ndarray], runs: int,
                        warmup: int = 2) -> dict[str, dict]:
    """Median wall time (ms) of ``sess.run`` per variant, measured round-robin.

    Every round runs each variant once, in an order rotated by one position per round, so that
    slow drifts of a shared, noisy machine spread over all variants alike.
    """
    names = list(sessions)
    prepared = {}
    for n in names:
        inputs = {i.name for i in sessions[n].get_inputs()}
        prepared[n] = {k: v for k, v in feeds.items() if k in inputs}
    for n in names:
        for _ in range(warmup):
            sessions[n].run(None, prepared[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            sessions[n].run(None, prepared[n])
            times[n].append(1000.0 * (time.perf_counter() - t))
    return {n: {"median_ms": statistics.median(ts), "min_ms": min(ts), "runs": len(ts),
                "iqr_ms": float(np.subtract(*np.percentile(ts, [75, 25])))} for n, ts in times.items()}


# --------------------------------------------------------------------------- peak memory


def _maxrss_mib() -> float:
    """This process's peak resident set (MiB).

    ``VmHWM`` of ``/proc/self/status`` is the high-water mark of this process's own address
    space; ``ru_maxrss`` is the fallback, though on Linux it also carries the parent's peak
    across fork + exec, which would hide the model's share.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def peak_rss(model: Path | str, feeds_npz: Path | str, threads: int, runs: int = 20,
             ops_lib: Optional[str] = None, timeout: float = 600.0) -> dict:
    """Peak resident memory (MiB) of a fresh process that loads ``model`` and runs it ``runs``
    times; also the process's peak before the session was created (interpreter + imports)."""
    cmd = [sys.executable, "-m", "benchmarks.metrics", str(model), str(feeds_npz),
           "--threads", str(threads), "--runs", str(runs)]
    if ops_lib:
        cmd += ["--ops-lib", str(ops_lib)]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": tail[-1] if tail else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="peak RSS of one ONNX model in ONNX Runtime")
    ap.add_argument("model")
    ap.add_argument("feeds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--ops-lib", default=None, help="custom-op library to register")
    args = ap.parse_args(argv)
    feeds = dict(np.load(args.feeds, allow_pickle=False))
    import onnxruntime  # noqa: F401  (counted in the baseline, not in the model's share)
    baseline = _maxrss_mib()
    sess = make_session(args.model, args.threads, ops_lib=args.ops_lib)
    inputs = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    for _ in range(args.runs):
        sess.run(None, feeds)
    print(json.dumps({"peak_rss_mib": _maxrss_mib(), "baseline_rss_mib": baseline, "runs": args.runs}))


if __name__ == "__main__":
    _rss_main()


# A child process that records its own peak RSS (VmHWM) when it exits: ``ru_maxrss`` of a
# child on Linux starts from the parent's peak, which would hide the child's own figure.
_HWM_WRAPPER = """
import atexit, runpy, sys
def _hwm(path=sys.argv[1]):
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            open(path, 'w').write(line.split()[1])
atexit.register(_hwm)
target, sys.argv = sys.argv[2], sys.argv[2:]
if target.endswith('.py'):
    runpy.run_path(target, run_name='__main__')
else:
    runpy.run_module(target, run_name='__main__', alter_sys=True)
"""


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (KiB), from ``/proc``."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next((int(l.split()[1]) for l in fh if l.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


def measured_process(target: str, args: Sequence[str], log: Path) -> dict:
    """Runs module (or ``.py`` script) ``target`` with ``args`` in a child Python; its exit code,
    wall time, own peak RSS (MiB, imports included), the peak of its whole process tree's
    resident memory (``tree_rss_mib``: worker processes included, sampled every 50 ms) and
    output (in ``log``)."""
    hwm = Path(str(log) + ".hwm")
    start = time.perf_counter()
    tree = 0
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", _HWM_WRAPPER, str(hwm), target, *map(str, args)],
                                stdout=fh, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            tree = max(tree, _tree_rss_kib(proc.pid))
            time.sleep(0.05)
        rc = proc.returncode
    seconds = time.perf_counter() - start
    rss = int(hwm.read_text()) / 1024 if hwm.exists() else float("nan")
    if hwm.exists():
        os.unlink(hwm)
    return {"rc": rc, "seconds": seconds, "rss_mib": rss, "tree_rss_mib": max(tree / 1024, rss),
            "output": Path(log).read_text()}
