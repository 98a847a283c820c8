"""Typed, frozen configuration, validated on creation."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from .errors import ConfigError

METHODS = ("rtn", "svd", "lplr", "gptq", "caldera", "qsd", "pq", "trellis", "vq", "auto")
LOWRANK_METHODS = ("svd", "lplr", "caldera", "qsd")
DATA_AWARE_METHODS = ("gptq", "caldera", "qsd", "vq")
FORMATS = ("qdq", "nbits", "fused")
BITS = (2, 3, 4, 8)
LEVELS = (5, 6, 10, 12)  # code alphabets between the widths (factorize.types.LEVEL_WORDS)
LEVEL_METHODS = ("rtn", "gptq", "auto")
TUNE_EPOCHS = 4


@dataclass(frozen=True)
class LayerOverride:
    """Settings for the weights whose name matches ``pattern`` (exact name or regex)."""

    pattern: str
    method: Optional[str] = None
    bits: Optional[int] = None
    rank: Optional[int] = None
    block_size: Optional[int] = None
    levels: Optional[int] = None
    skip: bool = False

    def __post_init__(self) -> None:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ConfigError(f"override pattern {self.pattern!r} is not a valid regex: {exc}") from None
        if self.method is not None and self.method not in METHODS:
            raise ConfigError(f"override method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.bits is not None and self.bits not in BITS:
            raise ConfigError(f"override bits {self.bits} is not one of {BITS}")
        if self.levels is not None and self.levels not in LEVELS:
            raise ConfigError(f"override levels {self.levels} is not one of {LEVELS}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"override rank must be >= 1, got {self.rank}")
        if self.block_size is not None and self.block_size < 2:
            raise ConfigError(f"override block size must be >= 2, got {self.block_size}")

    def matches(self, name: str) -> bool:
        return name == self.pattern or re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything ``optimize`` needs; every CLI flag maps onto one field."""

    method: str = "auto"
    bits: int = 4
    levels: Optional[int] = None  # codes of this many values, stored three to a word (replaces bits)
    block_size: int = 32
    symmetric: bool = False  # asymmetric (zero point per block) is the better use of bits at 4 bits and below
    scale_dtype: str = "float16"
    rank: Optional[int] = None
    bits_per_weight: Optional[float] = None
    format: str = "qdq"
    exclude: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()
    min_elements: int = 4096
    compress_embeddings: bool = True
    sparsity: float = 0.0  # QSD: fraction of each factor column set to zero
    clip_search: bool = True  # RTN grids: MSE-best clipped range per block instead of min/max
    sensitivity: bool = True  # weight the planner's per-layer errors by measured end-to-end effect
    rotate: Optional[bool] = None  # rotate calibrated MatMul/Gemm inputs in blocks (passes.rotate); None: on, but off by default above 1 GiB of weights
    rotate_block: int = 32
    # calibration
    calib: Optional[Path] = None
    calib_batch: int = 8
    calib_samples: int = 256
    calib_mask: str = "auto"  # input marking real tokens (auto: attention_mask / input_mask), or none
    tune_epochs: Optional[int] = None  # end-to-end tuning (passes.tune); None: TUNE_EPOCHS with --calib, else 0
    # validation
    validate: bool = True
    inputs: Optional[Path] = None
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    num_inputs: int = 4
    max_rel_error: Optional[float] = None
    keep_on_fail: bool = False
    report: Optional[Path] = None
    external_data: Optional[bool] = None  # tensors to <output>.data: None = when above 2 GB
    seed: int = 0
    accuracy_level: int = 0
    progress: bool = True
    jobs: Optional[int] = None  # weights factorized in parallel (threads); None: one per core
    ray: Optional[str] = None  # Ray cluster address (auto, host:port, ray://..., local): factorize there

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits not in BITS:
            raise ConfigError(f"--bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.levels is not None and self.levels not in LEVELS:
            raise ConfigError(f"--levels must be one of {', '.join(map(str, LEVELS))}, got {self.levels}")
        if self.levels is not None and self.method not in LEVEL_METHODS:
            raise ConfigError(f"--levels applies to --method {', '.join(LEVEL_METHODS)}, not {self.method}")
        if self.block_size < 2:
            raise ConfigError(f"--block-size must be at least 2, got {self.block_size}")
        if self.rotate_block < 2:
            raise ConfigError(f"--rotate-block must be at least 2, got {self.rotate_block}")
        if self.scale_dtype not in ("float16", "float32"):
            raise ConfigError(f"scale dtype must be float16 or float32, got {self.scale_dtype!r}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"--rank must be at least 1, got {self.rank}")
        if self.bits_per_weight is not None and not (0 < self.bits_per_weight <= 32):
            raise ConfigError(f"--bits-per-weight must be in (0, 32], got {self.bits_per_weight}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"--exclude {pattern!r} is not a valid regex: {exc}") from None
        if self.max_rel_error is not None and not self.max_rel_error > 0:
            raise ConfigError(f"--max-rel-error must be positive, got {self.max_rel_error}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}")
        if self.num_inputs < 1:
            raise ConfigError(f"--num-inputs must be at least 1, got {self.num_inputs}")
        if self.tune_epochs is not None and self.tune_epochs < 0:
            raise ConfigError(f"--tune-epochs must be 0 or more, got {self.tune_epochs}")
        if self.calib_batch < 1 or self.calib_samples < 1:
            raise ConfigError("--calib-batch and --calib-samples must be at least 1")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy level must be 0..4, got {self.accuracy_level}")
        if self.max_rel_error is not None and not self.validate:
            raise ConfigError("--max-rel-error needs validation; drop --no-validate")

    @property
    def epochs_to_tune(self) -> int:
        """End-to-end tuning epochs: as given, else :data:`TUNE_EPOCHS` when real calibration
        data is given (generated inputs are no ground to fit the whole model to)."""
        if self.tune_epochs is not None:
            return self.tune_epochs
        return TUNE_EPOCHS if self.calib is not None else 0

    def replace(self, **changes) -> "OptimizeConfig":
        return replace(self, **changes)

    def is_excluded(self, name: str) -> bool:
        return any(name == p or re.fullmatch(p, name) or re.search(p, name) for p in self.exclude)

    def override_for(self, name: str) -> Optional[LayerOverride]:
        for ov in self.overrides:
            if ov.matches(name):
                return ov
        return None


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name:1,128`` → ``("name", (1, 128))``."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise ConfigError(f"--input-shape expects NAME:D1,D2,..., got {text!r}")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        raise ConfigError(f"--input-shape dims must be integers, got {text!r}") from None
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(f"--input-shape dims must be positive integers, got {text!r}")
    return name, shape


def parse_override(text: str) -> LayerOverride:
    """``REGEX:key=value,key=value`` (keys: method, bits, levels, rank, block, skip)."""
    pattern, sep, body = text.rpartition(":")
    if not sep or not pattern:
        raise ConfigError(f"--override expects REGEX:key=value,..., got {text!r}")
    fields: dict = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        try:
            if key == "method" and eq:
                fields["method"] = value
            elif key == "bits" and eq:
                fields["bits"] = int(value)
            elif key == "levels" and eq:
                fields["levels"] = int(value)
            elif key == "rank" and eq:
                fields["rank"] = int(value)
            elif key in ("block", "block_size") and eq:
                fields["block_size"] = int(value)
            elif key == "skip" and not eq:
                fields["skip"] = True
            else:
                raise ConfigError(f"--override: unknown setting {item!r} (use method=, bits=, levels=, rank=, block=, skip)")
        except ValueError:
            raise ConfigError(f"--override: {item!r} needs an integer value") from None
    return LayerOverride(pattern=pattern, **fields)
