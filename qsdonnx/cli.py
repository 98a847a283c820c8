"""Command line: a thin layer that parses flags into ``OptimizeConfig`` and calls the API."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import api
from .config import BITS, FORMATS, LEVELS, METHODS, OptimizeConfig, parse_input_shape, parse_override
from .errors import QsdError


def _fail(exc: QsdError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qsdonnx")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """qsdonnx: shrink the weights of an ONNX model by quantized, sparse, low-rank
    factorization and rewrite the graph so ONNX Runtime runs the compressed model directly."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the compressed model (written atomically).")
@click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
              help="rtn: block-wise round-to-nearest; svd: truncated SVD (float factors); lplr: quantized "
                   "low-rank factors; gptq: error-feedback rounding on calibration data; caldera: Q + L·R; "
                   "qsd: sparse quantized factors; pq: product-quantized Gather tables (--bits code bits per "
                   "value, other weights rtn); trellis: trellis-coded Gather tables (2 bits per value, other weights "
                   "rtn); vq: 2-D vector codebooks with error feedback (2, 3 or 4 bits per "
                   "weight; decoded to a float weight when the model is loaded, which needs more memory); auto: "
                   "the planner chooses per layer.")
@click.option("--bits", type=click.Choice([str(b) for b in BITS]), default="4", show_default=True,
              help="Code width for quantized parts.")
@click.option("--levels", type=click.Choice([str(v) for v in LEVELS]), default=None,
              help="rtn/gptq: codes of 5, 6, 10 or 12 values instead of --bits, stored three to a word "
                   "(2.33, 2.67, 3.33 or 3.67 bits a code) and widened to 4-bit codes when the model loads.")
@click.option("--block-size", type=int, default=32, show_default=True,
              help="Values sharing one scale (along the reduction axis).")
@click.option("--symmetric/--asymmetric", default=False, show_default=True,
              help="Signed codes with no zero point, or unsigned codes with a zero point per block.")
@click.option("--scale-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--rank", type=int, default=None, help="Rank of the low-rank factors (svd, lplr, caldera, qsd).")
@click.option("--sparsity", type=float, default=0.0, show_default=True,
              help="qsd: fraction of each factor column held at zero (stored as values + row indices).")
@click.option("--bits-per-weight", type=float, default=None,
              help="Size budget in bits per compressed weight, counting every stored byte.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="qdq", show_default=True,
              help="qdq: standard DequantizeLinear (any runtime); nbits: com.microsoft.MatMulNBits; "
                   "fused: the qsdonnx custom op (needs `qsdonnx build-ops`).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave weights whose name matches (repeatable).")
@click.option("--override", "overrides", multiple=True, metavar="REGEX:key=value,...",
              help="Per-weight settings, e.g. 'classifier.*:bits=8' or 'emb.*:skip' (repeatable).")
@click.option("--min-elements", type=int, default=4096, show_default=True,
              help="Weights with fewer elements are left as they are.")
@click.option("--no-embeddings", is_flag=True, help="Do not compress Gather embedding tables.")
@click.option("--no-clip-search", is_flag=True,
              help="rtn: use each block's min/max range instead of the MSE-best clipped range.")
@click.option("--no-sensitivity", is_flag=True,
              help="Plan on per-layer errors alone, without measuring each weight's end-to-end effect.")
@click.option("--rotate/--no-rotate", default=None,
              help="With calibration: layers read their input rotated in blocks (one random orthogonal "
                   "block, stored once) and hold the weight rotated back, which spreads outliers before "
                   "quantizing. Adds a small rotation per rotated input at run time. Default: on, but off "
                   "for more than 1 GiB of weights (it holds every rotated weight in memory).")
@click.option("--rotate-block", type=int, default=32, show_default=True, help="Order of the rotation block.")
@click.option("--calib", type=click.Path(exists=False, path_type=Path), default=None,
              help="Calibration data: .npz named after graph inputs (first axis = samples) or a directory of them.")
@click.option("--calib-batch", type=int, default=8, show_default=True, help="Samples per calibration run.")
@click.option("--calib-samples", type=int, default=256, show_default=True, help="Most samples to use.")
@click.option("--calib-mask", default="auto", show_default=True, metavar="INPUT|auto|none",
              help="0/1 input (batch, sequence) marking real tokens: calibration skips padded positions. "
                   "auto: an input named attention_mask or input_mask.")
@click.option("--tune-epochs", type=int, default=None, metavar="N",
              help="Epochs of end-to-end tuning of scales, codebooks, biases and norms on the calibration "
                   "data (one sample in five held out; kept only if it lowers the held-out error). "
                   "Default: 4 with --calib, 0 without.")
@click.option("--inputs", type=click.Path(path_type=Path), default=None,
              help="Validation inputs (.npz named after graph inputs); generated from the input types if absent.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="Shape for generated inputs with dynamic dims (repeatable).")
@click.option("--num-inputs", type=int, default=4, show_default=True, help="How many generated inputs to validate on.")
@click.option("--max-rel-error", type=float, default=None,
              help="Fail (exit 3, nothing written) when an output's relative L2 error exceeds this.")
@click.option("--keep-on-fail", is_flag=True, help="Write the model even when --max-rel-error is missed (still exit 3).")
@click.option("--no-validate", is_flag=True, help="Skip the end-to-end check in ONNX Runtime.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True,
              help="accuracy_level of emitted MatMulNBits and of ORT's own DQ->MatMul fusion: 0/1 keep float "
                   "activations, 4 quantizes activations to int8 (faster, less exact).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full report as JSON.")
@click.option("--external-data/--no-external-data", "external_data", default=None,
              help="Write the tensors to OUTPUT.data next to the output (default: only when the model would "
                   "exceed protobuf's 2 GB).")
@click.option("--jobs", type=int, default=None, metavar="N",
              help="Weights factorized in parallel, on worker threads (default: one per core; models under "
                   "16 M weight elements are factorized one weight at a time). Output is the same for any N.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Factorize the weights as tasks on a Ray cluster (auto, HOST:PORT, ray://HOST:PORT, or local "
                   "to start one here); --jobs then caps the tasks in flight. Needs qsdonnx[ray].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="Print only the totals.")
def optimize(model, output, method, bits, levels, block_size, symmetric, scale_dtype, rank, sparsity, bits_per_weight, fmt,
             exclude, overrides, min_elements, no_embeddings, no_clip_search, no_sensitivity, rotate, rotate_block, calib, calib_batch, calib_samples, calib_mask,
             tune_epochs, inputs, input_shapes, num_inputs, max_rel_error, keep_on_fail, no_validate, accuracy_level, report_path,
             external_data, jobs, ray_address, seed, quiet) -> None:
    """Compress MODEL and write the result to --output."""
    try:
        cfg = OptimizeConfig(
            method=method, bits=int(bits), levels=int(levels) if levels else None, block_size=block_size, symmetric=symmetric,
            scale_dtype=scale_dtype, rank=rank, sparsity=sparsity, bits_per_weight=bits_per_weight, format=fmt,
            exclude=tuple(exclude), overrides=tuple(parse_override(o) for o in overrides),
            min_elements=min_elements, compress_embeddings=not no_embeddings, clip_search=not no_clip_search, sensitivity=not no_sensitivity,
            rotate=rotate, rotate_block=rotate_block, calib=calib,
            calib_batch=calib_batch, calib_samples=calib_samples, calib_mask=calib_mask, tune_epochs=tune_epochs,
            validate=not no_validate, inputs=inputs,
            input_shapes=tuple(parse_input_shape(s) for s in input_shapes), num_inputs=num_inputs,
            max_rel_error=max_rel_error, keep_on_fail=keep_on_fail, report=report_path, seed=seed,
            accuracy_level=accuracy_level, external_data=external_data, jobs=jobs, ray=ray_address,
            progress=sys.stderr.isatty())
        result = api.optimize(model, output, cfg)
    except QsdError as exc:
        _fail(exc)
        return
    text = result.report.format_table(show_skipped=not quiet)
    if quiet:
        text = "\n".join(text.splitlines()[-6:])
    click.echo(text)
    click.echo(f"wrote {output}")
    if not result.passed:
        click.echo(f"error: relative output error {result.report.validation['max_rel_l2']:.3e} exceeds "
                   f"--max-rel-error {max_rel_error:g} (model kept: --keep-on-fail)", err=True)
        sys.exit(3)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--min-elements", type=int, default=4096, show_default=True)
def inspect(model, as_json, min_elements) -> None:
    """List every candidate weight of MODEL: op, shape, size, where it lives, and what would be skipped."""
    try:
        records = api.inspect(model, OptimizeConfig(validate=False, min_elements=min_elements))
    except QsdError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps([{"name": r.name, "op": r.op, "shape": list(r.shape), "dtype": r.dtype,
                                "bytes": r.bytes_before, "location": r.location, "nodes": r.nodes,
                                "status": "would compress" if r.status == "candidate" else "skip",
                                "reason": r.reason} for r in records], indent=2))
        return
    rows = [(r.name, r.op, "x".join(map(str, r.shape)) or "?", f"{r.bytes_before:,}", r.location,
             "compress" if r.status == "candidate" else f"skip: {r.reason}") for r in records]
    head = ("weight", "op", "shape", "bytes", "location", "action")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    n = sum(1 for r in records if r.status == "candidate")
    total = sum(r.bytes_before for r in records if r.status == "candidate")
    click.echo(f"\n{n} of {len(records)} weights would be compressed ({total / 2**20:.2f} MiB)")


@cli.command()
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compressed", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--inputs", type=click.Path(path_type=Path), default=None, help="Inputs (.npz named after graph inputs).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...")
@click.option("--num-inputs", type=int, default=4, show_default=True)
@click.option("--max-rel-error", type=float, default=None, help="Exit 3 when an output's relative L2 error exceeds this.")
@click.option("--json", "as_json", is_flag=True)
def validate(original, compressed, inputs, input_shapes, num_inputs, max_rel_error, as_json) -> None:
    """Run ORIGINAL and COMPRESSED in ONNX Runtime on the same inputs and compare every output."""
    try:
        res = api.validate(original, compressed, inputs=inputs,
                           input_shapes=dict(parse_input_shape(s) for s in input_shapes), num_inputs=num_inputs)
    except QsdError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        for name, m in res["outputs"].items():
            d, a = m["disable_all"], m["default"]
            click.echo(f"{name}: rel L2 {d['rel_l2']:.3e}  cosine {d['cosine']:.6f}  SQNR {d['sqnr_db']:.1f} dB  "
                       f"max abs {d['max_abs']:.3e}  (default level: rel L2 {a['rel_l2']:.3e}; "
                       f"levels differ by {m['levels_agree']['rel_l2']:.1e})")
    if max_rel_error is not None and res["max_rel_l2"] > max_rel_error:
        click.echo(f"error: relative output error {res['max_rel_l2']:.3e} exceeds {max_rel_error:g}", err=True)
        sys.exit(3)


@cli.command("build-ops")
@click.option("--cuda/--no-cuda", default=None, help="Build the CUDA kernel too (default: when nvcc is found).")
@click.option("--verbose", is_flag=True)
def build_ops(cuda, verbose) -> None:
    """Build the fused custom-op library (needed by --format fused)."""
    from .buildops import build_ops as _build
    try:
        path = _build(cuda=cuda, verbose=verbose)
    except RuntimeError as exc:
        click.echo(f"error: {str(exc).splitlines()[0]}", err=True)
        sys.exit(2)
    click.echo(f"built {path}")


def _terminated(signum, frame) -> None:
    # SIGTERM (a job scheduler's stop, ``kill``) unwinds like Ctrl-C, so temporary data files
    # and half-written outputs are removed on the way out.
    raise SystemExit(128 + signum)


def main() -> None:
    """The console script: a bad option or argument is one ``error:`` line and exit code 2;
    SIGTERM exits with 143 after removing what the run had written so far."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(prog_name="qsdonnx", standalone_mode=False)
    except click.ClickException as exc:  # usage errors exit with 2
        message = exc.format_message()
        # Called with no arguments at all, the message is the help itself.
        click.echo(message if message.startswith("Usage:") else f"error: {message.splitlines()[0]}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
