"""Factorization of independent weights on worker threads (``--jobs``).

Each job is one weight: where to read its matrix, its planned choice, its calibration ``H``
and the config; a worker reads the weight, factorizes it and measures its errors. Results
are taken in the order the weights were given, and every method is a pure function of those
inputs, so the output does not depend on the number of workers. At most ``jobs`` weights are
in flight at a time (the one the caller is lowering included), which bounds the memory the
parallel run adds to about ``jobs`` weights.

Threads, not processes: the numerical work (torch and numpy on whole blocks of rows) runs
outside the interpreter lock, so threads use every core without a second copy of the
interpreter and its imports per worker (a few hundred MB each) and without sending weights
and factors through pipes. Torch runs its operations on ``cores // jobs`` threads each.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional

import numpy as np

# Below this many weight elements in all, handing weights to workers saves less than it
# costs: the weights are factorized one after the other on all cores.
PARALLEL_MIN_ELEMENTS = 1 << 24


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _job(source, choice, cfg, H: Optional[np.ndarray], dense: str):
    from .canonicalize import read_matrix, row_reader
    from .factorize import layer_errors, run_choice, run_rows, runs_by_rows

    if H is None and runs_by_rows(choice, H):  # (with H, the output error needs the whole weight)
        return run_rows(*row_reader(source), choice, cfg)
    W = read_matrix(source)
    f = run_choice(W, choice, cfg, H, dense)
    return f, layer_errors(W, f, H)


def factorized(jobs: Iterable[tuple], workers: int) -> Iterator:
    """``(factors, errors)`` (see ``run_choice`` and ``layer_errors``) for each job tuple
    ``(source, choice, cfg, H, dense)`` (``source``: a matrix, or where to read it, see
    ``WeightMatrices.source``), in order; on ``workers`` threads with at most ``workers``
    jobs in flight, counting the one the caller holds (one worker: in this thread)."""
    if workers <= 1:
        for args in jobs:
            yield _job(*args)
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, default_jobs() // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()
            for args in jobs:
                pending.append(pool.submit(_job, *args))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(before)
