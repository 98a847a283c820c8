"""Planning each weight's method/bits/rank and running the factorizations."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
from tqdm import tqdm

from .layer_stats import LayerStats
from .workers import PARALLEL_MIN_ELEMENTS, Deferred, default_jobs, factorized, job_bytes
from ..factorize.budget import lowrank_nbytes, qsd_nbytes, rank_for_budget, rtn_nbytes
from ..factorize.linalg import weighted_error_fast
from ..factorize.lplr import lplr_factorize
from ..factorize.qsd_dictionary import dictionary_applicable, index_bits, qsd_dictionary, qsd_dictionary_nbytes
from ..factorize.pq import pq_applicable, pq_factorize, pq_nbytes
from ..factorize.trellis import TRELLIS_BITS, trellis_applicable, trellis_factorize, trellis_nbytes
from ..factorize.rtn import rtn_factorize, rtn_factorize_rows
from ..factorize.svd import svd_factorize
from ..factorize.types import CODES_PER_WORD, LEVEL_WORDS, Factorization, container_width, level_bits
from ..factorize.vq import VQ_CODE_BITS, VQ_DIM, vq_factorize, vq_group, vq_nbytes
from .lower_qdq import level_decoders, shared_decode_bytes
from ..config import DATA_AWARE_METHODS, LOWRANK_METHODS, OptimizeConfig
from ..errors import ConfigError
from .base import Context, Pass, WeightRecord

log = logging.getLogger("qsdonnx")

QUANT_ONLY_VIEWS = ("conv-grouped", "embedding", "recurrent", "deconv", "tensor")
# Rows sharing one vector codebook (at most; a divisor of the reduction axis), by bits per
# weight: 256 centroids of a 4-bit codebook cost 0.17 bpw per 128 rows of a 384-wide layer,
# more than sharing them over 384 rows loses (MiniLM, held-out H-weighted error).
VQ_GROUPS = {2: 128, 3: 128, 4: 384}
VQ_VIEWS = ("matmul", "matmul-left", "gemm", "conv", "conv-grouped")
CALDERA_FACTOR_BITS = 4  # CALDERA's low-rank factors; --bits sets the backbone Q
# GPTQ's damping λ = GPTQ_DAMP · mean(diag H), also used by CALDERA for its backbone and its
# low-rank fit.  Calibration sets of a few hundred sentences under-determine H; on MiniLM 0.1
# gave 0.986 mean cosine at 4 bits/128 against 0.983 at 0.01, and CALDERA at 3 bpw 0.936
# against 0.923 (its low-rank fit chased directions only the calibration rows have).
GPTQ_DAMP = 0.1


@dataclass(frozen=True)
class LayerChoice:
    """One concrete way to compress one weight.  QSD's sub-vector form (``atoms > 0``) reads
    ``block_size`` as the vector length and ``bits`` as the coefficient bits; ``levels`` (rtn
    and gptq) codes an alphabet of that many values in words of three (``types.LEVEL_WORDS``),
    ``bits`` then being the width it widens to."""

    method: str
    bits: int
    block_size: int
    rank: int = 0
    atoms: int = 0
    levels: Optional[int] = None

    @classmethod
    def of(cls, rec: WeightRecord) -> "LayerChoice":
        return cls(rec.method, rec.bits, rec.block_size, rec.rank, rec.atoms, rec.levels)

    def apply(self, rec: WeightRecord) -> None:
        rec.method, rec.bits, rec.block_size, rec.rank, rec.atoms, rec.levels = (
            self.method, self.bits, self.block_size, self.rank, self.atoms, self.levels)

    def nbytes(self, K: int, N: int, cfg: OptimizeConfig, dense_dtype: str = "float32") -> int:
        """Stored bytes: codes at their own width (3-bit codes are stored as a 3-bit stream in
        every format, level codes in words of three), zero points at the container width."""
        c = self.bits  # code width
        if self.method == "pq":  # block_size is the sub-vector length
            return pq_nbytes(K, N, self.block_size, scale_dtype=cfg.scale_dtype)
        if self.method == "trellis":
            return trellis_nbytes(K, N, scale_dtype=cfg.scale_dtype)
        if self.atoms:
            return qsd_dictionary_nbytes(K, N, self.block_size, self.atoms, self.bits, 1, cfg.scale_dtype)
        if self.method == "vq":  # block_size is the rows sharing one codebook
            return vq_nbytes(K, N, VQ_DIM, VQ_CODE_BITS[self.bits], self.block_size, cfg.scale_dtype)
        if self.method in ("rtn", "gptq"):
            return rtn_nbytes(K, N, c, self.block_size, cfg.symmetric, cfg.scale_dtype, self.levels)
        if self.method == "svd":
            return lowrank_nbytes(K, N, self.rank, None, None, self.block_size, cfg.symmetric,
                                     cfg.scale_dtype, dense_dtype=dense_dtype)
        if self.method == "caldera":
            return (rtn_nbytes(K, N, c, self.block_size, cfg.symmetric, cfg.scale_dtype)
                    + lowrank_nbytes(K, N, self.rank, CALDERA_FACTOR_BITS, CALDERA_FACTOR_BITS, self.block_size,
                                     cfg.symmetric, cfg.scale_dtype))
        if self.method == "qsd" and cfg.sparsity > 0:
            return qsd_nbytes(K, N, self.rank, c, self.block_size, cfg.sparsity, cfg.symmetric, cfg.scale_dtype)
        return lowrank_nbytes(K, N, self.rank, c, c, self.block_size, cfg.symmetric, cfg.scale_dtype)

    def decoders(self) -> set[tuple[str, int]]:
        """The shared decoding constants this setting's codes need: ``("stream", width)`` for
        codes stored as a bit stream, ``("levels", L)`` for codes in words of three."""
        if self.method == "vq":
            cb = VQ_CODE_BITS[self.bits]
            return {("stream", cb)} if cb < 8 else set()
        if self.method in ("pq", "trellis", "svd"):
            return set()
        if self.atoms:
            return {("stream", b) for b in (index_bits(self.atoms), self.bits) if b < 8}
        if self.levels is not None:
            return level_decoders(self.levels)
        return {("stream", self.bits)} if self.bits != container_width(self.bits) else set()

    def label(self) -> str:
        if self.method == "pq":
            return f"pq {self.bits}b d={self.block_size}"
        if self.method == "trellis":
            return f"trellis {self.bits}b"
        if self.atoms:
            return f"{self.method} d={self.block_size} atoms={self.atoms} coef {self.bits}b"
        if self.method == "svd":
            s = "svd"
        elif self.levels is not None:
            s = f"{self.method} {self.levels} levels/{self.block_size}"
        else:
            s = f"{self.method} {self.bits}b/{self.block_size}"
        return s + (f" r={self.rank}" if self.rank else "")


# QSD's sub-vector forms, by bits per weight: (vector length, dictionary atoms, coefficient
# bits), one stored entry per vector, so (log2(atoms) + coefficient bits) / length bits per
# weight.  On MiniLM's layers at 3 bpw, 256 four-row shapes with 4-bit gains came within 1 % of
# GPTQ's held-out error; two entries per vector (8 rows, 256 atoms, 4-bit coefficients) gave
# 20-28 % more error than one.
QSD_FORMS = {2.0: (4, 64, 2), 2.5: (4, 128, 3), 3.0: (4, 256, 4), 3.5: (2, 32, 2), 4.0: (2, 32, 3),
             4.5: (2, 64, 3), 5.0: (2, 128, 3), 6.0: (2, 256, 4)}


def qsd_dictionary_setting(K: int, N: int, bpw: float) -> Optional[LayerChoice]:
    """QSD's sub-vector form at ``bpw`` (a key of ``QSD_FORMS``), None when it does not apply."""
    dim, atoms, coef = QSD_FORMS[bpw]
    return LayerChoice("qsd", coef, dim, 0, atoms) if dictionary_applicable(K, N, dim, atoms) else None


def vq_setting(K: int, bits: int) -> Optional[LayerChoice]:
    """Vector codes at ``bits`` per weight for a reduction axis of ``K`` (None: K cannot be cut
    into codebook groups of 2-row vectors)."""
    g = vq_group(K, VQ_GROUPS[bits])
    return LayerChoice("vq", bits, g) if g else None


def effective_block(block: int, K: int) -> int:
    """Blocks longer than the reduction axis are clipped to it (one block per column)."""
    return max(1, min(block, K))


def embedding_block(block: int, D: int) -> int:
    """Embedding rows are unpacked in whole blocks, so the block must divide the row width D:
    the largest halving of ``block`` that does, or one block per row."""
    b = min(block, D)
    while b >= 8 and D % b:
        b //= 2
    return b if b >= 8 and D % b == 0 else D


def uniform_choice(rec: WeightRecord, cfg: OptimizeConfig) -> tuple[Optional[LayerChoice], str]:
    """The choice for one weight from the flags and overrides; ``(None, reason)`` to skip."""
    K, N = rec.matrix_shape
    ov = cfg.override_for(rec.name)
    method = (ov.method if ov and ov.method else cfg.method)
    bits = (ov.bits if ov and ov.bits else cfg.bits)
    levels = ov.levels if ov and (ov.bits or ov.levels) else cfg.levels
    block = effective_block(ov.block_size if ov and ov.block_size else cfg.block_size, K)
    if rec.view == "embedding":
        block = embedding_block(block, K)
    rank = ov.rank if ov and ov.rank else cfg.rank
    note = ""
    if method == "auto":
        # Without calibration data nothing is fitted: round-to-nearest.
        method = "gptq" if rec.view != "embedding" and cfg.calib is not None else "rtn"
    if levels is not None:
        if rec.view == "embedding" or method not in ("rtn", "gptq"):
            # Table rows are decoded at run time, from whole-width codes: the widest that
            # stays within the asked rate.
            bits = LEVEL_WORDS[levels] // CODES_PER_WORD
            note = (f"{levels}-level codes apply to rtn and gptq on MatMul, Gemm and Conv; "
                    f"{bits}-bit codes")
            levels = None
        else:
            bits = level_bits(levels)
    if rec.view in QUANT_ONLY_VIEWS and method in LOWRANK_METHODS:
        note = f"{method} does not apply to {rec.view} weights; quantized only"
        method = "rtn"
    if rec.view == "embedding" and method in DATA_AWARE_METHODS:
        method = "rtn"  # a lookup table has no activations to weight the error with
    if method == "pq":
        if bits not in PQ_SUB_DIMS:
            raise ConfigError(f"pq stores 2, 4 or 8 code bits per value, not {bits}")
        if rec.view != "embedding":
            note, method = "pq applies to Gather tables only; quantized with rtn", "rtn"
        elif not pq_applicable(K, N, PQ_SUB_DIMS[bits]):
            note, method = f"pq needs the row width divisible by {PQ_SUB_DIMS[bits]} and enough rows; rtn", "rtn"
        else:
            return LayerChoice("pq", bits, PQ_SUB_DIMS[bits]), ""
    if method == "trellis":
        if rec.view != "embedding":
            note, method = "trellis codes apply to Gather tables only; quantized with rtn", "rtn"
        elif not trellis_applicable(K, N):
            note, method = "trellis codes need whole bytes of 2-bit symbols per row and at least 2048 rows; rtn", "rtn"
        else:
            return LayerChoice("trellis", TRELLIS_BITS, 0), ""
    if method == "vq":
        if bits not in VQ_CODE_BITS:
            raise ConfigError(f"vq stores 2, 3 or 4 bits per weight, not {bits}")
        if vq_setting(K, bits) is None:  # (tables were turned to rtn above)
            note, method = f"vq needs an even reduction axis ({K}); rtn", "rtn"
    dense = rec.dtype if rec.dtype in ("float32", "float16") else "float32"
    budget_bytes = None
    if cfg.bits_per_weight is not None:
        budget_bytes = cfg.bits_per_weight * K * N / 8.0
    if method in ("rtn", "gptq", "vq"):
        def setting(b: int) -> LayerChoice:
            if method == "vq":
                return vq_setting(K, b)
            return LayerChoice(method, b, block, levels=levels)

        if budget_bytes is not None and not (ov and ov.bits) and levels is None:
            fitting = [b for b in (8, 4, 3, 2) if (method != "vq" or b in VQ_CODE_BITS)
                       and setting(b).nbytes(K, N, cfg) <= budget_bytes]
            if not fitting:
                return None, f"--bits-per-weight {cfg.bits_per_weight} is below the cheapest {method} setting"
            bits = fitting[0]
        choice = setting(bits)
    elif (method == "qsd" and rank is None and cfg.sparsity == 0 and budget_bytes is None
          and rec.view in VQ_VIEWS and float(bits) in QSD_FORMS
          and qsd_dictionary_setting(K, N, float(bits)) is not None):
        # Without a rank or sparsity, QSD codes sub-vectors at --bits per weight.
        choice = qsd_dictionary_setting(K, N, float(bits))
    else:
        limit = min(K, N)
        if rank is not None:
            if rank > limit:
                raise ConfigError(f"rank {rank} is larger than weight {rec.name!r} allows (min(K, N) = {limit})")
        else:
            if budget_bytes is None:
                # Without a budget, spend what round-to-nearest at --bits would.
                budget_bytes = LayerChoice("rtn", bits, block).nbytes(K, N, cfg)
            rank = rank_for_budget(
                K, N, 8.0 * budget_bytes / (K * N),
                lambda r: LayerChoice(method, bits, block, r).nbytes(K, N, cfg, dense))
            if rank < 1:
                return None, f"budget too small for a rank-1 {method} factorization"
        choice = LayerChoice(method, bits, block, rank)
    if choice.nbytes(K, N, cfg, dense) >= rec.bytes_before:
        return None, f"{choice.label()} would not be smaller than the original"
    if note:
        rec.extra["note"] = note
    return choice, ""


class PlanPass(Pass):
    """Chooses method, bits, block and rank for every candidate weight."""

    name = "plan"

    def run(self, ctx: Context) -> str:
        cfg = ctx.config
        for rec in ctx.candidates():
            choice, reason = uniform_choice(rec, cfg)
            if choice is None:
                rec.skip(reason)
                ctx.weights.pop(rec.name, None)
                continue
            choice.apply(rec)
        return f"{len(ctx.candidates())} weights planned"


def run_choice(W: np.ndarray, choice: LayerChoice, cfg: OptimizeConfig, H: Optional[np.ndarray],
               dense_dtype: str) -> Factorization:
    """Dispatches one weight to its algorithm (all math lives in ``qsdonnx.factorize``)."""
    m = choice.method
    common = dict(block_size=choice.block_size, symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype)
    if runs_by_rows(choice, H):
        return rtn_factorize(W, choice.bits, clip_search=cfg.clip_search, levels=choice.levels, **common)
    if m == "gptq":
        from ..factorize.gptq import gptq_factorize
        return gptq_factorize(W, H, choice.bits, damp=GPTQ_DAMP, act_order=True, levels=choice.levels, **common)
    if m in ("vq", "vq-fast"):
        return vq_factorize(W, H, choice.bits, choice.block_size, damp=GPTQ_DAMP, scale_dtype=cfg.scale_dtype,
                            seed=cfg.seed, feedback=m == "vq")
    if m == "pq":
        return pq_factorize(W, choice.block_size, scale_dtype=cfg.scale_dtype, seed=cfg.seed)
    if m == "trellis":
        return trellis_factorize(W, scale_dtype=cfg.scale_dtype, seed=cfg.seed)
    if m == "svd":
        return svd_factorize(W, choice.rank, dtype=dense_dtype)
    if m == "lplr":
        return lplr_factorize(W, choice.rank, choice.bits, choice.bits, seed=cfg.seed, **common)
    if m in ("caldera", "caldera-fast"):
        from ..factorize.caldera import caldera_factorize
        return caldera_factorize(W, H if H is not None else np.eye(W.shape[0], dtype=np.float32),
                                 choice.rank, choice.bits, CALDERA_FACTOR_BITS,
                                 iters=1 if m == "caldera-fast" else 3, lr_iters=1,
                                 damp=GPTQ_DAMP, lr_damp=GPTQ_DAMP, **common)
    if m in ("qsd", "qsd-fast") and choice.atoms:
        return qsd_dictionary(W, H, choice.block_size, choice.atoms, choice.bits, damp=GPTQ_DAMP,
                              scale_dtype=cfg.scale_dtype, seed=cfg.seed, feedback=m == "qsd")
    if m == "qsd":
        from ..factorize.qsd import qsd_factorize
        return qsd_factorize(W, H, choice.rank, choice.bits, sparsity=cfg.sparsity, seed=cfg.seed, **common)
    raise ConfigError(f"unknown method {m!r}")


def runs_by_rows(choice: LayerChoice, H: Optional[np.ndarray]) -> bool:
    """Whether ``choice`` is round-to-nearest (also GPTQ without ``H``), which needs only a few
    rows of its weight at a time (every block's grid is its own), so the weight is never held
    whole (:func:`run_rows`)."""
    return choice.method == "rtn" or (choice.method == "gptq" and H is None)


def run_rows(read, shape: tuple[int, int], choice: LayerChoice, cfg: OptimizeConfig) -> tuple[Factorization, dict]:
    """:func:`run_choice` and :func:`layer_errors` of a weight :func:`runs_by_rows` accepts, its
    rows ``a:b`` given by ``read(a, b)``; the same factors as :func:`run_choice`."""
    f, rel = rtn_factorize_rows(read, shape, choice.bits, choice.block_size, cfg.symmetric, cfg.scale_dtype,
                                cfg.clip_search, choice.levels)
    return f, {"rel_error": rel}


def layer_errors(W: np.ndarray, f: Factorization, H: Optional[np.ndarray]) -> dict:
    """The report's errors of one factorized weight: relative Frobenius error, and with ``H``
    the relative output error ``sqrt(tr(ΔᵀHΔ) / tr(WᵀHW))``."""
    out = {"rel_error": f.error_norm(W) / (float(np.linalg.norm(W)) or 1.0)}
    if H is not None:
        out["output_rel_error"] = float(np.sqrt(relative_error(W, f.dense(), H)))
    return out


def measure_layer(rec: WeightRecord, W: np.ndarray, f: Factorization, H: Optional[np.ndarray],
                  errors: Optional[dict] = None) -> None:
    """Records :func:`layer_errors` (given, or measured here) and the factors' bytes."""
    errors = layer_errors(W, f, H) if errors is None else errors
    rec.rel_error = errors["rel_error"]
    if "output_rel_error" in errors:
        rec.extra["output_rel_error"] = errors["output_rel_error"]
    rec.extra["factor_bytes"] = f.nbytes()


class FactorizeWeightsPass(Pass):
    """Runs each planned weight's factorization and measures its relative error."""

    name = "factorize"

    def __init__(self, sink=None):
        # ``sink(ctx, rec, f)``, when given, takes each factorization as soon as it is measured
        # (the lowering, in streamed runs); the factors are then not kept.
        self.sink = sink

    def _done(self, ctx: Context, rec, f) -> None:
        rec.status = "compressed"
        if self.sink is not None:
            self.sink(ctx, rec, f)
            f = None
        ctx.factorizations[rec.name] = f

    def run(self, ctx: Context) -> str:
        cfg = ctx.config
        todo = ctx.candidates()
        pending = [rec for rec in todo if rec.name not in ctx.factorizations]
        numel = sum(int(np.prod(rec.matrix_shape)) for rec in pending)
        workers = min(cfg.jobs or default_jobs(), len(pending)) if numel >= PARALLEL_MIN_ELEMENTS else 1

        def jobs():
            for rec in pending:
                H = self._deferred_h(ctx, rec.name)
                dense = rec.dtype if rec.dtype in ("float32", "float16") else "float32"
                # (A weight in external data is read where it is factorized, a few rows at a
                # time when its method allows.)
                yield ctx.weights.source(rec.name), LayerChoice.of(rec), cfg, H, dense

        with contextlib.ExitStack() as stack:
            if cfg.ray is not None:
                # Every weight goes to a Ray task; --jobs caps the tasks in flight (the weights
                # this process holds), by default one per CPU of the cluster.
                from . import cluster

                cpus = stack.enter_context(cluster.Cluster(cfg.ray)).cpus()
                workers = min(cfg.jobs or cpus, max(1, len(pending)))
                results = cluster.remote_results(cluster.cluster_jobs(jobs()), workers)
                where = f" (Ray at {cfg.ray}: {cpus} CPUs, {workers} tasks at a time)"
            else:
                costs = [job_bytes(int(np.prod(rec.matrix_shape)), getattr(self._deferred_h(ctx, rec.name), "nbytes", 0))
                         for rec in pending]
                results = factorized(jobs(), max(1, workers), costs)
                where = f" ({workers} workers)" if workers > 1 else ""
            self._consume(ctx, todo, results, where)
        return f"{len(todo)} weights factorized{where}"

    @staticmethod
    def _deferred_h(ctx: Context, name: str):
        """The weight's ``H``: the array, or where a worker reads it when it is kept on disk."""
        stats = ctx.calibration.get(name) if ctx.calibration else None
        if not stats or "H" not in stats:
            return None
        if isinstance(stats, LayerStats) and "H" in stats.files:
            return Deferred(lambda: stats["H"], stats.matrix_bytes("H"))
        return stats["H"]

    def _consume(self, ctx: Context, todo: list, results, where: str) -> None:
        """Takes each weight's factors (computed by the planner, or the next of ``results``)
        through measurement and the sink, in order."""
        cfg = ctx.config
        desc = "factorizing" + where + ", bytes read"
        # Progress in bytes read, so that the remaining time is right for weights of any size;
        # the postfix counts weights and the bytes their results take.
        bar = tqdm(total=sum(rec.bytes_before for rec in todo), desc=desc, unit="B", unit_scale=True,
                   unit_divisor=1024, disable=not cfg.progress, leave=False)
        written = 0
        for done, rec in enumerate(todo, 1):
            f = ctx.factorizations.get(rec.name)
            if f is not None:  # chosen (and computed) by the global planner
                W = ctx.weights[rec.name]
                H = ctx.calibration.get(rec.name, {}).get("H") if ctx.calibration else None
                measure_layer(rec, W, f, H)
                del W
            else:
                f, errors = next(results)
                measure_layer(rec, None, f, None, errors)
            self._done(ctx, rec, f)
            written += rec.bytes_after or rec.extra.get("factor_bytes", 0)
            bar.set_postfix_str(f"{done}/{len(todo)} weights, {written / 2**20:.1f} MiB written", refresh=False)
            bar.update(rec.bytes_before)
        bar.close()


# --- the global planner -----------------------------------------------------------------------

PQ_SUB_DIMS = {2: 4, 4: 2, 8: 1}  # code bits per value -> sub-vector length (8-bit codes)
PLAN_TRELLIS_MAX_VALUES = 1 << 25  # larger tables: the Viterbi search takes minutes, not offered unasked
PLAN_PQ_BITS = (2,)  # the planner's product-quantized table setting (finer ones cost more time than they gain)
PLAN_BITS = (2, 3, 4, 8)
# Code alphabets between the integer widths the planner offers beside them.  None: offered,
# level codes lowered the planner's predicted error by 10 % on MiniLM at 3 bpw but not the
# measured one (held-out cosine 0.9805 with them, 0.9807 without), and raised PP-OCRv4 rec's output error
# (3 bpw: 0.262 against 0.254, CER 3.5 % against 2.2 %): the round-to-nearest estimates flatter
# them, since GPTQ's error feedback gains less on them than on the widths.  --levels asks.
PLAN_LEVELS: tuple[int, ...] = ()
PLAN_BLOCKS = (32, 64, 128)
PLAN_RANK_BPW = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)  # low-rank candidates: ranks spending these bpw


PROXIES = {"gptq": "rtn", "qsd": "lplr", "caldera": "caldera-fast", "vq": "vq-fast"}


def proxy_of(choice: LayerChoice) -> Optional[str]:
    """The fast method predicting ``choice``'s error, if it has one."""
    if choice.method == "qsd" and choice.atoms:
        return "qsd-fast"
    return PROXIES.get(choice.method)


def quantized_choices(method: str, blocks, view: str, levels: Optional[int] = None) -> list[LayerChoice]:
    """Block-quantized settings: every planned width and block, and (except for Gather tables,
    whose rows are decoded at run time) every planned alphabet between the widths, and the one
    ``--levels`` asks for."""
    out = [LayerChoice(method, b, blk) for b in PLAN_BITS for blk in blocks]
    if view != "embedding":
        alphabets = sorted(set(PLAN_LEVELS) | ({levels} if levels else set()))
        out += [LayerChoice(method, level_bits(L), blk, levels=L) for L in alphabets for blk in blocks]
    return out


def candidate_choices(rec: WeightRecord, cfg: OptimizeConfig, has_h: bool) -> list[LayerChoice]:
    """Every setting the planner may pick for one weight (method × bits × block × rank)."""
    K, N = rec.matrix_shape
    ov = cfg.override_for(rec.name)
    method = ov.method if ov and ov.method else cfg.method
    if ov and (ov.bits or ov.levels or ov.rank):
        choice, _ = uniform_choice(rec, cfg)
        return [choice] if choice else []
    blocks = sorted({effective_block(b, K) for b in PLAN_BLOCKS + (cfg.block_size,)})
    if rec.view == "embedding":
        blocks = [b for b in blocks if K % b == 0] or [K]
    quant = "gptq" if has_h else "rtn"
    tables = []  # product and trellis codes of a Gather table
    if rec.view == "embedding" and method in ("auto", "pq", "vq"):  # vq: tables get sub-vector codes too
        tables = [LayerChoice("pq", b, PQ_SUB_DIMS[b]) for b in PLAN_PQ_BITS
              if pq_applicable(K, N, PQ_SUB_DIMS[b])]
        if method == "pq" and tables:
            return tables
    if (rec.view == "embedding" and trellis_applicable(K, N)
            and (method == "trellis" or (method in ("auto", "vq") and K * N <= PLAN_TRELLIS_MAX_VALUES))):
        tables.append(LayerChoice("trellis", TRELLIS_BITS, 0))
        if method == "trellis":
            return tables
    if method in ("pq", "trellis"):  # not a table, or one too small for codes
        method = "rtn"
    vq = []
    # Only when asked for: vector codes are decoded to a float weight when the model is loaded,
    # which raised the peak memory of loading MiniLM to 376 MiB (213 for the original).
    if rec.view in VQ_VIEWS and method == "vq":
        vq = [c for c in (vq_setting(K, b) for b in VQ_CODE_BITS) if c is not None]
    if method == "vq":
        if vq:
            return vq
        method = "rtn"
    if rec.view in QUANT_ONLY_VIEWS or method in ("rtn", "gptq"):
        m = method if method in ("rtn", "gptq") and has_h else "rtn"
        if method == "auto" and rec.view not in QUANT_ONLY_VIEWS:
            m = quant
        return quantized_choices(m, blocks, rec.view, cfg.levels) + tables + vq
    out: list[LayerChoice] = []
    if method == "auto":
        return quantized_choices(quant, blocks, rec.view, cfg.levels) + vq
    bits = ov.bits if ov and ov.bits else cfg.bits
    # CALDERA's backbone: 2 bits with a low-rank correction is its point; 4 bits as a step up.
    q_bits = (bits,) if method != "caldera" or (ov and ov.bits) else (2, 4)
    blk = effective_block(cfg.block_size, K)
    ladder = PLAN_RANK_BPW + ((cfg.bits_per_weight,) if cfg.bits_per_weight else ())
    found = set()
    for qb in q_bits:
        for bpw in ladder:
            r = rank_for_budget(K, N, bpw, lambda r: LayerChoice(method, qb, blk, r).nbytes(K, N, cfg, rec.dtype))
            if r >= 1:
                found.add((qb, r))
    out = [LayerChoice(method, qb, blk, r) for qb, r in sorted(found)]
    if method == "qsd" and rec.view in VQ_VIEWS and not (ov and ov.bits) and not cfg.sparsity and cfg.rank is None:
        out += [c for c in (qsd_dictionary_setting(K, N, b) for b in QSD_FORMS) if c is not None]
    if method == "caldera" and not (ov and ov.bits):
        # Rank 0 is CALDERA's backbone alone (LDLQ = GPTQ rounding): the planner keeps it for
        # layers where no low-rank correction pays for its bytes.
        out += quantized_choices(quant, blocks, rec.view, cfg.levels)
    return out


def calibrate_dictionary_estimates(W: np.ndarray, H: Optional[np.ndarray], cands: list, cfg: OptimizeConfig,
                                   energy: float) -> None:
    """Rescale the fast estimates of QSD's sub-vector forms by what error feedback does to them.

    The fast estimate (k-means dictionary, plain pursuit) leaves out the error feedback that
    the real fit uses, which on MiniLM's layers removes 30-75 % of the weighted error; the
    low-rank forms beside them are estimated far more closely.  One form per layer (the one
    nearest the budget's bits per weight, else ``--bits``) is fitted with feedback for one round, and every sub-vector estimate
    of the layer is scaled by the ratio of the two errors.  (The sensitivity probes keep the
    unscaled pairs: each probe's reconstruction is the fast one.)"""
    dict_idx = [i for i, c in enumerate(cands) if c.payload[0].atoms]
    if not dict_idx:
        return
    target = cfg.bits_per_weight if cfg.bits_per_weight is not None else float(cfg.bits)
    ref = min(dict_idx, key=lambda i: abs(8.0 * cands[i].nbytes / W.size - target))
    c = cands[ref].payload[0]
    if cands[ref].predicted_error <= 0:
        return
    f = qsd_dictionary(W, H, c.block_size, c.atoms, c.bits, rounds=1, damp=GPTQ_DAMP,
                       scale_dtype=cfg.scale_dtype, seed=cfg.seed)
    ratio = relative_error(W, f.dense(), H, energy) / cands[ref].predicted_error
    for i in dict_idx:
        cands[i].predicted_error *= ratio


def relative_error(W: np.ndarray, What: np.ndarray, H: Optional[np.ndarray],
                   energy: Optional[float] = None) -> float:
    """``tr(ΔᵀHΔ) / tr(WᵀHW)``: the layer's relative output error² (Frobenius when no H);
    ``energy`` is ``tr(WᵀHW)`` when already known."""
    if energy is None:
        energy = weighted_error_fast(W, np.zeros_like(W), H)
    return weighted_error_fast(W, What, H) / max(energy, 1e-30)


def plan_with_decoders(options: list, budget: float) -> list[int]:
    """``plan_allocation`` that pays for the decoding constants the chosen codes share: bit
    streams take a few hundred bytes per model, the digit table of level codes up to 5 KiB,
    which on a small model is more than those codes save.  Starting from the settings that need
    no shared constants, the decoders (with every setting that needs them) are admitted one
    group at a time, the group whose plan, within the budget less the admitted constants, has
    the least total predicted error first, while that error falls."""
    from ..factorize.planner import plan_allocation

    def needs(c) -> frozenset:
        return frozenset(c.payload[0].decoders())

    def attempt(allowed: frozenset):
        kept = [[i for i, c in enumerate(cands) if needs(c) <= allowed] for cands in options]
        if any(not k for k in kept):
            return None
        try:
            picks = plan_allocation([[cands[i] for i in k] for cands, k in zip(options, kept)],
                                    budget - shared_decode_bytes(allowed))
        except ValueError:
            return None
        chosen = [k[i] for k, i in zip(kept, picks)]
        return sum(cands[i].predicted_error for cands, i in zip(options, chosen)), chosen

    # A layer that has only stream-coded settings admits the decoders of its cheapest one.
    allowed = frozenset().union(*(needs(min(cands, key=lambda c: c.nbytes)) for cands in options
                                  if all(needs(c) for c in cands)))
    best = attempt(allowed)
    groups = {needs(c) for cands in options for c in cands}
    while True:
        trials = [t for t in (attempt(allowed | g) for g in groups if not g <= allowed) if t is not None]
        better = [t for t in trials if best is None or t[0] < best[0]]
        if not better:
            break
        best = min(better, key=lambda t: t[0])
        allowed = allowed.union(*(needs(cands[i]) for cands, i in zip(options, best[1])))
    if best is None:
        raise ValueError(f"budget of {budget:.0f} bytes is below the cheapest candidate of every layer")
    return best[1]


class GlobalPlanPass(Pass):
    """``--bits-per-weight`` as one budget over all weights: factorize every candidate setting,
    predict its output error from ``H``, and pick one per layer minimizing the total predicted
    error within the budget (Lagrangian allocation, ``qsdonnx.factorize.planner``)."""

    name = "plan"

    def run(self, ctx: Context) -> str:
        from ..factorize.planner import Candidate

        cfg = ctx.config
        recs = ctx.candidates()
        options: list[list] = []
        kept: list[WeightRecord] = []
        probes: dict = {}
        bar = tqdm(recs, desc="planning", unit="weight", disable=not cfg.progress, leave=False)
        for rec in bar:
            W = ctx.weights[rec.name]
            stats = ctx.calibration.get(rec.name, {})
            H = stats.get("H")
            # A candidate fitted to the calibration data is fitted on one half of it and judged
            # on the other: judged on the rows it was fitted to, a low-rank correction looks
            # better than it is on new data.
            H_fit, H_check = stats.get("H_fit"), stats.get("H_check")
            held_out = H_fit is not None and H_check is not None
            K, N = rec.matrix_shape
            energy = weighted_error_fast(W, np.zeros_like(W), H)
            energy_check = weighted_error_fast(W, np.zeros_like(W), H_check) if held_out else None
            cands = []
            dense_of = []  # reconstructions, kept only until the sensitivity probe is chosen
            for choice in candidate_choices(rec, cfg, H is not None):
                nbytes = choice.nbytes(K, N, cfg, rec.dtype)
                if nbytes >= rec.bytes_before:
                    continue
                proxy = proxy_of(choice)
                if proxy is not None:
                    # The iterative methods cost seconds per setting; each setting's error is
                    # predicted from a fast method on the same grid and rank that it improves on
                    # (GPTQ from round-to-nearest, vector codes from plain k-means codebooks, QSD's
                    # low-rank forms from LPLR, its sub-vector forms from a k-means dictionary,
                    # rescaled below), and only the chosen one is run.
                    fitted = proxy == "caldera-fast"
                    est = run_choice(W, replace(choice, method=proxy), cfg, (H_fit if held_out else H) if fitted else None, rec.dtype)
                    dense_of.append(est.dense())
                    err = (relative_error(W, dense_of[-1], H_check, energy_check) if fitted and held_out
                           else relative_error(W, dense_of[-1], H, energy))
                    cands.append(Candidate(nbytes=nbytes, predicted_error=err, payload=(choice, None)))
                    continue
                f = run_choice(W, choice, cfg, H, rec.dtype)
                dense_of.append(f.dense())
                cands.append(Candidate(nbytes=nbytes, predicted_error=relative_error(W, dense_of[-1], H, energy),
                                       payload=(choice, f)))
            if not cands:
                rec.skip("no compressed setting is smaller than the original")
                continue
            # Probe where the plan will land (the setting nearest the budget's bits per weight;
            # without a budget, the median size) and at the cheapest (where damage can grow
            # faster than the first-order model says).
            order = sorted(range(len(cands)), key=lambda i: cands[i].nbytes)
            near = order[len(order) // 2]
            if cfg.bits_per_weight is not None:
                near = min(order, key=lambda i: abs(8.0 * cands[i].nbytes / rec.numel - cfg.bits_per_weight))
            picks = sorted({order[0], near})
            probes[rec.name] = [(dense_of[i], cands[i].predicted_error) for i in picks]
            calibrate_dictionary_estimates(W, H, cands, cfg, energy)
            options.append(cands)
            kept.append(rec)
        if cfg.sensitivity and len(kept) > 1 and ctx.calib_info:
            from .calibrate import calibration_feeds
            from .sensitivity import measure_sensitivity

            feeds = calibration_feeds(ctx, warn=False)[:2]
            alphas = measure_sensitivity(ctx, probes, feeds, progress=cfg.progress)
            for rec, cands in zip(kept, options):
                a = alphas[rec.name]
                rec.extra["sensitivity"] = a
                for c in cands:
                    c.predicted_error *= a
        probes.clear()
        self.kept, self.options = kept, options
        self.numel = sum(r.numel for r in kept)
        if cfg.bits_per_weight is not None:
            budget = cfg.bits_per_weight * self.numel / 8.0
        else:
            # Without a budget, what round-to-nearest at --bits (or --levels) would spend.
            bits = level_bits(cfg.levels) if cfg.levels else cfg.bits
            budget = sum(LayerChoice("rtn", bits, effective_block(cfg.block_size, r.matrix_shape[0]), levels=cfg.levels)
                         .nbytes(*r.matrix_shape, cfg) for r in kept)
        cheapest = sum(min(c.nbytes for c in cands) for cands in options) + ctx.rotation.get("bytes", 0)
        if cheapest > budget:
            raise ConfigError(f"--bits-per-weight {cfg.bits_per_weight} is below the cheapest plan "
                              f"({8.0 * cheapest / self.numel:.3f} bits per weight)")
        self.choose(ctx, budget)
        numel, spent = self.numel, ctx.plan_summary["spent_bytes"]
        return (f"{len(kept)} weights planned: {8.0 * spent / max(numel, 1):.3f} of "
                f"{8.0 * budget / max(numel, 1):.3f} bits per weight")

    def max_budget(self) -> float:
        return float(sum(max(c.nbytes for c in cands) for cands in self.options))

    def choose(self, ctx: Context, budget: float) -> None:
        """Picks one candidate per layer within ``budget`` bytes (candidates already computed)."""
        # The input rotation (passes.rotate) is stored once beside the weights.
        rotation = ctx.rotation.get("bytes", 0)
        budget_left = budget - rotation
        picks = plan_with_decoders(self.options, budget_left)
        spent = rotation
        choices = {}
        for rec, cands, i in zip(self.kept, self.options, picks):
            c = cands[i]
            choice, f = c.payload
            choice.apply(rec)
            rec.predicted_error = c.predicted_error
            rec.status = "candidate"
            rec.extra["candidates"] = len(cands)
            if f is not None:
                ctx.factorizations[rec.name] = f
            spent += c.nbytes
            choices[rec.name] = choice.label()
        numel = self.numel
        ctx.plan_summary = {"budget_bytes": budget, "spent_bytes": spent,
                            "budget_bpw": 8.0 * budget / numel if numel else None,
                            "spent_bpw": 8.0 * spent / numel if numel else None,
                            "predicted_total_error": float(sum(self.options[k][i].predicted_error
                                                               for k, i in enumerate(picks))),
                            "choices": choices}
