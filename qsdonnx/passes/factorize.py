"""Planning each weight's method/bits/rank and running the factorizations."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..factorize.budget import lowrank_nbytes, rank_for_budget, rtn_nbytes
from ..factorize.linalg import weighted_error
from ..factorize.lplr import lplr_factorize
from ..factorize.rtn import rtn_factorize
from ..factorize.svd import svd_factorize
from ..factorize.types import Factorization
from ..config import DATA_AWARE_METHODS, LOWRANK_METHODS, OptimizeConfig
from ..errors import ConfigError
from .base import Context, Pass, WeightRecord

log = logging.getLogger("qsdonnx")

QUANT_ONLY_VIEWS = ("conv-grouped", "embedding")


@dataclass(frozen=True)
class LayerChoice:
    """One concrete way to compress one weight."""

    method: str
    bits: int
    block_size: int
    rank: int = 0

    def nbytes(self, K: int, N: int, cfg: OptimizeConfig, dense_dtype: str = "float32") -> int:
        """Stored bytes; 3-bit codes are costed at 4 bits since every lowering stores them in
        4-bit containers."""
        c = self.container()
        if self.method in ("rtn", "gptq"):
            return rtn_nbytes(K, N, c, self.block_size, cfg.symmetric, cfg.scale_dtype)
        if self.method == "svd":
            return lowrank_nbytes(K, N, self.rank, None, None, self.block_size, cfg.symmetric,
                                     cfg.scale_dtype, dense_dtype=dense_dtype)
        if self.method == "caldera":
            return (rtn_nbytes(K, N, c, self.block_size, cfg.symmetric, cfg.scale_dtype)
                    + lowrank_nbytes(K, N, self.rank, c, c, self.block_size, cfg.symmetric, cfg.scale_dtype))
        return lowrank_nbytes(K, N, self.rank, c, c, self.block_size, cfg.symmetric, cfg.scale_dtype)

    def container(self) -> int:
        return 2 if self.bits <= 2 else 4 if self.bits <= 4 else 8

    def label(self) -> str:
        s = f"{self.method} {self.bits}b/{self.block_size}" if self.method != "svd" else "svd"
        return s + (f" r={self.rank}" if self.rank else "")


def effective_block(block: int, K: int) -> int:
    """Blocks longer than the reduction axis are clipped to it (one block per column)."""
    return max(1, min(block, K))


def uniform_choice(rec: WeightRecord, cfg: OptimizeConfig) -> tuple[Optional[LayerChoice], str]:
    """The choice for one weight from the flags and overrides; ``(None, reason)`` to skip."""
    K, N = rec.matrix_shape
    ov = cfg.override_for(rec.name)
    method = (ov.method if ov and ov.method else cfg.method)
    bits = (ov.bits if ov and ov.bits else cfg.bits)
    block = effective_block(ov.block_size if ov and ov.block_size else cfg.block_size, K)
    rank = ov.rank if ov and ov.rank else cfg.rank
    note = ""
    if method == "auto":
        method = "gptq" if rec.view != "embedding" else "rtn"
    if rec.view in QUANT_ONLY_VIEWS and method in LOWRANK_METHODS:
        note = f"{method} does not apply to {rec.view} weights; quantized only"
        method = "rtn"
    if rec.view == "embedding" and method in DATA_AWARE_METHODS:
        method = "rtn"  # a lookup table has no activations to weight the error with
    dense = rec.dtype if rec.dtype in ("float32", "float16") else "float32"
    budget_bytes = None
    if cfg.bits_per_weight is not None:
        budget_bytes = cfg.bits_per_weight * K * N / 8.0
    if method in ("rtn", "gptq"):
        if budget_bytes is not None and not (ov and ov.bits):
            fitting = [b for b in (8, 4, 3, 2)
                       if LayerChoice(method, b, block).nbytes(K, N, cfg) <= budget_bytes]
            if not fitting:
                return None, f"--bits-per-weight {cfg.bits_per_weight} is below the cheapest {method} setting"
            bits = fitting[0]
        choice = LayerChoice(method, bits, block)
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
            rec.method, rec.bits, rec.block_size, rec.rank = choice.method, choice.bits, choice.block_size, choice.rank
        return f"{len(ctx.candidates())} weights planned"


def run_choice(W: np.ndarray, choice: LayerChoice, cfg: OptimizeConfig, H: Optional[np.ndarray],
               dense_dtype: str) -> Factorization:
    """Dispatches one weight to its algorithm (all math lives in ``qsdonnx.factorize``)."""
    m = choice.method
    common = dict(block_size=choice.block_size, symmetric=cfg.symmetric, scale_dtype=cfg.scale_dtype)
    if m == "rtn" or (m == "gptq" and H is None):
        return rtn_factorize(W, choice.bits, **common)
    if m == "gptq":
        from ..factorize.gptq import gptq_factorize
        return gptq_factorize(W, H, choice.bits, **common)
    if m == "svd":
        return svd_factorize(W, choice.rank, dtype=dense_dtype)
    if m == "lplr":
        return lplr_factorize(W, choice.rank, choice.bits, choice.bits, seed=cfg.seed, **common)
    if m == "caldera":
        from ..factorize.caldera import caldera_factorize
        return caldera_factorize(W, H if H is not None else np.eye(W.shape[0], dtype=np.float32),
                                    choice.rank, choice.bits, choice.bits, **common)
    if m == "qsd":
        from ..factorize.qsd import qsd_factorize
        return qsd_factorize(W, H if H is not None else np.eye(W.shape[0], dtype=np.float32),
                                choice.rank, choice.bits, **common)
    raise ConfigError(f"unknown method {m!r}")


class FactorizeWeightsPass(Pass):
    """Runs each planned weight's factorization and measures its relative error."""

    name = "factorize"

    def run(self, ctx: Context) -> str:
        cfg = ctx.config
        todo = ctx.candidates()
        bar = tqdm(todo, desc="factorizing", unit="weight", disable=not cfg.progress, leave=False)
        for rec in bar:
            W = ctx.weights[rec.name]
            H = ctx.calibration.get(rec.name, {}).get("H") if ctx.calibration else None
            choice = LayerChoice(rec.method, rec.bits, rec.block_size, rec.rank)
            dense = rec.dtype if rec.dtype in ("float32", "float16") else "float32"
            f = run_choice(W, choice, cfg, H, dense)
            What = f.dense()
            denom = float(np.linalg.norm(W)) or 1.0
            rec.rel_error = float(np.linalg.norm(W - What)) / denom
            if H is not None:
                rec.extra["weighted_rel_error"] = weighted_error(W, What, H) / max(weighted_error(W, np.zeros_like(W), H), 1e-30)
            rec.extra["factor_bytes"] = f.nbytes()
            rec.status = "compressed"
            ctx.factorizations[rec.name] = f
        return f"{len(todo)} weights factorized"
