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
# Jobs in flight together may need this much memory (by :func:`job_bytes`); a job that needs
# more runs alone.  The matrices of wide layers (784 MiB of H for 14336 inputs, as much again
# for its inverse factor) would otherwise add up over the workers.
IN_FLIGHT_BYTES = 1536 << 20


def job_bytes(numel: int, H_bytes: int) -> int:
    """Working memory of one calibrated weight's job that may meet another's: its ``H`` and a
    factor of the same size, and the weight's float32 copies (read and updated); 0 without
    ``H`` (those jobs hold one weight, as the in-flight count already bounds)."""
    return 8 * numel + 2 * H_bytes if H_bytes else 0


class Deferred:
    """A value read when a worker starts its job (an ``H`` kept on disk), not when it is queued."""

    def __init__(self, read, nbytes: int):
        self.read, self.nbytes = read, nbytes

    def __call__(self):
        return self.read()


def resolved(value):
    return value() if isinstance(value, Deferred) else value


def default_jobs() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _job(source, choice, cfg, H: Optional[np.ndarray], dense: str):
    from .canonicalize import read_matrix, row_reader
    from .factorize import layer_errors, run_choice, run_rows, runs_by_rows

    H = resolved(H)
    if H is None and runs_by_rows(choice, H):  # (with H, the output error needs the whole weight)
        return run_rows(*row_reader(source), choice, cfg)
    W = read_matrix(source)
    f = run_choice(W, choice, cfg, H, dense)
    return f, layer_errors(W, f, H)


def factorized(jobs: Iterable[tuple], workers: int, costs: Optional[Iterable[int]] = None) -> Iterator:
    """``(factors, errors)`` (see ``run_choice`` and ``layer_errors``) for each job tuple
    ``(source, choice, cfg, H, dense)`` (``source``: a matrix, or where to read it, see
    ``WeightMatrices.source``; ``H``: an array, None, or :class:`Deferred`), in order; on
    ``workers`` threads with at most ``workers`` jobs in flight, counting the one the caller
    holds (one worker: in this thread), and with ``costs`` (each job's :func:`job_bytes`, in
    order) no more of them than fit :data:`IN_FLIGHT_BYTES` together (a larger job waits for
    the others and runs alone)."""
    if workers <= 1:
        for args in jobs:
            yield _job(*args)
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, default_jobs() // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()  # (future, bytes)
            costs = iter(costs) if costs is not None else None
            for args in jobs:
                need = next(costs) if costs is not None else 0
                while pending and (len(pending) >= workers
                                   or sum(b for _, b in pending) + need > IN_FLIGHT_BYTES):
                    yield pending.popleft()[0].result()
                pending.append((pool.submit(_job, *args), need))
            while pending:
                yield pending.popleft()[0].result()
    finally:
        torch.set_num_threads(before)
