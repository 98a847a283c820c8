"""Factorization on a local Ray instance (``--ray local``): the same bytes as a local run, and a
task whose worker dies is run again rather than dropped."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import qsdonnx
from conftest import two_layer_model

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from qsdonnx.passes.cluster import Cluster

    with Cluster("local", num_cpus=2) as c:
        yield c


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ray_gives_the_bytes_of_a_local_run(tmp_path, cluster, monkeypatch, method):
    from qsdonnx.passes import cluster as cl

    sent = []
    real = cl.remote_results
    monkeypatch.setattr(cl, "remote_results", lambda jobs, window, **kw: real((sent.append(j[0].shape) or j for j in jobs),
                                                                              window, **kw))
    model = two_layer_model()
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{model.graph.input[0].name: np.random.default_rng(8).standard_normal((32, 128)).astype(np.float32)})
    opts = dict(method=method, bits=4, calib=calib if method == "gptq" else None, tune_epochs=0, rotate=False,
                progress=False)
    local, remote = tmp_path / "local.onnx", tmp_path / "ray.onnx"
    qsdonnx.optimize(model, local, jobs=1, **opts)
    res = qsdonnx.optimize(model, remote, ray="local", **opts)
    assert local.read_bytes() == remote.read_bytes()
    assert sorted(sent) == [(64, 96), (128, 64)]  # both weights went to Ray tasks, as matrices
    assert all(l["status"] == "compressed" for l in res.report.layers)


def _dies_once(marker: str, x: int) -> int:
    """Kills its worker process the first time it runs for ``x`` (a lost task), then succeeds."""
    path = f"{marker}.{x}"
    if not os.path.exists(path):
        open(path, "w").close()
        os._exit(1)
    return 10 * x


def _raises(x: int) -> int:
    raise ValueError(f"bad weight {x}")


def test_a_task_lost_with_its_worker_is_run_again_and_results_keep_their_order(tmp_path, cluster):
    from qsdonnx.passes.cluster import remote_results

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = str(tmp_path / "attempt")
    got = list(remote_results(((marker, x) for x in range(4)), window=2, func=_dies_once))
    assert got == [0, 10, 20, 30]
    assert sorted(os.listdir(tmp_path)) == [f"attempt.{x}" for x in range(4)]  # each died once


def test_a_task_lost_more_often_than_its_retries_stops_the_run(tmp_path, cluster):
    from qsdonnx.errors import QsdError
    from qsdonnx.passes.cluster import remote_results

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(QsdError, match="lost on the Ray cluster after 1 attempt"):
        list(remote_results([(str(tmp_path / "m"), 1)], window=1, func=_dies_once, retries=0))
    with pytest.raises(QsdError, match="bad weight 3"):
        list(remote_results([(3,)], window=1, func=_raises))
