"""Thin setup.py: everything is built by CMakeLists.txt with Ninja.

Environment:
  IMGTX_FAST_CUDA        auto (default: build CUDA when nvcc is found) | 0 | 1 (error without nvcc)
  IMGTX_FAST_CUDA_ARCHS  CMake CUDA architectures (default 80-real;90a-real;90-virtual)
  IMGTX_FAST_SIMT        0 (default) | 1: also build imgtx_fast._C_simt, the CUDA kernels compiled
                         for the CPU-side CUDA emulator (imgtx_fast.testing.emulated_cuda; no
                         CUDA toolkit needed)
  IMGTX_FAST_STATIC_LIBSTDCXX  0 (default) | 1: link libstdc++ into _C, so the binary needs only
                         glibc's symbol versions (release wheels: scripts/build_wheel.sh)
  MAX_JOBS               parallel compile jobs
  CMAKE_ARGS             extra arguments for the CMake configure step
"""
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_setting():
    mode = os.environ.get("IMGTX_FAST_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"IMGTX_FAST_CUDA must be auto, 0 or 1, not {mode!r}")
    nvcc = find_nvcc() if mode != "0" else None
    if mode == "1" and not nvcc:
        sys.exit("IMGTX_FAST_CUDA=1 but nvcc was found neither under CUDA_HOME nor on PATH")
    return nvcc


def switch(name):
    """An IMGTX_FAST_* 0|1 variable (default 0)."""
    mode = os.environ.get(name, "0").strip().lower()
    if mode not in ("0", "1"):
        sys.exit(f"{name} must be 0 or 1, not {mode!r}")
    return mode == "1"


def simt_setting():
    return switch("IMGTX_FAST_SIMT")


def tool(module, attr, name):
    """The cmake/ninja that the build requirements installed, else the one on PATH."""
    try:
        mod = __import__(module)
        return str(Path(getattr(mod, attr)) / name)
    except (ImportError, AttributeError):
        return shutil.which(name) or name


class CMakeBuild(build_ext):
    def run(self):
        super().run()
        if not simt_setting() and not self.inplace:
            # build_lib outlives a build: an earlier IMGTX_FAST_SIMT=1 build's module would be
            # installed (or put in a wheel) with this one
            for stale in Path(self.build_lib, "imgtx_fast").glob("_C_simt.*"):
                stale.unlink()

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = cuda_setting()
        args = [
            f"-S{ROOT}",
            f"-B{build_dir}",
            "-GNinja",
            f"-DCMAKE_MAKE_PROGRAM={tool('ninja', 'BIN_DIR', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DIMGTX_FAST_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DIMGTX_FAST_SIMT={'ON' if simt_setting() else 'OFF'}",
            # always passed: the CMake cache of an earlier build must not carry it over
            f"-DIMGTX_FAST_STATIC_LIBSTDCXX={'ON' if switch('IMGTX_FAST_STATIC_LIBSTDCXX') else 'OFF'}",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            archs = os.environ.get("IMGTX_FAST_CUDA_ARCHS")
            # unset: CMakeLists.txt's default, not whatever an earlier build left in the cache
            args.append(f"-DIMGTX_FAST_CUDA_ARCHS={archs}" if archs else "-UIMGTX_FAST_CUDA_ARCHS")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        cmake = tool("cmake", "CMAKE_BIN_DIR", "cmake")
        subprocess.check_call([cmake, *args])
        target = ext.name.rsplit(".", 1)[-1]  # _C or _C_simt
        build = [cmake, "--build", str(build_dir), "--target", target]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.check_call(build)


extensions = [Extension("imgtx_fast._C", sources=[])]
if simt_setting():
    extensions.append(Extension("imgtx_fast._C_simt", sources=[]))

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": CMakeBuild},
)
