"""Factorization of independent weights in worker processes (``--jobs``).

Each job is one weight: its matrix, its planned choice, its calibration ``H`` and the config
go to a worker, and the factorization and its measured errors come back. Results are taken in
the order the weights were given, and every method is a pure function of those inputs, so the
output does not depend on the number of workers. At most ``jobs`` weights are in flight at a
time, which bounds the memory the parallel run adds to about ``jobs`` weights.

Workers are started with ``spawn`` (a fresh interpreter, so no thread pool state is inherited)
and run their numerical libraries on ``cores // jobs`` threads each.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator, Optional

import numpy as np

# Below this many weight elements in all, worker start-up (an interpreter and its imports,
# seconds) costs more than it saves: the weights are factorized in this process.
PARALLEL_MIN_ELEMENTS = 1 << 24


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _job(source, choice, cfg, H: Optional[np.ndarray], dense: str):
    from .canonicalize import read_matrix
    from .factorize import layer_errors, run_choice

    W = read_matrix(source)
    f = run_choice(W, choice, cfg, H, dense)
    return f, layer_errors(W, f, H)


def factorized(jobs: Iterable[tuple], workers: int) -> Iterator:
    """``(run_choice(W, choice, cfg, H, dense), layer_errors(...))`` for each job tuple
    ``(source, choice, cfg, H, dense)`` (``source``: a matrix, or where a worker reads it, see
    ``WeightMatrices.source``), in order, on ``workers`` processes with at most ``workers``
    jobs in flight."""
    threads = max(1, default_jobs() // workers)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(threads,)) as pool:
        pending: deque = deque()
        for args in jobs:
            pending.append(pool.submit(_job, *args))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
