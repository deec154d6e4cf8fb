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


@pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="needs the source tree")
def test_cpp_core(tmp_path):
    cmake = _tool("cmake")
    if cmake is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs cmake and a C++ compiler")
    build = tmp_path / "build"
    gen = ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"] if _tool("ninja") else []
    for step in ([cmake, "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                  "-DIMGTX_FAST_PYTHON=OFF", "-DIMGTX_FAST_CUDA=OFF", "-DIMGTX_FAST_BUILD_TESTS=ON"],
                 [cmake, "--build", str(build), "--target", "imgtx_core_tests", "--parallel", "2"]):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    exe = build / "imgtx_core_tests"
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout and "passed" in out.stdout
