"""An installed qsdonnx can build its custom-op library: the wheel carries the sources."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qsdonnx import buildops

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_custom_op_sources(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = tmp_path.glob("qsdonnx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT / "custom_ops").as_posix() for p in (ROOT / "custom_ops" / "src").iterdir()}
    for rel in ["CMakeLists.txt", "fetch_headers.sh", *sources]:
        assert f"qsdonnx/custom_ops/{rel}" in names, rel
    assert not any("/build/" in n or "third_party" in n for n in names)  # no build products


def test_build_dir_falls_back_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(buildops.ENV_LIBRARY, raising=False)
    monkeypatch.setattr(buildops, "_writable", lambda d: False)
    assert buildops.default_build_dir() == tmp_path / "qsdonnx" / f"ops-{buildops._version()}"
    # A library found in the user cache is used when the sources hold none.
    monkeypatch.setattr(buildops, "source_dir", lambda: tmp_path / "no-sources")
    assert buildops.find_ops_library() is None
    lib = buildops.user_build_dir() / buildops.LIBRARY_NAME
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    assert buildops.find_ops_library() == lib
