"""Builds and runs the C++ tests of the core (tests/cpp), which use no Python and no torch."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    found = shutil.which(name)
    if found:
        return found
    try:  # the PyPI cmake/ninja packages, as the build uses
        mod = __import__(name)
        path = Path(getattr(mod, "CMAKE_BIN_DIR" if name == "cmake" else "BIN_DIR")) / name
        return str(path) if path.exists() else None
    except (ImportError, AttributeError):
        return None


def _build_and_run(tmp_path, extra_cmake_args=(), runner=()):
    cmake = _tool("cmake")
    build = tmp_path / "build"
    gen = ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"] if _tool("ninja") else []
    for step in ([cmake, "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                  "-DIMGTX_FAST_PYTHON=OFF", "-DIMGTX_FAST_CUDA=OFF", "-DIMGTX_FAST_BUILD_TESTS=ON",
                  *extra_cmake_args],
                 [cmake, "--build", str(build), "--target", "imgtx_core_tests", "--parallel", "2"]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = subprocess.run([*runner, str(build / "imgtx_core_tests")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout and "passed" in out.stdout


needs_tree = pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="needs the source tree")


@needs_tree
def test_cpp_core(tmp_path):
    if _tool("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs cmake and a C++ compiler")
    _build_and_run(tmp_path)


@needs_tree
def test_cpp_core_portable_path_on_aarch64(tmp_path):
    """DESIGN: the portable fallback builds and passes on any CPU, aarch64 too. Cross-compiled
    and run under qemu-user (Debian: g++-aarch64-linux-gnu qemu-user; .ci/run installs them)."""
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if _tool("cmake") is None or cxx is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64")
    _build_and_run(tmp_path, ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                              f"-DCMAKE_CXX_COMPILER={cxx}"],
                   runner=[qemu, "-L", "/usr/aarch64-linux-gnu"])
