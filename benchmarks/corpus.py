"""``python -m benchmarks.corpus``: the default command on every model of ``models.corpus``, next to
``--method rtn --bits 4`` and ONNX Runtime's two weight quantizers.

For each model: the exit code and its line when not 0; weights found / compressed and the share
of their bytes compressed (from the report); the file ratio; the output error on plausible
inputs (``models.corpus.make_inputs``: rendered text lines, real file bytes, smooth scenes,
tones): the worst relative L2 over the outputs, and the top-1 agreement of the first output
(argmax over its last axis; for OCR and classifiers, the label read); whether the output passes
``onnx.checker``'s full check; wall time and peak RSS of the ``qsdonnx`` process (imports
included). Options: ``--models a,b``, ``--cheap`` (the models the test suite uses),
``--json PATH``, ``--work DIR``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from models import corpus

from .metrics import measured_process
from .peers import ort_dynamic_int8, ort_matmul_nbits

FEEDS = 8


def run_qsdonnx(src: Path, dst: Path, args: list[str]) -> dict:
    """One ``qsdonnx optimize`` process: exit code, its error line, wall time, its own peak RSS."""
    report = dst.with_suffix(".json")
    res = measured_process("qsdonnx.cli", ["optimize", str(src), "-o", str(dst), "--report", str(report), *args],
                           dst.with_suffix(".log"))
    lines = [l for l in res["output"].strip().splitlines() if l.startswith("error:")]
    return {"rc": res["rc"], "error": lines[-1] if lines else "", "seconds": res["seconds"],
            "rss_mib": res["rss_mib"], "report": json.loads(report.read_text()) if res["rc"] == 0 else None}


def outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    from qsdonnx.runtime import session

    sess = session(str(path))
    names = [o.name for o in sess.get_outputs()]
    per = [sess.run(names, f) for f in feeds]
    return [np.concatenate([np.asarray(p[i]).reshape(1, -1) if np.ndim(p[i]) == 0 else np.asarray(p[i])
                            for p in per]) for i in range(len(names))]


def errors(ref: list[np.ndarray], got: list[np.ndarray], labels: bool = True) -> dict:
    rel = max(float(np.linalg.norm((r - g).astype(np.float64)) / max(np.linalg.norm(r.astype(np.float64)), 1e-30))
              for r, g in zip(ref, got))
    first, other = ref[0], got[0]
    top1 = (float(np.mean(first.argmax(-1) == other.argmax(-1))) if labels and first.ndim >= 2 and first.shape[-1] > 1
            else None)
    return {"rel_l2": rel, "top1": top1}


def checks(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True
    except Exception:  # noqa: BLE001 - any failure of the checker is a "no"
        return False


def weight_share(report: dict) -> tuple[int, int, float, int]:
    layers = report["layers"]
    found = sum(l["bytes_before"] or 0 for l in layers)
    done = sum(l["bytes_before"] or 0 for l in layers if l["status"] == "compressed")
    in_subgraphs = sum(1 for l in layers if l.get("location") == "subgraph")
    return len(layers), sum(l["status"] == "compressed" for l in layers), done / found if found else 0.0, in_subgraphs


def bench_model(entry: corpus.CorpusModel, work: Path) -> dict:
    src = corpus.build(entry.name)
    header = onnx.load(str(src), load_external_data=False)
    feeds = corpus.make_inputs(entry.name, header, FEEDS, seed=1)
    ref = outputs(src, feeds)
    size = src.stat().st_size
    row: dict = {"model": entry.name, "what": entry.what, "size_mib": size / 2**20,
                 "opset": next((o.version for o in header.opset_import if o.domain in ("", "ai.onnx")), None)}
    for label, extra in (("default", []), ("rtn4", ["--method", "rtn", "--bits", "4"])):
        dst = work / f"{entry.name}.{label}.onnx"
        res = run_qsdonnx(src, dst, [*entry.args, *extra])
        cell = {"rc": res["rc"], "error": res["error"], "seconds": res["seconds"], "rss_mib": res["rss_mib"]}
        if res["rc"] == 0:
            found, done, share, sub = weight_share(res["report"])
            cell.update(found=found, compressed=done, byte_share=share, in_subgraphs=sub,
                        file_ratio=dst.stat().st_size / size, checks=checks(dst),
                        bpw=res["report"]["totals"]["bits_per_weight"], **errors(ref, outputs(dst, feeds), entry.labels))
        row[label] = cell
    for label, peer in (("ort_dynamic", ort_dynamic_int8), ("ort_nbits", ort_matmul_nbits)):
        dst = work / f"{entry.name}.{label}.onnx"
        outcome = peer(src, dst)
        cell = {"status": outcome.status, "note": outcome.note}
        if outcome.status in ("ok", "no-op") and dst.exists():
            try:
                cell.update(file_ratio=dst.stat().st_size / size, **errors(ref, outputs(dst, feeds), entry.labels))
            except Exception as exc:  # noqa: BLE001 - a peer output ONNX Runtime cannot run is a result
                cell.update(status="error", note=str(exc).splitlines()[0][:120])
        row[label] = cell
    return row


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _err(c: dict) -> str:
    if "rel_l2" not in c:
        return "-"
    top = f", top-1 {100 * c['top1']:.1f} %" if c.get("top1") is not None else ""
    return f"{c['rel_l2']:.3f}{top}"


def table(rows: list[dict]) -> str:
    head = ["model", "MiB", "opset", "exit", "compressed (bytes)", "file", "error (rel L2, top-1)", "checks",
            "time, RSS", "rtn 4-bit: file, error", "ORT dynamic int8: file, error", "ORT MatMulNBits: file, error"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        d, rt = r["default"], r["rtn4"]
        if d["rc"] == 0:
            comp = f"{d['compressed']}/{d['found']} ({_pct(d['byte_share'])})"
            if d["in_subgraphs"]:
                comp += f", {d['in_subgraphs']} in If branches untouched"
            cells = [comp, _pct(d["file_ratio"]), _err(d), "yes" if d["checks"] else "NO"]
        else:
            cells = [d["error"][7:90], "-", "-", "-"]
        rtn = f"{_pct(rt.get('file_ratio'))}, {_err(rt)}" if rt["rc"] == 0 else f"exit {rt['rc']}"
        peers = []
        for k in ("ort_dynamic", "ort_nbits"):
            c = r[k]
            peers.append(f"{_pct(c.get('file_ratio'))}, {_err(c)}" if c["status"] == "ok"
                         else f"{c['status']}" + (f" ({c['note'][:40]})" if c.get("note") else ""))
        out.append("| " + " | ".join([r["model"], f"{r['size_mib']:.1f}", str(r["opset"]), str(d["rc"]), *cells,
                                      f"{d['seconds']:.1f} s, {d['rss_mib']:.0f} MiB", rtn, *peers]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated corpus names (default: all)")
    ap.add_argument("--cheap", action="store_true", help="only the models the test suite uses")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path)
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else [m.name for m in corpus.CORPUS if m.cheap or not args.cheap]
    work = args.work or Path(tempfile.mkdtemp(prefix="qsdonnx-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        rows.append(bench_model(corpus.BY_NAME[name], work))
        print(f"{name}: done", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
