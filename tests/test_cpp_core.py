"""Builds and runs the C++ tests of the core (tests/cpp), which use no Python and no torch."""
import os
import shutil

import pytest

from cpp_build_helpers import build_and_run, needs_tree, tool


@needs_tree
def test_cpp_core(tmp_path):
    if tool("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs cmake and a C++ compiler")
    build_and_run(tmp_path, "imgtx_core_tests")


@needs_tree
def test_cpp_core_portable_path_on_aarch64(tmp_path):
    """DESIGN: the portable fallback builds and passes on any CPU, aarch64 too. Cross-compiled
    and run under qemu-user (Debian: g++-aarch64-linux-gnu qemu-user; .ci/run installs them)."""
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if tool("cmake") is None or cxx is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64")
    build_and_run(tmp_path, "imgtx_core_tests",
                  ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                   f"-DCMAKE_CXX_COMPILER={cxx}"],
                  runner=[qemu, "-L", "/usr/aarch64-linux-gnu"])
