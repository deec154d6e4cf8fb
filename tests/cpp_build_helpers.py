"""Builds one of the project's C++ test executables (tests/cpp) with CMake in a temporary folder
and runs it; shared by test_cpp_core.py and test_simt_emulator.py."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_tree = pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="needs the source tree")


def tool(name):
    found = shutil.which(name)
    if found:
        return found
    try:  # the PyPI cmake/ninja packages, as the build uses
        mod = __import__(name)
        path = Path(getattr(mod, "CMAKE_BIN_DIR" if name == "cmake" else "BIN_DIR")) / name
        return str(path) if path.exists() else None
    except (ImportError, AttributeError):
        return None


def build_and_run(tmp_path, target, extra_cmake_args=(), runner=()):
    """Configures a tests-only build (no Python module, no CUDA), builds `target` with 2 jobs,
    runs it, and asserts that it exits 0 and prints its "N passed, 0 failed" line."""
    cmake = tool("cmake")
    build = tmp_path / "build"
    gen = ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}"] if tool("ninja") else []
    for step in ([cmake, "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                  "-DIMGTX_FAST_PYTHON=OFF", "-DIMGTX_FAST_CUDA=OFF", "-DIMGTX_FAST_BUILD_TESTS=ON",
                  *extra_cmake_args],
                 [cmake, "--build", str(build), "--target", target, "--parallel", "2"]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = subprocess.run([*runner, str(build / target)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout and "passed" in out.stdout
    return out.stdout
