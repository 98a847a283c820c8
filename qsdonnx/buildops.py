"""Build and locate the qsdonnx custom-op library (``libqsdonnx_ops.so``).

The library implements the ``qsdonnx::QsdMatMul`` operator for ONNX Runtime
(CPU kernel, plus a CUDA kernel when built with CUDA). It is compiled from
``custom_ops/`` with CMake against the ONNX Runtime C API headers, which
``custom_ops/fetch_headers.sh`` unpacks from Debian's ``libonnxruntime-dev``.

The sources ship inside the installed package (``qsdonnx/custom_ops``); a source
checkout uses ``custom_ops/`` at the top of the repository.  The library is built
into ``<sources>/build/`` when that folder is writable (a checkout), otherwise into
the user cache ``${XDG_CACHE_HOME:-~/.cache}/qsdonnx/ops-<version>/`` (an
installed wheel).  ``QSDONNX_OPS_LIB`` points at a library built elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

__all__ = [
    "LIBRARY_NAME",
    "ENV_LIBRARY",
    "build_ops",
    "default_build_dir",
    "default_library_path",
    "find_ops_library",
    "source_dir",
    "user_build_dir",
]

LIBRARY_NAME = "libqsdonnx_ops.so"
ENV_LIBRARY = "QSDONNX_OPS_LIB"


def source_dir() -> Path:
    """Directory holding the C++/CUDA sources and CMakeLists.txt: the copy inside the
    installed package, else the checkout's ``custom_ops/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "custom_ops"
    if (packaged / "CMakeLists.txt").is_file():
        return packaged
    return here.parent / "custom_ops"


def _version() -> str:
    from . import __version__
    return __version__


def user_build_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "qsdonnx" / f"ops-{_version()}"


def _writable(d: Path) -> bool:
    probe = d if d.exists() else d.parent
    return os.access(probe, os.W_OK)


def default_build_dir() -> Path:
    """``<sources>/build`` when the sources are writable, else :func:`user_build_dir`."""
    src = source_dir()
    return src / "build" if _writable(src) else user_build_dir()


def default_library_path() -> Path:
    return default_build_dir() / LIBRARY_NAME


def find_ops_library() -> Path | None:
    """Path of the built library, or None.

    The environment variable ``QSDONNX_OPS_LIB`` overrides the default locations
    (it is returned only if the file exists); otherwise ``<sources>/build`` and then
    the user cache are searched.
    """
    env = os.environ.get(ENV_LIBRARY)
    if env:
        p = Path(env).expanduser()
        return p if p.is_file() else None
    for d in (source_dir() / "build", user_build_dir()):
        p = d / LIBRARY_NAME
        if p.is_file():
            return p
    return None


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def _run(cmd: list[str], what: str, verbose: bool) -> None:
    try:
        proc = subprocess.run(
            cmd,
            stdout=None if verbose else subprocess.PIPE,
            stderr=subprocess.STDOUT if not verbose else None,
            text=True, check=False,
        )
    except FileNotFoundError as exc:
        raise RuntimeError(f"{what} failed: {cmd[0]} not found") from exc
    if proc.returncode != 0:
        tail = ""
        if not verbose and proc.stdout:
            lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
            err = [ln for ln in lines if "error" in ln.lower()]
            tail = ": " + (err[0] if err else lines[-1]).strip() if lines else ""
        raise RuntimeError(f"{what} failed (exit code {proc.returncode}){tail}")


def build_ops(cuda: bool | None = None, build_dir: str | os.PathLike | None = None,
              verbose: bool = False, jobs: int = 2) -> Path:
    """Fetch the ONNX Runtime headers if needed, configure and build the library.

    ``cuda=None`` builds the CUDA kernel when ``nvcc`` is available (falling
    back to the CPU kernel alone, with a RuntimeWarning, if that build fails);
    ``cuda=True`` requires it. Returns the path of ``libqsdonnx_ops.so``.
    Raises RuntimeError on failure.
    """
    src = source_dir()
    if not (src / "CMakeLists.txt").is_file():
        raise RuntimeError(f"custom op sources not found at {src}")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found; install cmake (>= 3.18) and a C++17 compiler")
    nvcc = _nvcc()
    auto = cuda is None
    if auto:
        cuda = nvcc is not None
    if cuda and nvcc is None:
        raise RuntimeError("CUDA build requested but nvcc was not found")

    bdir = Path(build_dir) if build_dir is not None else default_build_dir()
    # Headers go next to the sources in a checkout, into the build folder otherwise.
    headers = (src if _writable(src) else bdir) / "third_party" / "onnxruntime"
    _run(["env", f"QSD_HEADERS_DEST={headers}", "bash", str(src / "fetch_headers.sh")],
         "fetching the ONNX Runtime headers", verbose)
    include = headers / "usr" / "include" / "onnxruntime"
    if auto and cuda:
        try:
            return _configure_and_build(cmake, src, bdir, include, nvcc, verbose, jobs)
        except RuntimeError as exc:
            warnings.warn(f"CUDA build of the custom op library failed ({exc}); "
                          "building the CPU kernel only", RuntimeWarning, stacklevel=2)
            return _configure_and_build(cmake, src, bdir, include, None, verbose, jobs)
    return _configure_and_build(cmake, src, bdir, include, nvcc if cuda else None, verbose, jobs)


def _configure_and_build(cmake: str, src: Path, bdir: Path, include: Path, nvcc: str | None,
                         verbose: bool, jobs: int) -> Path:
    bdir.mkdir(parents=True, exist_ok=True)
    lib = bdir / LIBRARY_NAME
    configure = [
        cmake, "-S", str(src), "-B", str(bdir),
        "-DCMAKE_BUILD_TYPE=Release", f"-DORT_INCLUDE_DIR={include}",
        f"-DQSD_WITH_CUDA={'ON' if nvcc else 'OFF'}",
    ]
    if nvcc:
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    _run(configure, "configuring the custom op library (cmake)", verbose)
    _run([cmake, "--build", str(bdir), "-j", str(max(1, int(jobs)))],
         "building the custom op library", verbose)
    if not lib.is_file():
        raise RuntimeError(f"build finished but {lib} was not produced")
    return lib
