"""What the planner may choose from, per method."""
from __future__ import annotations

from qsdonnx.config import OptimizeConfig
from qsdonnx.passes.base import WeightRecord
from qsdonnx.passes.factorize import candidate_choices


def _rec(K=384, N=1536):
    return WeightRecord(name="W", op="MatMul", nodes=["mm"], shape=(K, N), dtype="float32",
                        location="initializer", view="matmul", matrix_shape=(K, N))


def test_caldera_may_drop_the_low_rank_term():
    cands = candidate_choices(_rec(), OptimizeConfig(method="caldera", bits_per_weight=3.0), True)
    ranked = [c for c in cands if c.method == "caldera"]
    plain = [c for c in cands if c.method == "gptq"]
    assert ranked and all(c.rank > 0 for c in ranked)
    assert 2 in {c.bits for c in ranked}  # the 2-bit backbone with a correction is CALDERA's point
    # rank 0: the LDLQ/GPTQ backbone alone, at every planner grid
    assert {(c.bits, c.block_size) for c in plain} == {(b, k) for b in (2, 3, 4, 8) for k in (32, 64, 128)}
    assert all(c.rank == 0 for c in plain)


def test_fixed_quantizers_offer_only_their_own_grids():
    for method in ("gptq", "rtn"):
        cands = candidate_choices(_rec(), OptimizeConfig(method=method, bits_per_weight=3.0), True)
        assert {c.method for c in cands} == {method} and all(c.rank == 0 for c in cands)
    # qsd offers its low-rank forms and its sub-vector forms (rank 0, a dictionary), and no
    # other method's grid.
    cands = candidate_choices(_rec(), OptimizeConfig(method="qsd", bits_per_weight=3.0), True)
    assert {c.method for c in cands} == {"qsd"} and all((c.rank > 0) != (c.atoms > 0) for c in cands)
    cands = candidate_choices(_rec(), OptimizeConfig(method="lplr", bits_per_weight=3.0), True)
    assert {c.method for c in cands} == {"lplr"} and all(c.rank > 0 for c in cands)
