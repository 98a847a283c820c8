"""Factorization on a Ray cluster (``--ray ADDRESS``).

Each weight is one Ray task: the driver reads the weight (and takes its calibration ``H``),
sends both with the planned choice and the config, and takes the factors and their errors
back, in the order the weights were given, straight into the lowering. The task runs the
same function as a local worker (``workers._job``), so the output is byte-identical to a
local run for the deterministic methods. At most one task per CPU of the cluster is in
flight, which bounds what the driver holds to that many weights.

A task whose worker process or node dies is run again (``RETRIES`` times); a task that fails
for good, or raises, stops the run with an error: no weight is ever silently left out.
The cluster's machines need qsdonnx and its dependencies installed (the same versions).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from ..errors import ConfigError, QsdError

RETRIES = 3
CONNECT_TIMEOUT_S = 5


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs the ray package (pip install 'qsdonnx[ray]')") from None
    return ray


class Cluster:
    """A connection to a Ray cluster (``address``: ``auto``, ``ray://host:port``, ``host:port``,
    or ``local`` to start one on this machine) for the duration of a ``with`` block."""

    def __init__(self, address: str, num_cpus: Optional[int] = None):
        self.address = address
        self.num_cpus = num_cpus
        self.started = False

    def _check_reachable(self) -> None:
        """A ``host:port`` address that nothing answers on fails here in seconds (Ray itself
        would keep retrying for minutes)."""
        import socket

        addr = self.address.split("://", 1)[-1]
        if self.address in ("auto", "local") or ":" not in addr:
            return
        host, _, port = addr.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Ray cluster at {self.address!r}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None

    def __enter__(self) -> "Cluster":
        ray = _ray()
        if not ray.is_initialized():
            self._check_reachable()
            kwargs = {"num_cpus": self.num_cpus} if self.address == "local" and self.num_cpus else {}
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                         logging_level="ERROR", **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot connect to the Ray cluster at {self.address!r}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
            self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            _ray().shutdown()

    def cpus(self) -> int:
        return max(1, int(_ray().cluster_resources().get("CPU", 1)))


def remote_results(jobs: Iterable[tuple], window: int, func: Optional[Callable] = None,
                   retries: int = RETRIES) -> Iterator:
    """``func(*job)`` for each job tuple, run as Ray tasks (retried ``retries`` times when their
    worker dies), yielded in order with at most ``window`` in flight. Needs a connected
    :class:`Cluster`."""
    ray = _ray()
    if func is None:
        from .workers import _job as func
    task = ray.remote(max_retries=retries, retry_exceptions=False, num_cpus=1)(func)
    pending: deque = deque()

    def result(ref):
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the task itself raised: its error, as ours
            cause = exc.as_instanceof_cause()
            if isinstance(cause, QsdError):
                raise cause from None
            raise QsdError(f"a factorization task failed on the Ray cluster: {str(cause).splitlines()[-1]}") from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError) as exc:
            raise QsdError(f"a factorization task was lost on the Ray cluster after {retries + 1} attempt"
                           f"{'s' if retries else ''} ({type(exc).__name__}); nothing written") from None

    for args in jobs:
        pending.append(task.remote(*args))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def cluster_jobs(jobs: Iterable[tuple]) -> Iterator[tuple]:
    """The local job tuples ``(source, choice, cfg, H, dense)`` with each weight read here, so
    that a task on another machine needs no access to the model's files."""
    from .canonicalize import read_matrix
    from .workers import resolved

    for source, choice, cfg, H, dense in jobs:
        W = source if isinstance(source, np.ndarray) else read_matrix(source)
        yield W, choice, cfg.replace(progress=False), resolved(H), dense
