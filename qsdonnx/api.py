"""The Python API: ``optimize``, ``inspect`` and ``validate``; the CLI calls exactly these."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import onnx

from .config import DATA_AWARE_METHODS, OptimizeConfig
from .errors import ConfigError, NothingToCompress, OutputError, ValidationFailed
from .passes.aliases import FoldWeightAliasesPass
from .passes.base import Context, WeightRecord, stage
from .passes.bias import BiasCorrectionPass
from .passes.canonicalize import QUANTIZED_OPS, FindWeightsPass
from .passes.factorize import FactorizeWeightsPass, GlobalPlanPass, PlanPass
from .passes.load import LoadPass, load_model
from .passes.lower_qdq import LowerQdqPass, planned_opset, required_opset
from .passes.tune import TunePass
from .passes.save import PrepareOpsetPass, check_output_path, save_model
from .passes.validate import ValidatePass, compare_models, generated_inputs, load_feeds
from .report import Report

log = logging.getLogger("qsdonnx")
ModelLike = Union[str, Path, onnx.ModelProto]


@dataclass
class OptimizeResult:
    model: onnx.ModelProto
    report: Report
    output: Optional[Path]
    passed: bool  # False only when --max-rel-error was missed and the output kept anyway


def _context(model: ModelLike, cfg: OptimizeConfig) -> Context:
    if isinstance(model, onnx.ModelProto):
        proto, external, path = copy.deepcopy(model), set(), None
    else:
        path = Path(model)
        proto, external = load_model(path)
    ctx = Context(config=cfg, model=proto, input_path=path, base_dir=path.parent if path else None)
    ctx.external = external
    # External data is not loaded, so for large models this copies only the graph.
    ctx.original = copy.deepcopy(proto)
    return ctx


# Above this many bytes of candidate weights, --calib does not tune end to end or rotate unless asked.
LARGE_MODEL_BYTES = 1 << 30


def _large_model_defaults(ctx: Context, cfg: OptimizeConfig) -> OptimizeConfig:
    """End-to-end tuning and input rotation hold every weight in memory at once: above
    :data:`LARGE_MODEL_BYTES` of weights they are off unless asked for (with a note)."""
    weight_bytes = sum(r.bytes_before for r in ctx.candidates())
    large = weight_bytes > LARGE_MODEL_BYTES
    off = []
    if cfg.tune_epochs is None and cfg.epochs_to_tune and large:
        cfg = cfg.replace(tune_epochs=0)
        off.append("end-to-end tuning (--tune-epochs N)")
    if cfg.rotate is None:
        on = not (large and calibrates(cfg))
        if not on:
            off.append("input rotation (--rotate)")
        cfg = cfg.replace(rotate=on)
    if off:
        ctx.notes.append(f"not run by default on {weight_bytes / 2**30:.1f} GiB of weights (they hold every weight "
                         f"in memory): {', '.join(off)}")
    return cfg


def _front(ctx: Context) -> None:
    for p in (LoadPass(), FoldWeightAliasesPass(), FindWeightsPass()):
        p(ctx)


def nothing_to_compress(ctx: Context) -> str:
    """Why a model has no candidate weight, in one line."""
    quantized: dict[str, int] = {}
    for n in ctx.model.graph.node:
        if n.op_type in QUANTIZED_OPS:
            quantized[n.op_type] = quantized.get(n.op_type, 0) + 1
    reasons: dict[str, int] = {}
    for r in ctx.records:
        key = r.reason
        reasons[key] = reasons.get(key, 0) + 1
    rest = "; ".join(f"{v}x {k}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    if quantized:
        what = ", ".join(f"{v} {k}" for k, v in sorted(quantized.items(), key=lambda kv: -kv[1]))
        return f"its weights are already quantized: {what} nodes" + (f" (float weights: {rest})" if rest else "")
    if not ctx.records:
        return "it has no constant MatMul, Gemm, Conv, Gather or LSTM/GRU/RNN weight"
    return f"none of its {len(ctx.records)} weights can be compressed ({rest})"


def calibrates(cfg: OptimizeConfig) -> bool:
    """Whether the run measures activations: with --calib data, or when a data-aware method was
    asked for by name (it then runs on generated inputs, with a warning).  The default without
    data is data-free: nothing is fitted to generated inputs."""
    return cfg.calib is not None or cfg.method in DATA_AWARE_METHODS


def _lowering(cfg: OptimizeConfig):
    if cfg.format == "qdq":
        return LowerQdqPass()
    if cfg.format == "nbits":
        from .passes.lower_nbits import LowerNbitsPass
        return LowerNbitsPass(cfg.accuracy_level)
    from .passes.lower_fused import LowerFusedPass
    return LowerFusedPass(cfg.accuracy_level)


def _should_spend_more(ctx: Context, planner) -> bool:
    """With ``--max-rel-error`` and a global plan, more bits are spent until the error is met."""
    cfg = ctx.config
    if cfg.max_rel_error is None or not ctx.validation or not isinstance(planner, GlobalPlanPass):
        return False
    if ctx.validation["max_rel_l2"] <= cfg.max_rel_error:
        return False
    return ctx.plan_summary["budget_bytes"] < planner.max_budget()


def optimize(model: ModelLike, output: Optional[Union[str, Path]] = None,
             config: Optional[OptimizeConfig] = None, **options) -> OptimizeResult:
    """Compresses every eligible weight of ``model`` and (when ``output`` is given) writes the result.

    ``options`` are fields of :class:`OptimizeConfig` (e.g. ``method="rtn", bits=4``) and override
    ``config``.  Raises a :class:`~qsdonnx.errors.QsdError` subclass on bad input; raises
    :class:`ValidationFailed` (nothing written) when ``max_rel_error`` is missed, unless
    ``keep_on_fail`` is set, in which case the model is written and ``passed`` is False.
    """
    try:
        cfg = (config or OptimizeConfig()).replace(**options) if options else (config or OptimizeConfig())
    except TypeError as exc:
        raise ConfigError(f"unknown option: {exc}") from None
    in_path = None if isinstance(model, onnx.ModelProto) else Path(model)
    if output is not None:
        check_output_path(Path(output), in_path)
    if cfg.report is not None:
        check_output_path(Path(cfg.report), in_path, what="report")
    with stage("load"):
        ctx = _context(model, cfg)
    _front(ctx)
    if not ctx.candidates():
        raise NothingToCompress(f"nothing to compress: {nothing_to_compress(ctx)}; no output written")
    cfg = ctx.config = _large_model_defaults(ctx, cfg)
    if calibrates(cfg):
        from .passes.calibrate import CalibratePass
        CalibratePass()(ctx)
        if cfg.rotate:
            from .passes.rotate import RotateInputsPass
            RotateInputsPass()(ctx)
    elif cfg.sensitivity and cfg.bits_per_weight is not None:
        ctx.notes.append("no --calib data: the plan weighs per-layer weight errors only (no sensitivity on "
                         "generated inputs)")
    # The global plan needs a budget; "auto" without data or budget is round-to-nearest at --bits.
    global_plan = cfg.bits_per_weight is not None or (cfg.method == "auto" and ctx.calibration)
    planner = GlobalPlanPass() if global_plan else PlanPass()
    planner(ctx)
    if _streams(ctx, planner):
        # Nothing later needs every weight's factors at once: each weight is lowered as soon as
        # it is factorized and its factors dropped, so memory holds one weight, not the model.
        PrepareOpsetPass(planned_opset(ctx))(ctx)
        if _spills(ctx, output):
            # A model over the one-file limit: its new tensors go to disk as they are made
            # (the output is written with external data), so the output is never held either.
            from .store import TensorSpill

            ctx.spill = TensorSpill(Path(output).resolve().parent)
        try:
            lowering = _lowering(cfg)
            lowering.begin(ctx)
            sink = lowering.lower_one
            if ctx.calibration:
                # Bias correction needs only the layer's own factors: it goes with each weight.
                from .passes.bias import correct_bias

                def sink(ctx, rec, f, lower=lowering.lower_one):
                    correct_bias(ctx, rec, f)
                    lower(ctx, rec, f)
            FactorizeWeightsPass(sink=sink)(ctx)
            with stage(lowering.name):
                log.info("%s: %s", lowering.name, lowering.finish(ctx))
            if cfg.validate:
                ValidatePass()(ctx)
            return _finish(ctx, cfg, output)
        finally:
            if ctx.spill is not None:
                ctx.spill.remove()
    FactorizeWeightsPass()(ctx)
    # Kept only when a missed --max-rel-error may send the model round again.
    before_lowering = copy.deepcopy(ctx.model) if cfg.max_rel_error is not None else None
    while True:
        BiasCorrectionPass()(ctx)
        TunePass(cfg.epochs_to_tune)(ctx)
        PrepareOpsetPass(required_opset(ctx))(ctx)
        _lowering(cfg)(ctx)
        if cfg.validate:
            ValidatePass()(ctx)
        if not _should_spend_more(ctx, planner):
            break
        # Spend more: half a bit per weight more, re-chosen from the candidates already computed.
        budget = ctx.plan_summary["budget_bytes"] + 0.5 * planner.numel / 8.0
        log.info("relative error %.3e above --max-rel-error %g: raising the budget to %.3f bits per weight",
                 ctx.validation["max_rel_l2"], cfg.max_rel_error, 8.0 * budget / planner.numel)
        ctx.model = copy.deepcopy(before_lowering)
        ctx.factorizations.clear()
        planner.choose(ctx, min(budget, planner.max_budget()))
        FactorizeWeightsPass()(ctx)
    passed = True
    if cfg.max_rel_error is not None and ctx.validation:
        reached = ctx.validation["max_rel_l2"]
        if reached > cfg.max_rel_error:
            passed = False
            spent = ctx.plan_summary.get("spent_bpw")
            msg = (f"relative output error {reached:.3e} exceeds --max-rel-error {cfg.max_rel_error:g}"
                   + (f" (reached at {spent:.3f} bits per weight)" if spent else ""))
            if not cfg.keep_on_fail:
                raise ValidationFailed(msg + "; nothing written (use --keep-on-fail to keep the model)")
            log.warning(msg)
    return _finish(ctx, cfg, output, passed)


def _streams(ctx: Context, planner) -> bool:
    """Whether each weight can be lowered right after it is factorized: no pass between the two
    needs all factors (tuning fits them together; the spend-more loop re-plans; bias correction
    needs only the weight's own), and the opset the lowering needs is known from the plan."""
    cfg = ctx.config
    return (cfg.epochs_to_tune == 0 and cfg.max_rel_error is None
            and isinstance(planner, PlanPass) and not ctx.factorizations and planned_opset(ctx) is not None)


def _spills(ctx: Context, output) -> bool:
    """Whether new tensors are written to disk as they are made: when there is an output, it may
    have external data, and the input is over protobuf's one-file limit (so its weights are in
    external data) or external data is asked for."""
    from .passes.save import PROTOBUF_LIMIT

    ext = ctx.config.external_data
    return output is not None and ext is not False and (ext is True or ctx.original_file_size > PROTOBUF_LIMIT)


def _finish(ctx: Context, cfg: OptimizeConfig, output, passed: bool = True) -> OptimizeResult:
    """Writes the output and the report."""
    size = None
    if output is not None:
        import time
        t = time.perf_counter()
        with stage("save"):
            size = save_model(ctx.model, Path(output), base_dir=ctx.base_dir,
                              external_data=True if ctx.spill is not None else cfg.external_data, spill=ctx.spill)
        ctx.timings["save"] = time.perf_counter() - t
    report = Report.from_context(ctx, size)
    if cfg.report is not None:
        try:
            report.write_json(cfg.report)
        except OSError as exc:
            raise OutputError(f"cannot write report {cfg.report}: {exc.strerror or exc}") from None
    return OptimizeResult(model=ctx.model, report=report, output=Path(output) if output else None, passed=passed)


def inspect(model: ModelLike, config: Optional[OptimizeConfig] = None) -> list[WeightRecord]:
    """Every candidate weight: op, shape, size, where it lives, and what would be skipped and why."""
    with stage("load"):
        ctx = _context(model, config or OptimizeConfig(validate=False))
    _front(ctx)
    return ctx.records


def validate(original: ModelLike, compressed: ModelLike, inputs: Optional[Union[str, Path]] = None,
             input_shapes: Optional[dict] = None, num_inputs: int = 4, seed: int = 0,
             accuracy_level: int = 0) -> dict:
    """Runs both models in ONNX Runtime on the same inputs and returns per-output metrics."""
    orig_proto = original if isinstance(original, onnx.ModelProto) else load_model(Path(original))[0]
    if not isinstance(compressed, onnx.ModelProto):
        load_model(Path(compressed))
    feeds = (load_feeds(Path(inputs), orig_proto) if inputs is not None
             else generated_inputs(orig_proto, dict(input_shapes or {}), num_inputs, seed))
    src = lambda m: m if isinstance(m, onnx.ModelProto) else str(m)
    return compare_models(src(original), src(compressed), feeds, accuracy_level=accuracy_level)
