"""Codes of 5, 6, 10 or 12 values stored three to a word: in every format ONNX Runtime computes
with exactly the weight the factorization rebuilds, the file holds the counted bytes, and the
planner and the command line offer them."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import qsdonnx
from qsdonnx.api import _context
from qsdonnx.buildops import find_ops_library
from qsdonnx.cli import cli
from qsdonnx.config import OptimizeConfig
from qsdonnx.factorize.types import LEVEL_WORDS, level_bits
from qsdonnx.passes.base import WeightRecord
from qsdonnx.passes.calibrate import CalibratePass
from qsdonnx.passes.canonicalize import FindWeightsPass
from qsdonnx.passes.factorize import FactorizeWeightsPass, PlanPass, candidate_choices
from qsdonnx.passes.aliases import FoldWeightAliasesPass
from qsdonnx.passes.load import LoadPass
from qsdonnx.passes.lower_qdq import level_decoders, shared_decode_bytes
from qsdonnx.runtime import session

from conftest import conv3x3_model, save

LEVELS = sorted(LEVEL_WORDS)
OPT = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)


def matmul_model(K=128, N=48) -> onnx.ModelProto:
    W = np.random.default_rng(K + N).standard_normal((K, N)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "mm",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", K])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", N])], [nh.from_array(W, "W")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


MODELS = {
    "matmul": matmul_model,  # 48 columns: whole words along the last axis
    "matmul-odd": lambda: matmul_model(128, 40),  # 40 columns: flattened and padded to whole words
    "conv": conv3x3_model,
}


def options(levels: int, symmetric: bool) -> dict:
    return dict(method="rtn", levels=levels, symmetric=symmetric, block_size=32, progress=False,
                min_elements=16, rotate=False)


def rebuilt(model: onnx.ModelProto, **opts):
    """``model`` with W replaced by the weight its factorization rebuilds, and the factorization."""
    ctx = _context(model, OptimizeConfig(**opts))
    for p in (LoadPass(), FoldWeightAliasesPass(), FindWeightsPass(), CalibratePass(), PlanPass(), FactorizeWeightsPass()):
        p(ctx)
    f = ctx.factorizations["W"]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    W = next(t for t in out.graph.initializer if t.name == "W")
    shape = tuple(W.dims)
    What = f.dense()
    values = What if len(shape) == 2 else What.T.reshape(shape)  # conv view: (C·kh·kw, O)
    W.CopyFrom(nh.from_array(values.astype(np.float32), "W"))
    return out, f


def feeds(model: onnx.ModelProto) -> dict:
    shape = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}


FORMATS = ["qdq", "nbits", pytest.param("fused", marks=pytest.mark.skipif(
    find_ops_library() is None, reason="custom-op library not built (qsdonnx build-ops)"))]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("levels", LEVELS)
def test_runtime_computes_with_the_rebuilt_weight(levels, kind, fmt):
    model = MODELS[kind]()
    for symmetric in (False, True):
        opts = options(levels, symmetric)
        ref_model, f = rebuilt(model, **opts)
        assert f.q.levels == levels and np.unique(f.q.codes).size <= levels
        res = qsdonnx.optimize(model, format=fmt, validate=False, **opts)
        [layer] = res.report.layers
        assert layer["levels"] == levels and layer["bits"] == level_bits(levels)
        x = feeds(model)
        want = session(ref_model).run(None, x)[0]
        for level in OPT:
            got = session(res.model, graph_optimization_level=level).run(None, x)[0]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("kind", ["matmul", "matmul-odd"])
@pytest.mark.parametrize("levels", LEVELS)
def test_the_file_holds_the_counted_bytes(tmp_path, levels, kind):
    model = MODELS[kind]()
    src = save(model, tmp_path / "in.onnx")
    dst = tmp_path / "out.onnx"
    res = qsdonnx.optimize(src, dst, **options(levels, False))
    _, f = rebuilt(model, **options(levels, False))
    [layer] = res.report.layers
    out = onnx.load(str(dst))

    def stored(prefix: str) -> int:
        return sum(len(t.raw_data) if t.raw_data else nh.to_array(t).nbytes
                   for t in out.graph.initializer if t.name.startswith(prefix))

    # The weight's own initializers are exactly the factorization's count; the decoding
    # constants every weight shares (the digit table) are counted with the first weight.
    assert stored("W.qsd") == f.nbytes()
    shared = stored("qsd.")
    assert 0 < shared <= shared_decode_bytes(level_decoders(levels))
    assert layer["bytes_after"] == f.nbytes() + shared
    K, N = f.shape
    codes = f.nbytes() - (K // 32) * N * 2 - N * (K // 32 * 4 + 7) // 8
    assert codes <= K * N * LEVEL_WORDS[levels] / 24 + 40  # three codes a word, a few constants


def _record(view: str) -> WeightRecord:
    shape = (30522, 384) if view == "embedding" else (384, 384)
    op = "Gather" if view == "embedding" else "MatMul"
    return WeightRecord(name="W", op=op, nodes=["n"], shape=shape, dtype="float32", location="initializer",
                        view=view, matrix_shape=shape[::-1] if view == "embedding" else shape)


def test_planner_offers_levels_only_when_listed_and_never_to_tables(monkeypatch):
    import qsdonnx.passes.factorize as fz

    linear = candidate_choices(_record("matmul"), OptimizeConfig(bits_per_weight=3), True)
    assert {c.levels for c in linear} == {None}  # not offered by default (see PLAN_LEVELS)
    asked = candidate_choices(_record("matmul"), OptimizeConfig(bits_per_weight=3, levels=12), True)
    assert {c.levels for c in asked} == {None, 12}
    monkeypatch.setattr(fz, "PLAN_LEVELS", tuple(LEVELS))
    linear = candidate_choices(_record("matmul"), OptimizeConfig(bits_per_weight=3), True)
    assert {c.levels for c in linear} == {None, *LEVELS}
    assert all(c.method == "gptq" for c in linear if c.levels)
    table = candidate_choices(_record("embedding"), OptimizeConfig(bits_per_weight=3), True)
    assert all(c.levels is None for c in table)


def test_cli_levels_and_override(tmp_path):
    src = save(MODELS["matmul"](), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    r = CliRunner().invoke(cli, ["optimize", str(src), "-o", str(out), "--method", "rtn", "--levels", "10",
                                 "--min-elements", "16", "--no-validate"])
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith("W "))
    assert " 3.33 " in row  # the bits column gives the stored bits a code
    # an override's bits win over --levels; its levels over --bits
    res = qsdonnx.optimize(src, None, method="rtn", levels=10, min_elements=16, validate=False, progress=False,
                           overrides=(qsdonnx.config.parse_override("W:bits=8"),))
    assert res.report.layers[0]["bits"] == 8 and res.report.layers[0]["levels"] is None
    res = qsdonnx.optimize(src, None, method="rtn", bits=4, min_elements=16, validate=False, progress=False,
                           overrides=(qsdonnx.config.parse_override("W:levels=5"),))
    assert res.report.layers[0]["levels"] == 5 and res.report.layers[0]["bits"] == 3


def test_bad_levels_are_one_line_errors(tmp_path):
    src = save(MODELS["matmul"](), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    for args, words in ((["--levels", "7"], "7"), (["--levels", "10", "--method", "svd"], "--levels")):
        r = CliRunner().invoke(cli, ["optimize", str(src), "-o", str(out), *args])
        assert r.exit_code == 2 and words in r.output
        assert not out.exists()
    r = CliRunner().invoke(cli, ["optimize", str(src), "-o", str(out), "--override", "W:levels=9"])
    assert r.exit_code == 2 and "levels" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("bpw", [2.5, 3.4, 3.9])
def test_budget_holds_the_shared_digit_tables(bpw, monkeypatch):
    import qsdonnx.passes.factorize as fz

    monkeypatch.setattr(fz, "PLAN_LEVELS", tuple(LEVELS))
    # On a small model the digit table of an alphabet (up to 5 KiB) costs more than its codes
    # save: the plan sets the tables it uses aside, and the total stays within the budget.
    rng = np.random.default_rng(3)
    W1, W2 = rng.standard_normal((128, 96)).astype(np.float32), rng.standard_normal((96, 64)).astype(np.float32)
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
                      h.make_node("MatMul", ["a", "W2"], ["y"], name="mm2")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["n", 128])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 64])],
                     [nh.from_array(W1, "W1"), nh.from_array(W2, "W2")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    res = qsdonnx.optimize(model, bits_per_weight=bpw, progress=False, min_elements=16, validate=False, rotate=False)
    t = res.report.totals
    assert t["compressed_bytes_after"] == sum(l["bytes_after"] for l in res.report.layers)
    assert t["bits_per_weight"] <= bpw


def test_levels_without_a_budget_spend_what_their_codes_take(tmp_path):
    # The planner (method auto) spends what round-to-nearest with the asked alphabet would.
    model = matmul_model(768, 384)  # large enough that the digit table pays for itself
    res = qsdonnx.optimize(model, levels=10, block_size=32, progress=False, min_elements=16, validate=False,
                           rotate=False)
    [layer] = res.report.layers
    assert layer["bytes_after"] <= rtn_bytes(768, 384, 10) + shared_decode_bytes(level_decoders(10))
    assert layer["levels"] == 10 and layer["method"] == "rtn" and layer["bpw"] < 4.05


def rtn_bytes(K: int, N: int, levels: int) -> int:
    from qsdonnx.factorize.budget import rtn_nbytes
    return rtn_nbytes(K, N, level_bits(levels), 32, False, "float16", levels)
