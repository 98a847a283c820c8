import itertools
import time

import numpy as np
import pytest

from qsdonnx.factorize.planner import (Candidate, plan_allocation, predict_error,
                                       predict_relative_error)


def _random_layers(rng, n_layers=4, n_cands=4):
    layers = []
    for _ in range(n_layers):
        sizes = np.sort(rng.integers(10, 200, size=n_cands))
        # Error falls with size, with noise so that not every candidate is on the convex hull.
        errs = np.sort(rng.uniform(0, 10, size=n_cands))[::-1] * rng.uniform(0.5, 2)
        layers.append([Candidate(int(s), float(e), payload=(int(s), float(e))) for s, e in zip(sizes, errs)])
    return layers


def _brute(layers, budget):
    best, best_err = None, np.inf
    for choice in itertools.product(*[range(len(c)) for c in layers]):
        b = sum(layers[l][i].nbytes for l, i in enumerate(choice))
        e = sum(layers[l][i].predicted_error for l, i in enumerate(choice))
        if b <= budget and e < best_err - 1e-12:
            best, best_err = choice, e
    return list(best), best_err


def test_planner_against_brute_force():
    rng = np.random.default_rng(0)
    exact, gaps, trials = 0, [], 300
    for _ in range(trials):
        layers = _random_layers(rng)
        lo = sum(min(c.nbytes for c in cands) for cands in layers)
        hi = sum(max(c.nbytes for c in cands) for cands in layers)
        budget = int(rng.uniform(lo, hi + 20))
        choice = plan_allocation(layers, budget)
        assert len(choice) == len(layers)
        used = sum(layers[l][i].nbytes for l, i in enumerate(choice))
        assert used <= budget
        err = sum(layers[l][i].predicted_error for l, i in enumerate(choice))
        _, best = _brute(layers, budget)
        assert err >= best - 1e-9
        exact += err <= best + 1e-9
        gaps.append((err - best) / max(best, 1e-9))
    assert exact / trials >= 0.85
    assert np.mean(gaps) < 0.01
    assert np.max(gaps) < 0.5


def test_planner_many_layers_fast_and_within_budget():
    rng = np.random.default_rng(2)
    layers = _random_layers(rng, n_layers=72, n_cands=12)
    lo = sum(min(c.nbytes for c in cands) for cands in layers)
    hi = sum(max(c.nbytes for c in cands) for cands in layers)
    t = time.perf_counter()
    for frac in (0.1, 0.5, 0.9):
        budget = lo + frac * (hi - lo)
        choice = plan_allocation(layers, budget)
        assert sum(layers[l][i].nbytes for l, i in enumerate(choice)) <= budget
    assert time.perf_counter() - t < 10.0


def test_planner_unconstrained_and_tight():
    layers = [[Candidate(10, 5.0), Candidate(20, 1.0)], [Candidate(5, 3.0), Candidate(50, 0.0)]]
    assert plan_allocation(layers, 1000) == [1, 1]
    assert plan_allocation(layers, 15) == [0, 0]
    assert plan_allocation(layers, 25) == [1, 0]
    with pytest.raises(ValueError):
        plan_allocation(layers, 14)
    with pytest.raises(ValueError):
        plan_allocation([[]], 100)


def test_planner_huge_errors_and_ties():
    layers = [[Candidate(10, 1e308), Candidate(11, 0.0)], [Candidate(3, 1.0), Candidate(3, 1.0)]]
    choice = plan_allocation(layers, 13)
    assert sum(layers[l][i].nbytes for l, i in enumerate(choice)) <= 13
    assert plan_allocation(layers, 14)[0] == 1


def test_predict_error():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((16, 8)).astype(np.float32)
    What = W + 0.1 * rng.standard_normal(W.shape).astype(np.float32)
    X = rng.standard_normal((40, 16))
    H = X.T @ X
    expected = np.linalg.norm(X @ (W - What)) ** 2
    assert predict_error(W, What, H) == pytest.approx(expected, rel=1e-5)
    assert predict_error(W, What) == pytest.approx(np.linalg.norm(W - What) ** 2, rel=1e-5)
    assert predict_relative_error(W, What, H) == pytest.approx(expected / np.linalg.norm(X @ W) ** 2, rel=1e-5)
    assert predict_relative_error(W, W, H) == 0.0
    assert predict_relative_error(np.zeros_like(W), np.zeros_like(W), H) == 0.0
