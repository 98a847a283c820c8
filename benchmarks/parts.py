"""Where MiniLM's embedding error comes from: the held-out cosine with only one part compressed.

    python -m benchmarks.parts [--method vq] [--bits 3] [--table trellis:2] [--tune-epochs 0] [--out DIR]

Every row compresses one group of weights at a fixed setting (the linear layers with
``--method`` at ``--bits``, the word-embedding table with ``--table METHOD:BITS``, by default
the trellis codes the planner picks for it at 3 bits per weight; calibrated on
``calib_inputs()``) and leaves every other weight as it is (``--override REGEX:skip``); the first
row compresses all of them.  Each row gives the mean, 10th percentile
and minimum cosine of the sentence embeddings on the disjoint ``eval_inputs()`` against the
original model, the loss ``1 − mean cosine`` and its share of the first row's loss (the shares
need not add to 100 %: errors of different parts do not simply add).  Writes ``parts.md`` and
``parts.json`` into ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_WORK = ROOT / ".cache" / "benchmarks" / "parts"

# Part name -> regular expression (full match) of the weight names it holds; None: all of them.
TABLE = r"word_embeddings\..*"
PARTS: dict[str, str | None] = {
    "everything": None,
    "word-embedding table": TABLE,
    "all linear layers": r"layers\..*",
    "attention query, key": r"layers\.\d+\.attention\.(query|key)\..*",
    "attention value, output": r"layers\.\d+\.attention\.(value|out)\..*",
    "FFN intermediate": r"layers\.\d+\.intermediate\..*",
    "FFN output": r"layers\.\d+\.output\..*",
}


def overrides(pattern: str | None, table: str) -> tuple[str, ...]:
    """The ``--override``s: skip every weight outside ``pattern`` (``None``: none skipped), then
    the table's setting ``METHOD:BITS`` (the first override that matches a weight applies)."""
    method, _, bits = table.partition(":")
    skip = () if pattern is None else (f"(?!(?:{pattern})$).*:skip",)
    return skip + (f"{TABLE}:method={method},bits={bits}",)


def cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    return np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))


def run(method: str, bits: int, table: str, tune_epochs: int, work: Path, rotate: bool = True) -> list[dict]:
    from models import minilm
    from qsdonnx.api import optimize
    from qsdonnx.config import parse_override
    from qsdonnx.runtime import session

    src = minilm.build()
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "minilm_calib.npz"
    np.savez(calib, **minilm.calib_inputs())
    feeds = minilm.eval_inputs()
    ref = minilm.embed(str(src), feeds)
    rows = []
    for part, pattern in PARTS.items():
        out = work / "part.onnx"
        t0 = time.perf_counter()
        res = optimize(src, out, calib=str(calib), method=method, bits=bits, tune_epochs=tune_epochs, rotate=rotate,
                       overrides=tuple(parse_override(o) for o in overrides(pattern, table)), progress=False,
                       validate=False, input_shapes=(("input_ids", (1, 64)), ("attention_mask", (1, 64))))
        c = cosines(ref, minilm.embed(session(str(out)), feeds))
        t = res.report.totals
        rows.append({"part": part, "pattern": pattern, "weights": t["weights_compressed"],
                     "elements": t["compressed_elements"], "bits_per_weight": t["bits_per_weight"],
                     "mean_cosine": float(c.mean()), "p10_cosine": float(np.percentile(c, 10)),
                     "min_cosine": float(c.min()), "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{part}: mean cosine {c.mean():.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    total = 1.0 - rows[0]["mean_cosine"]
    for r in rows:
        r["loss"] = 1.0 - r["mean_cosine"]
        r["share"] = r["loss"] / total if total > 0 else None
    return rows


def table(rows: list[dict]) -> str:
    head = ["part", "weights", "elements", "bpw", "mean cosine", "loss", "share of loss", "p10", "min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = "" if r["share"] is None else f"{100 * r['share']:.0f} %"
        lines.append(f"| {r['part']} | {r['weights']} | {r['elements'] / 1e6:.2f} M | {r['bits_per_weight']:.2f} | "
                     f"{r['mean_cosine']:.4f} | {r['loss']:.4f} | {share} | {r['p10_cosine']:.4f} | "
                     f"{r['min_cosine']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.parts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="vq", help="method for every compressed part (default vq)")
    ap.add_argument("--bits", type=int, default=3, help="bits per code for every compressed part (default 3)")
    ap.add_argument("--table", default="trellis:2", metavar="METHOD:BITS",
                    help="setting of the word-embedding table (default trellis:2; pq:2 for 4-value product codes)")
    ap.add_argument("--tune-epochs", type=int, default=0,
                    help="end-to-end tuning epochs (default 0: each part as its algorithm left it)")
    ap.add_argument("--no-rotate", action="store_true", help="linear layers read their inputs unrotated")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where parts.md and parts.json go")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where compiled models go")
    args = ap.parse_args(argv)
    rows = run(args.method, args.bits, args.table, args.tune_epochs, args.work, rotate=not args.no_rotate)
    command = "python -m benchmarks.parts " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    text = (f"MiniLM, linear layers `--method {args.method} --bits {args.bits}`, table `{args.table}`, "
            f"`--tune-epochs {args.tune_epochs}`{', `--no-rotate`' if args.no_rotate else ''}, one part "
            f"compressed at a time; held-out sentence-embedding cosine against the original.\n\n"
            f"{table(rows)}\n\nCommand: `{command.strip()}`, {_dt.date.today().isoformat()}.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parts.md").write_text(text)
    (args.out / "parts.json").write_text(json.dumps({"command": command.strip(), "method": args.method,
                                                      "bits": args.bits, "table": args.table, "tune_epochs": args.tune_epochs,
                                                      "rotate": not args.no_rotate,
                                                      "rows": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
