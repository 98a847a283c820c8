"""``python -m models [--cache-dir DIR]``: build / locate the real models and report their own metrics."""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import cache_dir, minilm, ppocr


def _constant_weight_count(proto, min_elems: int = 64) -> int:
    """Number of ``Constant`` nodes holding a tensor of at least ``min_elems`` elements."""
    import onnx

    count = 0
    for n in proto.graph.node:
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and int(np.prod(a.t.dims, dtype=np.int64)) >= min_elems:
                count += 1
    return count


def _graph_summary(path: Path) -> str:
    import onnx

    proto = onnx.load(str(path))
    ops = Counter(n.op_type for n in proto.graph.node)
    const_weights = _constant_weight_count(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return (
        f"ir_version={proto.ir_version} opset={opset} nodes={len(proto.graph.node)} "
        f"initializers={len(proto.graph.initializer)} constant_weights(>=64 elems)={const_weights} "
        f"MatMul={ops.get('MatMul', 0)} Gemm={ops.get('Gemm', 0)} Conv={ops.get('Conv', 0)}"
    )


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $QSDONNX_CACHE or <repo>/.cache/models")
    args = ap.parse_args(argv)
    root = cache_dir(args.cache_dir)
    print(f"cache: {root}")

    t0 = time.perf_counter()
    mpath = minilm.build(root)
    t_build = time.perf_counter() - t0
    print(f"\nMiniLM: {mpath} ({_size(mpath)}, ready in {t_build:.1f} s)")
    print(f"  {_graph_summary(mpath)}")
    diffs = minilm.max_abs_diff(mpath)
    print("  max |onnx - torch|: " + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items()))
    s = minilm.sanity(mpath)
    print(
        f"  eval sentences: paraphrase cos={s['paraphrase_cos']:.3f} unrelated cos={s['unrelated_cos']:.3f} "
        f"nearest neighbour in own group={s['group_recall']:.3f}"
    )

    t0 = time.perf_counter()
    rpath = ppocr.rec_path(root)
    dpath = ppocr.det_path(root)
    t_copy = time.perf_counter() - t0
    print(f"\nPP-OCRv4 rec: {rpath} ({_size(rpath)}, ready in {t_copy:.1f} s with det)")
    print(f"  {_graph_summary(rpath)}")
    print(f"  charset: {len(ppocr.charset(rpath))} classes (blank at 0, space last)")
    r = ppocr.rec_sanity(rpath)
    print(f"  eval lines ({len(ppocr.rec_eval_texts())}): CER={100 * r['cer']:.2f}% exact={100 * r['exact']:.1f}%")
    print(f"PP-OCRv4 det: {dpath} ({_size(dpath)})")
    print(f"  {_graph_summary(dpath)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
