"""The command line: exit codes, one-line ``error:`` messages, nothing written on failure,
``inspect``, ``validate`` and ``--help``.

Most cases go through ``click.testing.CliRunner`` (fast, in-process); a few run the real
process (``python -m qsdonnx.cli`` and the ``qsdonnx`` console script) to check the exit code
the shell sees.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import (
    constant_node_model, feeds_for, if_model, make_model, matmul_model, randn, rel_l2, run_model, save,
    save_external, sha256, shared_weight_model, two_layer_model,
)
from qsdonnx.cli import cli

SCRIPT = shutil.which("qsdonnx") or str(Path(sys.executable).with_name("qsdonnx"))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def run_process(*args, module=True):
    cmd = ([sys.executable, "-m", "qsdonnx.cli"] if module else [SCRIPT]) + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def error_line(stderr: str) -> str:
    """The whole of stderr, which must be exactly one line starting with ``error:``."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def model_path(tmp_path) -> Path:
    return save(matmul_model(), tmp_path / "model.onnx")


def assert_failed_cleanly(result, outdir: Path, inputs: dict, code: int = 2, *needles) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    line = error_line(result.stderr)
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    assert os.listdir(outdir) == [], f"left behind: {os.listdir(outdir)}"
    for path, digest in inputs.items():
        assert sha256(path) == digest, f"{path} was modified"
    return line


# ---------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written, input untouched
# ---------------------------------------------------------------------------------------------
def test_missing_input_real_exit_code(tmp_path, outdir):
    missing = tmp_path / "nope.onnx"
    r = run_process("optimize", missing, "-o", outdir / "o.onnx")
    assert r.returncode == 2
    line = error_line(r.stderr)
    assert "nope.onnx" in line and "does not exist" in line
    assert r.stdout == ""
    assert os.listdir(outdir) == []


def test_not_onnx(tmp_path, outdir):
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file, not a model\n" * 20)
    r = invoke("optimize", text, "-o", outdir / "o.onnx")
    assert_failed_cleanly(r, outdir, {text: sha256(text)}, 2, "notes.onnx", "not a valid ONNX model")


def test_empty_file(tmp_path, outdir):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    r = invoke("optimize", empty, "-o", outdir / "o.onnx")
    assert_failed_cleanly(r, outdir, {empty: sha256(empty)}, 2, "empty")


def test_truncated_onnx(tmp_path, outdir, model_path):
    raw = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(raw[: len(raw) // 2])
    r = invoke("optimize", cut, "-o", outdir / "o.onnx")
    assert_failed_cleanly(r, outdir, {cut: sha256(cut)}, 2, "cut.onnx", "not a valid ONNX model")


def test_missing_external_data(tmp_path, outdir):
    d = tmp_path / "ext"
    d.mkdir()
    model = save_external(two_layer_model(), d / "m.onnx", "m.weights")
    (d / "m.weights").unlink()
    r = invoke("optimize", model, "-o", outdir / "o.onnx")
    assert_failed_cleanly(r, outdir, {model: sha256(model)}, 2, "m.weights", "missing")


def test_truncated_external_data(tmp_path, outdir):
    d = tmp_path / "ext"
    d.mkdir()
    model = save_external(two_layer_model(), d / "m.onnx", "m.weights")
    data = d / "m.weights"
    data.write_bytes(data.read_bytes()[:1000])
    r = invoke("optimize", model, "-o", outdir / "o.onnx")
    assert_failed_cleanly(r, outdir, {model: sha256(model), data: sha256(data)}, 2, "m.weights")


def test_output_equal_to_input(tmp_path, model_path):
    digest = sha256(model_path)
    mtime = os.stat(model_path).st_mtime_ns
    listing = sorted(os.listdir(tmp_path))
    r = invoke("optimize", model_path, "-o", model_path)
    assert r.exit_code == 2
    line = error_line(r.stderr)
    assert "input model" in line
    assert sha256(model_path) == digest and os.stat(model_path).st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == listing


def test_output_equal_to_input_through_other_spelling(tmp_path, model_path):
    digest = sha256(model_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    r = invoke("optimize", model_path, "-o", sub / ".." / "model.onnx")
    assert r.exit_code == 2
    assert "input model" in error_line(r.stderr)
    assert sha256(model_path) == digest


def test_output_directory_does_not_exist(tmp_path, model_path):
    target = tmp_path / "no" / "such" / "dir" / "o.onnx"
    r = invoke("optimize", model_path, "-o", target)
    assert r.exit_code == 2
    line = error_line(r.stderr)
    assert "does not exist" in line and "such" in line
    assert not (tmp_path / "no").exists()
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_output_directory_not_writable(tmp_path, model_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with privileges that ignore directory permissions (root)")
        r = invoke("optimize", model_path, "-o", locked / "o.onnx")
        assert r.exit_code == 2
        assert "not writable" in error_line(r.stderr)
        assert os.listdir(locked) == []
    finally:
        locked.chmod(stat.S_IRWXU)


def test_bits_per_weight_zero(outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--bits-per-weight", "0")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "--bits-per-weight")


def test_rank_larger_than_matrix(outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "svd", "--rank", "65")
    line = assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "65")
    assert "'W'" in line and "64" in line  # names the weight and its limit min(K, N) = 64


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight(tmp_path, outdir, bad):
    W = randn((128, 64), 3)
    W[7, 9] = bad
    W[100, 2] = bad
    path = save(matmul_model(weight=W), tmp_path / "bad.onnx")
    r = invoke("optimize", path, "-o", outdir / "o.onnx")
    # The one weight is skipped with its reason; with nothing left, exit 4 and nothing written.
    line = assert_failed_cleanly(r, outdir, {path: sha256(path)}, 4, "nothing to compress", "NaN/Inf")
    assert "holds 2 " in line  # how many


def test_bad_regex_and_block_size(outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--exclude", "[")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "--exclude")
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--block-size", "1")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "--block-size")
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--input-shape", "X:4,abc")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "--input-shape")
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--no-validate", "--max-rel-error", "0.1")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "--max-rel-error")


def test_missing_validation_inputs(tmp_path, outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "rtn", "--inputs", tmp_path / "none.npz")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "none.npz")


def test_validation_inputs_with_wrong_shape(tmp_path, outdir, model_path):
    np.savez(tmp_path / "wrong.npz", X=randn((4, 100), 5))  # the model takes (4, 128)
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "rtn", "--inputs", tmp_path / "wrong.npz")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "X")


def test_input_shape_that_does_not_fit(tmp_path, outdir):
    model = make_model([helper.make_node("MatMul", ["X", "W"], ["Y"])],
                       [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 128])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 64])],
                       [numpy_helper.from_array(randn((128, 64)), "W")])
    path = save(model, tmp_path / "dyn.onnx")
    r = invoke("optimize", path, "-o", outdir / "o.onnx", "--method", "rtn", "--input-shape", "X:2,100")
    assert_failed_cleanly(r, outdir, {path: sha256(path)}, 2, "X")


def test_report_path_in_missing_directory(tmp_path, outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "rtn",
               "--report", tmp_path / "nodir" / "r.json")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "r.json")


def test_newest_ir_input_gives_no_traceback(tmp_path, outdir):
    model = matmul_model()
    model.ir_version = onnx.IR_VERSION  # 14 with onnx 1.23; ORT 1.31 reads up to 13
    path = save(model, tmp_path / "ir.onnx")
    r = invoke("optimize", path, "-o", outdir / "o.onnx", "--method", "rtn")
    assert r.exit_code in (0, 2), (r.exit_code, repr(r.exception))
    if r.exit_code == 0:
        assert onnx.load(str(outdir / "o.onnx")).ir_version <= 13
    else:
        error_line(r.stderr)


# ---------------------------------------------------------------------------------------------
# --max-rel-error: exit 3
# ---------------------------------------------------------------------------------------------
def test_max_rel_error_missed_writes_nothing(outdir, model_path):
    digest = sha256(model_path)
    r = run_process("optimize", model_path, "-o", outdir / "o.onnx", "--method", "rtn", "--bits", "4",
                    "--max-rel-error", "1e-9")
    assert r.returncode == 3
    assert os.listdir(outdir) == []
    assert sha256(model_path) == digest
    line = error_line(r.stderr)
    m = re.search(r"error ([0-9.e+-]+) exceeds", line)
    assert m and 1e-3 < float(m.group(1)) < 0.15  # the 4-bit error, stated in the message


def test_max_rel_error_met_exit_zero(outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "rtn", "--bits", "8",
               "--max-rel-error", "0.02")
    assert r.exit_code == 0, r.stderr
    assert os.listdir(outdir) == ["o.onnx"]


def test_keep_on_fail_writes_and_exits_3(outdir, model_path):
    report = outdir / "r.json"
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "rtn", "--bits", "4",
               "--max-rel-error", "1e-9", "--keep-on-fail", "--report", report)
    assert r.exit_code == 3
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "keep-on-fail" in err[0]
    assert sorted(os.listdir(outdir)) == ["o.onnx", "r.json"]
    out = onnx.load(str(outdir / "o.onnx"))
    onnx.checker.check_model(out, full_check=True)
    feeds = feeds_for(matmul_model())
    assert 1e-3 < rel_l2(run_model(model_path, feeds)[0], run_model(outdir / "o.onnx", feeds)[0]) < 0.15
    data = json.loads(report.read_text())
    assert data["validation"]["max_rel_l2"] > 1e-9


# ---------------------------------------------------------------------------------------------
# successful runs through the CLI
# ---------------------------------------------------------------------------------------------
def test_optimize_via_console_script(tmp_path, outdir):
    path = save(two_layer_model(), tmp_path / "m.onnx")
    report = outdir / "r.json"
    r = run_process("optimize", path, "-o", outdir / "q.onnx", "--method", "rtn", "--bits", "4",
                    "--block-size", "32", "--symmetric", "--exclude", "fc2", "--report", report, module=False)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert f"wrote {outdir / 'q.onnx'}" in r.stdout
    data = json.loads(report.read_text())
    status = {l["name"]: l["status"] for l in data["layers"]}
    assert status == {"fc1.weight": "compressed", "fc2.weight": "skipped"}
    assert data["totals"]["bits_per_weight"] == 4.5
    assert sorted(os.listdir(outdir)) == ["q.onnx", "r.json"]
    # a clean run writes nothing to stderr (no stray library warnings)
    assert r.stderr.strip() == "", r.stderr


def test_optimize_flags_reach_the_config(tmp_path, outdir):
    path = save(matmul_model(), tmp_path / "m.onnx")
    report = outdir / "r.json"
    r = invoke("optimize", path, "-o", outdir / "q.onnx", "--method", "rtn", "--bits", "8", "--block-size", "64",
               "--asymmetric", "--min-elements", "100", "--no-validate", "--report", report)
    assert r.exit_code == 0, r.stderr
    data = json.loads(report.read_text())
    [layer] = data["layers"]
    assert (layer["bits"], layer["block_size"], layer["method"]) == (8, 64, "rtn")
    assert data["config"]["symmetric"] is False and data["config"]["min_elements"] == 100
    assert data["validation"] in ({}, None)
    # 8-bit codes + fp16 scale/64 + 8-bit zero point/64
    assert layer["bpw"] == pytest.approx(8 + 16 / 64 + 8 / 64)


def test_lplr_budget_flag(tmp_path, outdir):
    path = save(matmul_model(), tmp_path / "m.onnx")
    report = outdir / "r.json"
    r = invoke("optimize", path, "-o", outdir / "q.onnx", "--method", "lplr", "--bits", "4",
               "--bits-per-weight", "3", "--report", report, "--input-shape", "X:4,128")
    assert r.exit_code == 0, r.stderr
    [layer] = json.loads(report.read_text())["layers"]
    assert layer["method"] == "lplr" and layer["bpw"] <= 3.0


def test_min_elements_flag(tmp_path, outdir):
    path = save(matmul_model(), tmp_path / "m.onnx")
    report = outdir / "r.json"
    r = invoke("optimize", path, "-o", outdir / "q2.onnx", "--method", "rtn", "--min-elements", "10000",
               "--report", report)
    assert_failed_cleanly(r, outdir, {path: sha256(path)}, 4, "nothing to compress", "10000")


# ---------------------------------------------------------------------------------------------
# inspect and validate
# ---------------------------------------------------------------------------------------------
def test_inspect_lists_constant_node_weights(tmp_path):
    path = save(constant_node_model(), tmp_path / "c.onnx")
    digest = sha256(path)
    r = invoke("inspect", path)
    assert r.exit_code == 0, r.stderr
    row = next(l for l in r.stdout.splitlines() if l.startswith("Wconst"))
    cells = row.split()
    assert cells[1] == "MatMul" and cells[2] == "128x64" and cells[3] == "32,768"
    assert cells[4] == "constant-node" and cells[5] == "compress"
    assert "1 of 1 weights would be compressed" in r.stdout
    r = invoke("inspect", path, "--json")
    [entry] = json.loads(r.stdout)
    assert entry["location"] == "constant-node" and entry["status"] == "would compress"
    assert entry["shape"] == [128, 64] and entry["bytes"] == 128 * 64 * 4
    assert sha256(path) == digest
    assert sorted(os.listdir(tmp_path)) == ["c.onnx"]


def test_inspect_shows_skips_and_reasons(tmp_path):
    path = save(if_model(), tmp_path / "if.onnx")
    r = invoke("inspect", path, "--json")
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert entries["W_top"]["status"] == "would compress"
    assert entries["then_w"]["status"] == "skip" and "subgraph" in entries["then_w"]["reason"]
    r = invoke("inspect", path, "--min-elements", "100000", "--json")
    assert all(e["status"] == "skip" for e in json.loads(r.stdout))


def test_inspect_missing_file(tmp_path):
    r = invoke("inspect", tmp_path / "gone.onnx")
    assert r.exit_code == 2 and "gone.onnx" in error_line(r.stderr)


def test_validate_prints_metrics_per_output(tmp_path):
    orig = save(shared_weight_model(), tmp_path / "orig.onnx")
    comp = tmp_path / "comp.onnx"
    r = invoke("optimize", orig, "-o", comp, "--method", "rtn", "--bits", "4", "--no-validate")
    assert r.exit_code == 0, r.stderr
    r = invoke("validate", orig, comp)
    assert r.exit_code == 0, r.stderr
    lines = {l.split(":")[0]: l for l in r.stdout.splitlines() if l.strip()}
    assert set(lines) == {"Y1", "Y2"}
    for line in lines.values():
        for key in ("rel L2", "cosine", "SQNR", "max abs"):
            assert key in line
        rel = float(re.search(r"rel L2 ([0-9.e+-]+)", line).group(1))
        cos = float(re.search(r"cosine ([0-9.]+)", line).group(1))
        assert 1e-3 < rel < 0.15 and 0.98 < cos < 1.0
    r = invoke("validate", orig, comp, "--max-rel-error", "1e-9")
    assert r.exit_code == 3 and "exceeds" in r.stderr
    r = invoke("validate", orig, orig)
    assert r.exit_code == 0
    assert all("rel L2 0.000e+00" in l for l in r.stdout.splitlines() if l.strip())


def test_validate_with_given_inputs_matches_independent_run(tmp_path):
    orig = save(matmul_model(), tmp_path / "orig.onnx")
    comp = tmp_path / "comp.onnx"
    assert invoke("optimize", orig, "-o", comp, "--bits", "4", "--method", "rtn", "--no-validate").exit_code == 0
    X = randn((4, 128), 77)
    np.savez(tmp_path / "x.npz", X=X)
    r = invoke("validate", orig, comp, "--inputs", tmp_path / "x.npz", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    want = rel_l2(run_model(orig, {"X": X})[0], run_model(comp, {"X": X})[0])
    assert data["outputs"]["Y"]["disable_all"]["rel_l2"] == pytest.approx(want, rel=1e-4)
    assert data["max_rel_l2"] >= data["outputs"]["Y"]["disable_all"]["rel_l2"]


def test_validate_missing_compressed(tmp_path, model_path):
    r = invoke("validate", model_path, tmp_path / "missing.onnx")
    assert r.exit_code == 2 and "missing.onnx" in error_line(r.stderr)


# ---------------------------------------------------------------------------------------------
# --help
# ---------------------------------------------------------------------------------------------
OPTIMIZE_OPTIONS = ["--output", "-o", "--method", "--bits", "--block-size", "--rank", "--bits-per-weight",
                    "--exclude", "--min-elements", "--asymmetric", "--no-validate", "--max-rel-error",
                    "--keep-on-fail", "--report", "--input-shape", "--inputs", "--external-data"]
HELP = {
    "optimize": OPTIMIZE_OPTIONS,
    "inspect": ["--json", "--min-elements"],
    "validate": ["--inputs", "--input-shape", "--num-inputs", "--max-rel-error", "--json"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_mentions_every_option(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0
    words = set(re.findall(r"(?<![\w-])--?[a-z][a-z-]*", r.stdout))
    missing = [o for o in HELP[command] if o not in words]
    assert not missing, f"{command} --help lacks {missing}"
    if command == "optimize":
        for method in ("rtn", "svd", "lplr"):
            assert method in r.stdout
        assert re.search(r"\[2\|3\|4\|8\]", r.stdout)


def test_help_real_processes():
    top = run_process("--help", module=True)
    assert top.returncode == 0
    for cmd in ("optimize", "inspect", "validate"):
        assert re.search(rf"^\s+{cmd}\b", top.stdout, re.M), top.stdout
    script = run_process("optimize", "--help", module=False)
    assert script.returncode == 0
    assert all(o in script.stdout for o in OPTIMIZE_OPTIONS)


def test_calib_mask_not_an_input(outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "gptq", "--calib-mask", "tok_mask")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "--calib-mask", "tok_mask")


def test_pq_with_three_bits(outdir, model_path):
    r = invoke("optimize", model_path, "-o", outdir / "o.onnx", "--method", "pq", "--bits", "3")
    assert_failed_cleanly(r, outdir, {model_path: sha256(model_path)}, 2, "pq")


@pytest.mark.parametrize("module", [True, False])
@pytest.mark.parametrize("args, needle", [
    (["--levels", "7"], "'--levels'"),
    (["--method", "bogus"], "'--method'"),
    (["--bits", "x"], "'--bits'"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_option_is_one_error_line_real_process(tmp_path, outdir, model_path, module, args, needle):
    before = sha256(model_path)
    out = outdir / "m.onnx"
    proc = run_process("optimize", model_path, "-o", out, *args, module=module)
    assert proc.returncode == 2
    assert needle in error_line(proc.stderr)
    assert proc.stdout == ""
    assert not out.exists() and list(outdir.iterdir()) == []
    assert sha256(model_path) == before


def test_missing_output_option_real_process(model_path):
    proc = run_process("optimize", model_path)
    assert proc.returncode == 2
    assert "'-o' / '--output'" in error_line(proc.stderr)


def test_external_data_flag_writes_tensors_next_to_the_output(tmp_path, outdir, model_path):
    before = sha256(model_path)
    out = outdir / "m.onnx"
    r = invoke("optimize", model_path, "-o", out, "--method", "rtn", "--bits", "4", "--external-data")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(outdir)) == ["m.onnx", "m.onnx.data"]
    assert sha256(model_path) == before
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
    assert (outdir / "m.onnx.data").stat().st_size >= 128 * 64 // 2  # the 4-bit codes at least
    feeds = feeds_for(matmul_model())
    assert rel_l2(run_model(model_path, feeds)[0], run_model(out, feeds)[0]) < 0.1


def test_output_over_the_protobuf_limit(tmp_path, outdir, model_path, monkeypatch):
    """An output over the one-file limit goes to external data by itself, and
    --no-external-data refuses it with one line and leaves nothing behind."""
    from qsdonnx.passes import save

    monkeypatch.setattr(save, "PROTOBUF_LIMIT", 2000)  # the test model's output is about 5 kB
    r = invoke("optimize", model_path, "-o", outdir / "m.onnx", "--method", "rtn", "--bits", "4",
               "--no-external-data")
    assert r.exit_code == 2, r.output
    assert "over protobuf's 2 GB limit" in error_line(r.output)
    assert os.listdir(outdir) == []
    r = invoke("optimize", model_path, "-o", outdir / "m.onnx", "--method", "rtn", "--bits", "4")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(outdir)) == ["m.onnx", "m.onnx.data"]
    feeds = feeds_for(matmul_model())
    assert rel_l2(run_model(model_path, feeds)[0], run_model(outdir / "m.onnx", feeds)[0]) < 0.1


def test_output_check_sees_shapes_without_the_weights(tmp_path):
    """The output check runs onnx's full check on the graph with its weights left out: a wrong
    shape is still caught (and nothing is written), a right one passes and is loadable."""
    from onnx import helper, numpy_helper

    from qsdonnx.errors import OutputError
    from qsdonnx.passes.save import save_model

    W = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")  # 16 kB: left out of the check
    for out_dim in (32, 64):
        g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, out_dim])], [W])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        out = tmp_path / f"m{out_dim}.onnx"
        if out_dim == 32:
            with pytest.raises(OutputError, match="shape inference"):
                save_model(m, out)
            assert os.listdir(tmp_path) == []
        else:
            save_model(m, out)
            assert os.listdir(tmp_path) == [out.name]
            x = np.ones((1, 64), np.float32)
            assert np.allclose(run_model(out, {"x": x})[0], 64.0)


def test_terminated_run_leaves_nothing_behind(tmp_path):
    """SIGTERM in the middle of a run (here: sent by the run itself after its first weight is
    lowered into the output's data file) exits with 143, writes no output and removes its
    temporary data files; the input is untouched."""
    from conftest import file_state

    (tmp_path / "in").mkdir()
    src = save_external(two_layer_model(), tmp_path / "in" / "model.onnx")
    before = {p.name: file_state(p) for p in src.parent.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = (
        "import os, signal, sys\n"
        "import qsdonnx.passes.factorize as f\n"
        "done = f.FactorizeWeightsPass._done\n"
        "def stop(self, ctx, rec, fac):\n"
        "    done(self, ctx, rec, fac)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "f.FactorizeWeightsPass._done = stop\n"
        "sys.argv = ['qsdonnx'] + sys.argv[1:]\n"
        "from qsdonnx.cli import main\n"
        "main()\n")
    proc = subprocess.run([sys.executable, "-c", script, "optimize", str(src), "-o", str(out_dir / "out.onnx"),
                           "--method", "rtn", "--bits", "4", "--external-data", "--min-elements", "16",
                           "--no-validate", "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert list(out_dir.iterdir()) == []
    assert {p.name: file_state(p) for p in src.parent.iterdir()} == before
