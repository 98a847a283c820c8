"""The per-layer table, totals and the JSON report."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .passes.base import Context, WeightRecord
from .factorize.types import code_rate


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _num(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


@dataclass
class Report:
    """What ``optimize`` did: one row per weight plus totals and validation metrics."""

    layers: list[dict]
    totals: dict
    validation: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    rotation: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # what the user should know about this run

    @classmethod
    def from_context(cls, ctx: Context, file_size_after: Optional[int]) -> "Report":
        layers = [_layer_row(r) for r in ctx.records]
        comp = [r for r in ctx.records if r.status == "compressed"]
        numel = sum(r.numel for r in comp)
        before = sum(r.bytes_before for r in comp)
        # The rotation that rotated layers read (passes.rotate) is stored once beside them.
        after = sum(r.bytes_after for r in comp) + (ctx.rotation.get("bytes", 0) if comp else 0)
        totals = {
            "weights_found": len(ctx.records),
            "weights_compressed": len(comp),
            "weights_skipped": sum(1 for r in ctx.records if r.status == "skipped"),
            "compressed_elements": numel,
            "compressed_bytes_before": before,
            "compressed_bytes_after": after,
            "bits_per_weight": 8.0 * after / numel if numel else None,
            "file_size_before": ctx.original_file_size or None,
            "file_size_after": file_size_after,
            "file_ratio": (file_size_after / ctx.original_file_size)
            if file_size_after and ctx.original_file_size else None,
        }
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ctx.config).items()}
        return cls(layers=layers, totals=totals, validation=ctx.validation, config=cfg,
                   timings={k: round(v, 3) for k, v in ctx.timings.items()},
                   plan=ctx.plan_summary, tuning=ctx.tuning, rotation=ctx.rotation, notes=list(ctx.notes))

    def to_dict(self) -> dict:
        return _clean({"layers": self.layers, "totals": self.totals, "validation": self.validation,
                       "config": self.config, "timings_s": self.timings, "plan": self.plan,
                       "tuning": self.tuning, "rotation": self.rotation, "notes": self.notes})

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n")

    def format_table(self, show_skipped: bool = True) -> str:
        head = ["weight", "op", "shape", "method", "rank", "bits", "bpw", "bytes before", "after", "rel err"]
        rows = []
        for l in self.layers:
            if l["status"] != "compressed":
                continue
            method = l["method"]
            if l.get("atoms"):  # QSD sub-vector codes: vector length × dictionary atoms
                method += f" {l['block_size']}x{l['atoms']}"
            bits = str(l["bits"] or "-")
            if l.get("levels"):  # codes of that many values, three to a word: the stored bits a code
                bits = f"{code_rate(l['bits'], l['levels']):.2f}"
            rows.append([l["name"], l["op"], "x".join(map(str, l["shape"])), method, str(l["rank"] or "-"),
                         bits, _num(l["bpw"], ".2f"), _fmt_bytes(l["bytes_before"]),
                         _fmt_bytes(l["bytes_after"]), _num(l["rel_error"], ".4f")])
        out = [_table(head, rows)] if rows else ["no weights compressed"]
        skipped = [l for l in self.layers if l["status"] == "skipped"]
        if skipped and show_skipped:
            out.append(f"skipped {len(skipped)} weights:")
            for l in skipped[:40]:
                out.append(f"  {l['name']} ({l['op']}): {l['reason']}")
            if len(skipped) > 40:
                out.append(f"  ... and {len(skipped) - 40} more (see --report)")
        t = self.totals
        out.append("")
        out.append(f"compressed {t['weights_compressed']} of {t['weights_found']} weights: "
                   f"{_fmt_bytes(t['compressed_bytes_before'])} -> {_fmt_bytes(t['compressed_bytes_after'])}, "
                   f"{_num(t['bits_per_weight'], '.3f')} bits per weight")
        if t.get("file_size_before") and t.get("file_size_after"):
            out.append(f"file size {_fmt_bytes(t['file_size_before'])} -> {_fmt_bytes(t['file_size_after'])} "
                       f"({100 * t['file_ratio']:.1f}% of the original)")
        out.extend(f"note: {n}" for n in self.notes)
        ro = self.rotation
        if ro.get("layers"):
            out.append(f"rotated inputs: {ro['layers']} layers read {ro['inputs']} inputs rotated in blocks of "
                       f"{ro['block']} ({_fmt_bytes(ro['bytes'])} stored once, counted above)")
        tu = self.tuning
        if tu.get("skipped"):
            out.append(f"end-to-end tuning skipped: {tu['skipped']}")
        if tu.get("held_out_loss"):
            h = tu["held_out_loss"]
            out.append(f"end-to-end tuning: held-out relative error {h[0]:.4g} -> {min(h):.4g} "
                       f"({'kept' if tu['kept'] else 'no gain, not kept'}; {tu['epochs']} epochs, {tu['seconds']:.1f}s)")
        v = self.validation
        if v:
            where = f"; {v['source']}" if v.get("source") else ""
            out.append(f"validation on {v['samples']} samples, original vs compressed in ONNX Runtime{where}:")
            for name, m in v["outputs"].items():
                d, a = m["disable_all"], m["default"]
                out.append(f"  {name}: rel L2 {d['rel_l2']:.3e}, cosine {d['cosine']:.5f}, SQNR {d['sqnr_db']:.1f} dB, "
                           f"max abs {d['max_abs']:.3e} (ORT_DISABLE_ALL); rel L2 {a['rel_l2']:.3e} (default level); "
                           f"levels differ by {m['levels_agree']['rel_l2']:.1e}")
        if self.timings:
            out.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(out)


def _layer_row(r: WeightRecord) -> dict:
    return {
        "name": r.name, "op": r.op, "nodes": r.nodes, "shape": list(r.shape), "dtype": r.dtype,
        "location": r.location, "view": r.view, "matrix_shape": list(r.matrix_shape),
        "status": r.status, "reason": r.reason, "method": r.method, "bits": r.bits, "levels": r.levels,
        "block_size": r.block_size, "rank": r.rank, "atoms": r.atoms, "bpw": r.bpw, "bytes_before": r.bytes_before,
        "bytes_after": r.bytes_after, "rel_error": r.rel_error, "predicted_error": r.predicted_error,
        **{k: v for k, v in r.extra.items() if k != "attrs_key"},
    }


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _clean(o):
    """JSON has no NaN/Infinity: they become null."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return o


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)
