"""``python -m models.demo``: build MiniLM, compress it with qsdonnx and score it on held-out sentences.

Calibration uses ``calib_inputs()``; the score uses the disjoint ``eval_inputs()``.
Extra arguments are passed to ``qsdonnx optimize`` (default: ``--bits-per-weight 3``).
"""
from __future__ import annotations

import sys

import numpy as np

from . import cache_dir, minilm


def main(argv: list[str]) -> int:
    from qsdonnx.cli import cli
    from qsdonnx.runtime import session

    src = minilm.build()
    work = cache_dir() / "demo"
    work.mkdir(parents=True, exist_ok=True)
    calib = work / "minilm_calib.npz"
    np.savez(calib, **minilm.calib_inputs())
    out = work / "minilm_qsd.onnx"
    args = argv or ["--bits-per-weight", "3"]
    print(f"$ qsdonnx optimize {src} -o {out} --calib {calib} {' '.join(args)}")
    try:
        cli.main(["optimize", str(src), "-o", str(out), "--calib", str(calib),
                  "--input-shape", "input_ids:1,64", "--input-shape", "attention_mask:1,64", *args],
                 prog_name="qsdonnx", standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            return int(exc.code)
    feeds = minilm.eval_inputs()
    ref = minilm.embed(str(src), feeds)
    got = minilm.embed(session(str(out)), feeds)
    s = minilm.score(ref, got)
    print(f"\nheld-out sentences ({len(ref)}): mean embedding cosine {s['mean_cosine']:.4f}, "
          f"min {s['min_cosine']:.4f}, nearest-neighbour agreement {s['nn_agreement']:.3f}")
    print(f"file: {src.stat().st_size / 2**20:.1f} MiB -> {out.stat().st_size / 2**20:.1f} MiB "
          f"({100 * out.stat().st_size / src.stat().st_size:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
