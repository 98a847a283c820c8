"""Second moments of layer inputs: their accumulation and where the finished ones are kept.

A layer with ``K`` inputs has a ``K×K`` matrix ``H``: 64 KiB for ``K = 128``, 784 MiB in float32
for ``K = 14336``.  A large model's matrices together outgrow memory, so past
:data:`SPILL_BYTES` in all each finished matrix is written to a temporary file and read back
each time a pass asks for it (:class:`LayerStats`), then dropped with its result.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# Sums of more than this many bytes in float64 accumulate in float32 instead (in place; each
# batch adds K² terms of its own rows, so float32 keeps about 7 digits over thousands of batches).
FLOAT64_ACCUMULATOR_BYTES = 256 << 20
# Finished matrices of more than this many bytes in all are kept on disk between uses.
SPILL_BYTES = 256 << 20
MATRICES = ("H", "H_fit", "H_check")


def accumulator_bytes(K: int) -> int:
    """Bytes of one :class:`HessianAccumulator` of ``K`` inputs."""
    return K * K * (8 if 8 * K * K <= FLOAT64_ACCUMULATOR_BYTES else 4)


class HessianAccumulator:
    """``Σ xᵀx`` and ``Σ x`` over rows ``x`` of one layer's input, with the row count.

    Each batch's product is formed in float32 (fast) and summed across batches in float64, so
    long calibration runs do not lose precision; above :data:`FLOAT64_ACCUMULATOR_BYTES` the sum
    is kept in float32 and each product added in place (no K×K temporary)."""

    def __init__(self, K: int):
        wide = 8 * K * K <= FLOAT64_ACCUMULATOR_BYTES
        self.H = torch.zeros(K, K, dtype=torch.float64 if wide else torch.float32)
        self.sum = torch.zeros(K, dtype=torch.float64)
        self.rows = 0

    def add(self, rows: torch.Tensor) -> None:
        if self.H.dtype == torch.float64:
            self.H += (rows.T @ rows).to(torch.float64)
        else:
            self.H.addmm_(rows.T, rows)
        self.sum += rows.sum(dim=0, dtype=torch.float64)
        self.rows += rows.shape[0]

    def minus(self, other: "HessianAccumulator") -> "HessianAccumulator":
        """The sums over the rows this accumulator saw and ``other`` did not."""
        out = HessianAccumulator(self.H.shape[0])
        out.H, out.sum, out.rows = self.H - other.H, self.sum - other.sum, self.rows - other.rows
        return out

    def result(self, centered: bool = False, in_place: bool = False) -> dict:
        """``H = E[xᵀx]``, or the covariance ``E[xᵀx] − μᵀμ`` when ``centered`` (for layers
        whose bias absorbs the mean error, see ``passes.bias``); ``mean = μ``.  ``in_place``
        computes it in the accumulator's own memory, which is then no longer a sum."""
        n = max(self.rows, 1)
        mean = self.sum / n
        if in_place:
            H = self.H.div_(n)
            if centered:
                H.sub_(torch.outer(mean, mean).to(H.dtype))
        else:
            H = self.H / n
            if centered:
                H = H - torch.outer(mean, mean)
        H = H if H.dtype == torch.float32 else H.to(torch.float32)
        return {"H": H.numpy(), "mean": mean.numpy(), "rows": self.rows, "centered": centered}


class MatrixFiles:
    """A temporary folder of ``.npy`` matrices, removed with this object (or at exit)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="qsdonnx-hessians-"))
        weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.count = 0

    def save(self, array: np.ndarray) -> Path:
        path = self.dir / f"{self.count}.npy"
        self.count += 1
        np.save(path, array, allow_pickle=False)
        return path


class LayerStats(dict):
    """A layer's calibration statistics (``H``, ``mean``, ``rows``, ...); the matrices named in
    ``files`` are read from disk on each access and not kept.  Assigning a key keeps the value
    in memory like any dict."""

    def __init__(self, values: dict, files: Optional[dict[str, Path]] = None, store: Optional[MatrixFiles] = None):
        super().__init__(values)
        self.files = dict(files or {})
        self._store = store  # keeps the folder alive as long as the statistics

    def __getitem__(self, key):
        if not dict.__contains__(self, key) and key in self.files:
            return np.load(self.files[key], allow_pickle=False)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or key in self.files

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __setitem__(self, key, value) -> None:
        self.files.pop(key, None)
        super().__setitem__(key, value)

    def copy(self) -> "LayerStats":
        """Another layer's statistics with the same values (assignments to either stay apart)."""
        return LayerStats(dict(dict.items(self)), self.files, self._store)

    def matrix_bytes(self, key: str = "H") -> int:
        """Bytes of one matrix (on disk: its file's, a header more) without reading it."""
        if dict.__contains__(self, key):
            return int(np.asarray(dict.__getitem__(self, key)).nbytes)
        if key in self.files:
            return self.files[key].stat().st_size
        return 0
