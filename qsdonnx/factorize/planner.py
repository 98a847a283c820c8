"""Per-layer choice of a compression candidate under a global byte budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .linalg import weighted_error


@dataclass
class Candidate:
    """One way to compress one layer: its exact size and its predicted (e.g. H-weighted) error."""

    nbytes: int
    predicted_error: float
    payload: Any = None


def predict_error(W: np.ndarray, What: np.ndarray, H: Optional[np.ndarray] = None) -> float:
    """``tr((W - Ŵ)ᵀ H (W - Ŵ)) = ||X (W - Ŵ)||_F²`` for ``H = XᵀX`` (``||W - Ŵ||_F²`` if None)."""
    return weighted_error(W, What, H)


def predict_relative_error(W: np.ndarray, What: np.ndarray, H: Optional[np.ndarray] = None) -> float:
    """``tr((W - Ŵ)ᵀ H (W - Ŵ)) / tr(Wᵀ H W)`` (0 when ``W`` carries no energy and ``Ŵ = W``)."""
    den = weighted_error(W, np.zeros_like(W), H)
    num = weighted_error(W, What, H)
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return num / den


def _pick(layers: Sequence[Sequence[Candidate]], lam: float) -> list[int]:
    """Per layer ``argmin_c err_c + λ·bytes_c`` (ties go to fewer bytes, then lower index)."""
    out = []
    for cands in layers:
        best, key = 0, None
        for i, c in enumerate(cands):
            k = (c.predicted_error + lam * c.nbytes, c.nbytes)
            if key is None or k < key:
                best, key = i, k
        out.append(best)
    return out


def _total(layers: Sequence[Sequence[Candidate]], choice: Sequence[int]) -> int:
    return sum(int(layers[l][i].nbytes) for l, i in enumerate(choice))


def plan_allocation(candidates: Sequence[Sequence[Candidate]], budget_bytes: float) -> list[int]:
    """Indices (one per layer) approximately minimizing ``Σ err`` subject to ``Σ bytes <= budget``.

    1. Lagrangian relaxation: the per-layer choice ``argmin err + λ·bytes`` has total bytes
       non-increasing in ``λ``; bisection finds the smallest ``λ`` whose choice fits.
    2. Greedy fix-up: while some single-layer change lowers the error and fits the leftover
       budget, apply the one with the largest error decrease per added byte (a change that also
       saves bytes counts as infinitely good).
    3. Pair moves: apply the best error-lowering change of two layers at once that fits (a
       downgrade paying for an upgrade), then fill again; repeat until neither step helps.

    The result never exceeds the budget; a ``ValueError`` is raised when even the cheapest
    candidate of every layer does not fit.
    """
    layers = [list(c) for c in candidates]
    if any(len(c) == 0 for c in layers):
        raise ValueError("every layer needs at least one candidate")
    cheapest = sum(min(int(c.nbytes) for c in cands) for cands in layers)
    if cheapest > budget_bytes:
        raise ValueError(f"budget of {budget_bytes:.0f} bytes is below the {cheapest} bytes of "
                         "the cheapest candidate of every layer")

    choice = _pick(layers, 0.0)
    if _total(layers, choice) > budget_bytes:
        hi = 1.0
        while _total(layers, _pick(layers, hi)) > budget_bytes:
            hi *= 2.0
            if hi > 1e300:
                # Only errors so large that λ·bytes cannot dominate remain: start from the
                # cheapest candidate of every layer, which fits (checked above).
                hi = None
                break
        if hi is None:
            choice = [min(range(len(c)), key=lambda i, c=c: (c[i].nbytes, c[i].predicted_error))
                      for c in layers]
        else:
            lo = 0.0
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if mid <= lo or mid >= hi:
                    break
                if _total(layers, _pick(layers, mid)) > budget_bytes:
                    lo = mid
                else:
                    hi = mid
            choice = _pick(layers, hi)

    used = _total(layers, choice)
    while True:
        used = _greedy_fill(layers, choice, used, budget_bytes)
        if not _best_pair_move(layers, choice, used, budget_bytes):
            return choice
        used = _total(layers, choice)


def _best_pair_move(layers: list[list[Candidate]], choice: list[int], used: int,
                    budget: float) -> bool:
    """Apply the pair of changes in two different layers that lowers the total error most while
    fitting the budget (typically: downgrade one layer to pay for another's upgrade)."""
    lay, idx, db, de = [], [], [], []
    for l, cands in enumerate(layers):
        cur = cands[choice[l]]
        for i, c in enumerate(cands):
            if i != choice[l]:
                lay.append(l)
                idx.append(i)
                db.append(int(c.nbytes) - int(cur.nbytes))
                de.append(c.predicted_error - cur.predicted_error)
    if len(lay) < 2:
        return False
    lay_a, db_a, de_a = np.array(lay), np.array(db, np.float64), np.array(de, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        gain = -(de_a[:, None] + de_a[None, :])
    ok = (lay_a[:, None] != lay_a[None, :]) & (used + db_a[:, None] + db_a[None, :] <= budget)
    gain = np.where(ok & np.isfinite(gain), gain, -np.inf)
    # A gain within rounding of the current total is no gain (and would never terminate).
    total = sum(layers[l][i].predicted_error for l, i in enumerate(choice))
    a, b = np.unravel_index(int(np.argmax(gain)), gain.shape)
    if not gain[a, b] > 1e-12 * max(abs(total), 1.0):
        return False
    choice[lay[a]] = idx[a]
    choice[lay[b]] = idx[b]
    return True


def _greedy_fill(layers: list[list[Candidate]], choice: list[int], used: int,
                 budget_bytes: float) -> int:
    """Single-layer upgrades by best error decrease per added byte while the budget allows."""
    while True:
        best = None
        for l, cands in enumerate(layers):
            cur = cands[choice[l]]
            for i, c in enumerate(cands):
                gain = cur.predicted_error - c.predicted_error
                extra = int(c.nbytes) - int(cur.nbytes)
                if gain <= 0 or used + extra > budget_bytes:
                    continue
                rate = float("inf") if extra <= 0 else gain / extra
                key = (rate, gain)
                if best is None or key > best[0]:
                    best = (key, l, i, extra)
        if best is None:
            break
        _, l, i, extra = best
        choice[l] = i
        used += extra
    return used
