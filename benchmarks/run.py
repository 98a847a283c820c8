"""Rate–distortion and speed of qsdonnx against peer quantizers on the real models.

    python -m benchmarks.run [--quick | --full] [--models minilm,ppocr_rec] [--out DIR]
                             [--threads 2] [--skip-latency] [--skip-memory]

For each model: the fp32 original, the peers (ONNX Runtime's MatMulNBitsQuantizer and
quantize_dynamic, onnxsim's int4 pass) and qsdonnx's methods over a sweep of bit budgets are
compiled (each in a fresh process, with a time limit), evaluated on the model's evaluation data
(calibration uses different data), timed side by side in one process and measured for peak
memory in one process each.  Writes ``results.json``, ``<model>.md`` and ``<model>.png`` into
the output directory and prints the tables.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_WORK = ROOT / ".cache" / "benchmarks"
ALL_MODELS = ("minilm", "ppocr_rec")
SWEEP_METHODS = ("rtn", "gptq", "lplr", "caldera", "qsd", "vq", "auto")
FULL_BUDGETS = (2.0, 2.5, 3.0, 4.0, 5.0)
DEFAULT_BUDGETS = (3.0,)
FORMAT_BUDGET = 3.0
FORMAT_METHODS = ("rtn",)
MARKERS = {"ort-nbits": "s", "ort-dynamic": "D", "onnxsim": "^"}


# --------------------------------------------------------------------------- isolated compiles


def _child(conn, fn, kwargs) -> None:
    try:
        conn.send(fn(**kwargs))
    except BaseException as exc:  # report anything, the parent decides
        text = str(exc).strip().splitlines()
        conn.send({"status": "error", "note": f"{type(exc).__name__}: {text[0] if text else ''}"})
    finally:
        conn.close()


def isolated(fn, kwargs: dict, timeout: float) -> dict:
    """``fn(**kwargs)`` in a fresh (spawned) process; a crash or overrun becomes an error row."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, kwargs), daemon=True)
    t = time.perf_counter()
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            result = parent.recv()
        else:
            proc.kill()
            result = {"status": "error", "note": f"timed out after {timeout:.0f} s"}
    except EOFError:
        result = {"status": "error", "note": "worker process died"}
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result.get("status") == "error" and result.get("note") == "worker process died":
        result["note"] = f"worker process died (exit code {proc.exitcode})"
    result.setdefault("wall_s", time.perf_counter() - t)
    return result


def compile_qsdonnx(src: str, dst: str, options: dict) -> dict:
    """One ``qsdonnx.optimize`` call; compile time is the wall time of that call alone."""
    logging.getLogger("qsdonnx").setLevel(logging.ERROR)
    import qsdonnx

    t = time.perf_counter()
    try:
        result = qsdonnx.optimize(src, dst, **options)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return {"status": "error", "note": f"{type(exc).__name__}: {text[0] if text else ''}",
                "compile_s": time.perf_counter() - t}
    seconds = time.perf_counter() - t
    totals = result.report.totals
    note = ""
    if totals.get("weights_compressed", 0) < totals.get("weights_found", 0):
        note = f"compressed {totals['weights_compressed']} of {totals['weights_found']} weights"
    return {"status": "ok", "note": note, "compile_s": seconds, "bpw": totals.get("bits_per_weight"),
            "weights_found": totals.get("weights_found"), "weights_compressed": totals.get("weights_compressed"),
            "compressed_elements": totals.get("compressed_elements"),
            "compressed_bytes_after": totals.get("compressed_bytes_after"),
            "report_file_size_after": totals.get("file_size_after"),
            "timings": dict(result.report.timings), "plan": _jsonable(result.report.plan)}


def compile_peer(fn_name: str, src: str, dst: str, kwargs: dict) -> dict:
    from . import peers

    peers.quiet_peer_logs()
    return getattr(peers, fn_name)(Path(src), Path(dst), **kwargs).to_dict()


def _jsonable(o):
    """Plain JSON values: arrays become lists, NaN and infinities become null."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float):
        return None if math.isnan(o) or math.isinf(o) else o
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    if hasattr(o, "tolist"):
        return _jsonable(o.tolist())
    return str(o)


# --------------------------------------------------------------------------- the sweep


def build_model(name: str) -> Path:
    import models

    if name == "minilm":
        return models.minilm.build()
    if name == "ppocr_rec":
        return models.ppocr.rec_path()
    raise SystemExit(f"unknown model {name!r} (choose from {', '.join(ALL_MODELS)})")


def write_calibration(name: str, model_path: Path, out_dir: Path) -> Path:
    """The calibration inputs of a model as an ``.npz`` (arrays named after the graph inputs)."""
    import numpy as np
    import models

    feeds = (models.minilm.calib_inputs() if name == "minilm"
             else models.ppocr.rec_calib_inputs(model_path))
    path = out_dir / f"{name}_calib.npz"
    np.savez(path, **feeds)
    return path


def _plain(method: str) -> dict:
    """Plain round-to-nearest stays plain: no end-to-end tuning and no rotated inputs (the
    data-aware methods have both)."""
    return {"tune_epochs": 0, "rotate": False} if method == "rtn" else {}


def qsdonnx_specs(args) -> list[dict]:
    """The qsdonnx variants of a run: (label, method, options, format)."""
    specs = []
    if args.quick:
        specs.append({"label": "qsdonnx rtn 4b", "method": "rtn", "format": "qdq",
                      "options": {"method": "rtn", "bits": 4}, "calib": False})
        specs.append({"label": "qsdonnx gptq 3.0bpw", "method": "gptq", "format": "qdq", "budget": 3.0,
                      "options": {"method": "gptq", "bits_per_weight": 3.0}, "calib": True})
        return specs
    for bits in (4, 8):
        specs.append({"label": f"qsdonnx rtn {bits}b", "method": "rtn", "format": "qdq",
                      "options": {"method": "rtn", "bits": bits}, "calib": False})
    for method in args.methods:
        for b in args.budgets:
            specs.append({"label": f"qsdonnx {method} {b:.1f}bpw", "method": method, "format": "qdq",
                          "budget": b, "options": {"method": method, "bits_per_weight": b, **_plain(method)}, "calib": True})
            if method == "auto":
                specs.append({"label": f"qsdonnx auto {b:.1f}bpw untuned", "method": "auto untuned",
                              "format": "qdq", "budget": b, "calib": True,
                              "options": {"method": method, "bits_per_weight": b, "tune_epochs": 0}})
                specs.append({"label": f"qsdonnx auto {b:.1f}bpw unrotated", "method": "auto unrotated",
                              "format": "qdq", "budget": b, "calib": True,
                              "options": {"method": method, "bits_per_weight": b, "rotate": False}})
    if not args.skip_latency:
        from qsdonnx.buildops import find_ops_library

        have_ops = find_ops_library() is not None
        for method in args.format_methods:
            # "fused int8": the fused op with int8 activations (--accuracy-level 4).
            for label, fmt, level in (("nbits", "nbits", 0), ("fused", "fused", 0), ("fused int8", "fused", 4)):
                spec = {"label": f"qsdonnx {method} {FORMAT_BUDGET:.1f}bpw {label}", "method": method,
                        "format": fmt, "budget": FORMAT_BUDGET, "calib": True,
                        "options": {"method": method, "bits_per_weight": FORMAT_BUDGET, "format": fmt,
                                    "accuracy_level": level, **_plain(method)}}
                if fmt == "fused" and not have_ops:
                    spec["unavailable"] = "custom-op library not built (run `qsdonnx build-ops`)"
                specs.append(spec)
            if _plain(method).get("rotate") is False:
                continue
            # What the rotated inputs cost at run time, side by side.
            spec = {"label": f"qsdonnx {method} {FORMAT_BUDGET:.1f}bpw fused unrotated", "method": f"{method} unrotated",
                    "format": "fused", "budget": FORMAT_BUDGET, "calib": True,
                    "options": {"method": method, "bits_per_weight": FORMAT_BUDGET, "format": "fused",
                                "rotate": False}}
            if not have_ops:
                spec["unavailable"] = "custom-op library not built (run `qsdonnx build-ops`)"
            specs.append(spec)
    return specs


def compile_variants(name: str, src: Path, calib: Path, work: Path, args) -> list[dict]:
    from . import peers

    rows: list[dict] = [{"name": "fp32", "family": "fp32", "status": "ok", "note": "", "path": str(src),
                         "bpw": 32.0, "compile_s": None}]
    for spec in peers.peer_specs(args.quick):
        dst = work / f"{_slug(spec.name)}.onnx"
        log.info("[%s] peer %s ...", name, spec.name)
        out = isolated(compile_peer, {"fn_name": spec.fn.__name__, "src": str(src), "dst": str(dst),
                                      "kwargs": spec.kwargs}, args.compile_timeout)
        row = {"name": spec.name, "family": "peer", "peer": spec.fn.__name__, "bits": spec.bits,
               "block_size": spec.block_size, "path": str(dst), **out}
        rows.append(row)
        log.info("[%s] peer %s: %s %s", name, spec.name, row["status"], row.get("note", ""))
    for spec in qsdonnx_specs(args):
        dst = work / f"{_slug(spec['label'])}.onnx"
        row = {"name": spec["label"], "family": "qsdonnx", "method": spec["method"], "format": spec["format"],
               "budget": spec.get("budget"), "bits": spec["options"].get("bits"), "path": str(dst)}
        if spec.get("unavailable"):
            rows.append({**row, "status": "not available", "note": spec["unavailable"]})
            continue
        options = {**spec["options"], "validate": False, "progress": False}
        if spec["calib"]:
            options["calib"] = str(calib)
        log.info("[%s] %s ...", name, spec["label"])
        out = isolated(compile_qsdonnx, {"src": str(src), "dst": str(dst), "options": options},
                       args.compile_timeout)
        rows.append({**row, **out})
        log.info("[%s] %s: %s %s (%.1f s)", name, spec["label"], out["status"], out.get("note", ""),
                 out.get("compile_s") or out.get("wall_s") or 0.0)
    for r in rows:
        if r["status"] == "ok" and Path(r["path"]).is_file():
            r["file_bytes"] = _file_bytes(Path(r["path"]))
    return rows


def _file_bytes(path: Path) -> int:
    """The model file plus any external-data files it references."""
    import onnx

    total = path.stat().st_size
    proto = onnx.load(str(path), load_external_data=False)
    seen = set()
    for t in proto.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location" and kv.value not in seen:
                seen.add(kv.value)
                f = path.parent / kv.value
                if f.is_file():
                    total += f.stat().st_size
    return total


def evaluate(task, rows: list[dict], threads: int) -> dict:
    """Task metric and output error of every compiled variant; returns the live sessions."""
    from .metrics import make_session, ops_library_for, rel_l2

    sessions = {}
    ref = None
    for r in rows:
        if r["status"] != "ok":
            continue
        try:
            r["ops_lib"] = ops_library_for(r["path"])
            sess = make_session(r["path"], threads, ops_lib=r["ops_lib"])
            outs = task.outputs(sess)
        except Exception as exc:
            text = str(exc).strip().splitlines()
            r["status"] = "error"
            r["note"] = f"ORT: {type(exc).__name__}: {text[0] if text else ''}"[:300]
            log.info("[%s] %s fails to run: %s", task.name, r["name"], r["note"])
            continue
        if ref is None:
            ref = outs  # fp32 is the first row
        r["metrics"] = task.score(ref, outs)
        r["rel_err_outputs"] = {o.name: rel_l2(a, b) for o, a, b in zip(sess.get_outputs(), ref, outs)}
        r["rel_err"] = max(r["rel_err_outputs"].values())
        sessions[r["name"]] = sess
        log.info("[%s] %s: %s, rel err %.3e", task.name, r["name"], task.format_metric(r["metrics"], {}),
                 r["rel_err"])
    return sessions


def measure_latency(task, rows: list[dict], sessions: dict, runs: int) -> None:
    from .metrics import interleaved_latency

    for key, feeds in task.latency_feeds().items():
        log.info("[%s] latency %s: %d variants x %d runs, interleaved", task.name, key, len(sessions), runs)
        res = interleaved_latency(sessions, feeds, runs)
        base = res.get("fp32", {}).get("median_ms")
        for r in rows:
            if r["name"] in res:
                lat = res[r["name"]]
                lat["ratio_to_fp32"] = lat["median_ms"] / base if base else None
                r.setdefault("latency", {})[key] = lat


def measure_memory(task, rows: list[dict], work: Path, threads: int, runs: int) -> None:
    import numpy as np
    from .metrics import peak_rss

    feeds = task.latency_feeds()
    key = list(feeds)[-1]
    npz = work / f"rss_feeds_{key}.npz"
    np.savez(npz, **feeds[key])
    for r in rows:
        if r["status"] != "ok":
            continue
        res = peak_rss(r["path"], npz, threads, runs, ops_lib=r.get("ops_lib"))
        res["feeds"] = key
        r["memory"] = res
        log.info("[%s] %s: peak RSS %s", task.name, r["name"],
                 f"{res['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in res else res.get("error"))


# --------------------------------------------------------------------------- output


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")


def _sort_key(r: dict):
    bpw = r.get("bpw")
    ok = r["status"] == "ok" and bpw is not None
    return (0 if ok else 1, bpw if ok else 0.0, r["name"])


def _fmt(x, spec: str, default: str = "-") -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return default
    return format(x, spec)


def markdown_table(task, model: dict) -> str:
    rows = sorted(model["variants"], key=_sort_key)
    fp32 = next(r for r in rows if r["name"] == "fp32")
    base_bytes = fp32.get("file_bytes")
    lat_keys = [k for k in task.latency_feeds()] if any("latency" in r for r in rows) else []
    head = ["variant", "bpw", "weights", "file MiB (%)", task.metric_label, "rel err", "compile s"]
    head += [f"latency {k} ms (×fp32)" for k in lat_keys]
    head += ["peak RSS MiB", "status / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ok = r["status"] == "ok"
        size = "-"
        if ok and r.get("file_bytes"):
            size = f"{r['file_bytes'] / 2**20:.2f} ({100 * r['file_bytes'] / base_bytes:.1f}%)" if base_bytes else \
                f"{r['file_bytes'] / 2**20:.2f}"
        weights = "-"
        if r.get("weights_found"):
            weights = f"{r.get('weights_compressed', 0)}/{r['weights_found']}"
        metric = task.format_metric(r["metrics"], fp32.get("metrics", {})) if ok and "metrics" in r else "-"
        cells = [r["name"], _fmt(r.get("bpw") if r["status"] in ("ok", "no-op") else None, ".3f"), weights, size,
                 metric, _fmt(r.get("rel_err") if ok else None, ".2e"), _fmt(r.get("compile_s"), ".1f")]
        for k in lat_keys:
            lat = (r.get("latency") or {}).get(k)
            cells.append(f"{lat['median_ms']:.1f} ({lat['ratio_to_fp32']:.2f}×)" if lat else "-")
        mem = r.get("memory") or {}
        cells.append(_fmt(mem.get("peak_rss_mib"), ".0f", "-" if "error" not in mem else "error"))
        note = r.get("note") or ""
        status = r["status"] if r["status"] != "ok" else ""
        cells.append("; ".join(filter(None, [status, note])).replace("|", "\\|")[:160])
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        f"Model `{model['path']}`, {model['eval_samples']} evaluation samples; calibration on "
        f"{model['calib_samples']} other samples.",
        "bpw: bits of every stored byte that replaced a weight (codes, scales, zero points, factors) "
        "per original weight element, over the compressed weights only; `weights`: compressed / found.",
        "rel err: ‖y − y_fp32‖ / ‖y_fp32‖ on the evaluation data, worst output.",
    ]
    if lat_keys:
        notes.append(f"Latency: ONNX Runtime CPU, {model['threads']} intra-op threads, median of "
                     f"{model['latency_runs']} runs per variant, variants interleaved round-robin in one process "
                     f"({', '.join(f'{k}: ' + _feed_desc(task.name, k) for k in lat_keys)}).")
    if any("memory" in r for r in rows):
        notes.append("Peak RSS: one fresh process per variant (interpreter and imports included), "
                     "load + 20 runs on the largest latency batch.")
    return f"## {model['name']}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _feed_desc(task_name: str, key: str) -> str:
    if task_name == "minilm":
        return f"batch {key[1:]} × 128 tokens"
    return f"batch {key[1:]} × 3×48×320"


def plot(task, model: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in model["variants"] if r["status"] == "ok" and "metrics" in r and r.get("bpw")]
    fp32 = next((r for r in rows if r["name"] == "fp32"), None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, label, logy in ((axes[0], task.metric_key, task.metric_label, False),
                                 (axes[1], "rel_err", "relative output L2 error vs fp32", True)):
        value = (lambda r: r["metrics"][key]) if key != "rel_err" else (lambda r: r["rel_err"])
        for method in SWEEP_METHODS:
            pts = sorted((r["bpw"], value(r)) for r in rows
                         if r["family"] == "qsdonnx" and r.get("method") == method and r.get("format") == "qdq")
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, label=f"qsdonnx {method}")
        for r in rows:
            if r["family"] != "peer":
                continue
            marker = next((m for p, m in MARKERS.items() if r["name"].startswith(p)), "x")
            ax.plot([r["bpw"]], [value(r)], marker=marker, ls="none", ms=8, mfc="none", label=r["name"])
        if fp32 is not None and key != "rel_err":
            ax.axhline(value(fp32), color="k", ls="--", lw=0.8, label="fp32")
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("bits per compressed weight")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(f"{model['name']}: quality vs size")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        info["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for mod in ("onnx", "onnxruntime", "numpy", "torch", "onnxsim", "matplotlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        info["git_commit"] = rev.stdout.strip() or None
        info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="smoke test: MiniLM, fp32 + one peer + qsdonnx rtn 4-bit and gptq 3 bpw, few runs")
    mode.add_argument("--full", action="store_true",
                      help=f"budgets {', '.join(map(str, FULL_BUDGETS))} for every method (default: "
                           f"{', '.join(map(str, DEFAULT_BUDGETS))})")
    ap.add_argument("--models", default=None, help=f"comma list of {', '.join(ALL_MODELS)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help="where compiled models and calibration files go (default .cache/benchmarks)")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads for latency and memory")
    ap.add_argument("--skip-latency", action="store_true", help="no latency (nor nbits/fused variants)")
    ap.add_argument("--skip-memory", action="store_true", help="no per-variant peak-RSS processes")
    ap.add_argument("--methods", default=None, help=f"qsdonnx methods to sweep (default all: {','.join(SWEEP_METHODS)})")
    ap.add_argument("--budgets", default=None, help="comma list of bits-per-weight budgets")
    ap.add_argument("--format-methods", default=",".join(FORMAT_METHODS),
                    help=f"methods also lowered to nbits and fused at {FORMAT_BUDGET} bpw for latency")
    ap.add_argument("--latency-runs", type=int, default=None, help="runs per variant (quick 5, default 10, full 20)")
    ap.add_argument("--compile-timeout", type=float, default=None, help="seconds per compile (quick 90, default 300, full 1800)")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in (args.models or ("minilm" if args.quick else ",".join(ALL_MODELS))).split(",")
                   if m.strip()]
    for m in args.models:
        if m not in ALL_MODELS:
            ap.error(f"unknown model {m!r} (choose from {', '.join(ALL_MODELS)})")
    args.methods = [m.strip() for m in (args.methods or ",".join(SWEEP_METHODS)).split(",") if m.strip()]
    args.budgets = ([float(b) for b in args.budgets.split(",")] if args.budgets
                    else list(FULL_BUDGETS if args.full else DEFAULT_BUDGETS))
    args.format_methods = [m.strip() for m in args.format_methods.split(",") if m.strip()]
    if args.latency_runs is None:
        args.latency_runs = 5 if args.quick else (20 if args.full else 10)
    if args.compile_timeout is None:
        args.compile_timeout = 90.0 if args.quick else (1800.0 if args.full else 300.0)
    return args


def run_model(name: str, args, out: Path):
    from .metrics import TASKS

    t0 = time.perf_counter()
    src = build_model(name)
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    calib = write_calibration(name, src, work)
    task = TASKS[name]()
    rows = compile_variants(name, src, calib, work, args)
    sessions = evaluate(task, rows, args.threads)
    if not args.skip_latency:
        measure_latency(task, rows, sessions, args.latency_runs)
    sessions.clear()
    if not args.skip_memory:
        measure_memory(task, rows, work, args.threads, runs=20)
    import numpy as np
    first = next(iter(task.feeds.values()))
    calib_n = len(next(iter(np.load(calib).values())))
    model = {"name": name, "path": str(src), "threads": args.threads, "latency_runs": args.latency_runs,
             "eval_samples": int(len(first)), "calib_samples": int(calib_n), "calib_file": str(calib),
             "variants": rows, "duration_s": time.perf_counter() - t0}
    return model, task


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    results = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *map(shlex.quote, sys.argv[1:])]),
        "mode": "quick" if args.quick else ("full" if args.full else "default"),
        "machine": machine_info(),
        "settings": {"models": args.models, "methods": args.methods, "budgets": args.budgets,
                     "format_methods": args.format_methods, "format_budget": FORMAT_BUDGET,
                     "threads": args.threads, "latency_runs": args.latency_runs,
                     "skip_latency": args.skip_latency, "skip_memory": args.skip_memory,
                     "compile_timeout_s": args.compile_timeout},
        "models": {},
    }
    tables = []
    for name in args.models:
        model, task = run_model(name, args, out)
        results["models"][name] = model
        results["duration_s"] = time.perf_counter() - t0
        # written after every model, so a failure later keeps what was measured
        (out / "results.json").write_text(json.dumps(_jsonable(results), indent=2) + "\n")
        table = markdown_table(task, model)
        (out / f"{name}.md").write_text(table)
        plot(task, model, out / f"{name}.png")
        tables.append(table)
    sys.stdout.write("\n".join(tables))
    sys.stdout.write(f"\nwrote {out / 'results.json'} in {results['duration_s']:.0f} s\n")
    return 0


if __name__ == "__main__":
    from benchmarks.run import main as _main  # the importable module, so spawned workers find their targets

    raise SystemExit(_main())
