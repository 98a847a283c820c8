"""Pipeline context, per-weight records and the pass interface."""
from __future__ import annotations

import abc
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

from ..config import OptimizeConfig
from ..errors import QsdError, StageFailed

log = logging.getLogger("qsdonnx")


@dataclass
class WeightRecord:
    """One candidate weight: where it lives, how it is used, and what was done with it.

    ``matrix`` is the weight viewed as a ``(K, N)`` matrix used as ``X @ W`` (K = reduction
    axis); ``view`` says how that matrix maps back to the original tensor.
    """

    name: str
    op: str  # MatMul | Gemm | Conv | Gather | LSTM | GRU | RNN
    nodes: list[str]
    shape: tuple[int, ...]
    dtype: str  # numpy name of the weight's float type
    location: str  # initializer | constant-node | external-data (+ how it was folded)
    view: str = ""  # matmul | matmul-left | gemm | conv | conv-grouped | embedding | recurrent | deconv
    matrix_shape: tuple[int, int] = (0, 0)
    status: str = "candidate"  # candidate | compressed | skipped
    reason: str = ""
    # chosen by the plan pass
    method: str = ""
    bits: int = 0
    block_size: int = 0
    rank: int = 0
    atoms: int = 0  # QSD sub-vector form: dictionary atoms (block_size is then the vector length)
    levels: Optional[int] = None  # codes of this many values in words of three (types.LEVEL_WORDS)
    # filled by factorization / lowering
    bytes_before: int = 0
    bytes_after: int = 0
    rel_error: float = float("nan")
    predicted_error: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 0

    @property
    def bpw(self) -> float:
        return 8.0 * self.bytes_after / self.numel if self.numel and self.status == "compressed" else float("nan")

    def skip(self, reason: str) -> None:
        self.status = "skipped"
        self.reason = reason


@dataclass
class Context:
    """What flows through the pipeline."""

    config: OptimizeConfig
    model: onnx.ModelProto
    input_path: Optional[Path] = None
    base_dir: Optional[Path] = None
    records: list[WeightRecord] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # candidate weight arrays by name
    factorizations: dict[str, Any] = field(default_factory=dict)  # name -> Factorization
    calibration: dict[str, Any] = field(default_factory=dict)  # name -> statistics
    calib_info: dict = field(default_factory=dict)  # where the calibration data came from
    original: Optional[onnx.ModelProto] = None  # untouched copy of the input, for validation
    original_file_size: int = 0
    validation: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plan_summary: dict = field(default_factory=dict)  # budget, spend and choices of the planner
    tuning: dict = field(default_factory=dict)  # what end-to-end tuning did (passes.tune)
    rotation: dict = field(default_factory=dict)  # inputs rotated before quantization (passes.rotate)
    lifted: set = field(default_factory=set)  # weights that were Constant nodes
    external: set = field(default_factory=set)  # weights that were in external data
    spill: Any = None  # store.TensorSpill: where new tensors go as they are made (large outputs)
    folded: dict = field(default_factory=dict)  # weights computed from a constant subgraph: the ops
    calib_split: Optional[tuple] = None  # (fitting batches, held-out batches) of the calibration data

    def weight_array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A tensor's values, read from the protobuf or from its external data (a private copy)."""
        from ..store import tensor_array

        return tensor_array(tensor, self.base_dir)

    def record(self, name: str) -> WeightRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    def candidates(self) -> list[WeightRecord]:
        return [r for r in self.records if r.status == "candidate"]


@contextlib.contextmanager
def stage(name: str):
    """Turns any exception other than a ``QsdError`` into one ``StageFailed`` naming the stage."""
    try:
        yield
    except QsdError:
        raise
    except Exception as exc:  # noqa: BLE001 - every unexpected failure becomes one error line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageFailed(f"{name} failed: {type(exc).__name__}{': ' + msg if msg else ''} "
                          f"(run with -v for the traceback)") from exc


class Pass(abc.ABC):
    """A pipeline stage: ``run(ctx)`` changes the context and returns a short summary."""

    name = "pass"

    @abc.abstractmethod
    def run(self, ctx: Context) -> str:
        """Change ``ctx`` in place and return a one-line summary."""

    def __call__(self, ctx: Context) -> str:
        start = time.perf_counter()
        with stage(self.name):
            summary = self.run(ctx)
        ctx.timings[self.name] = ctx.timings.get(self.name, 0.0) + time.perf_counter() - start
        log.info("%s: %s", self.name, summary)
        return summary
