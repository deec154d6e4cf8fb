#!/usr/bin/env python3
"""Mutation check of the emulated CUDA test suite: does it catch broken synchronisation?

One at a time, each mutation below is applied to a copy of the sources (the working tree is
never touched): a __syncthreads() (or the barrier of a __syncthreads_and/_or) deleted, a
cp_async_wait deleted, or one fragment index shifted, in the attention forward and backward
kernels. The emulated module imgtx_fast._C_simt is rebuilt from the copy (incrementally) and the
emulated attention tests run against it until the first failure. Every mutation must be caught.

Usage: python scripts/mutation_check.py [--list] [--only SUBSTRING] [pytest args...]
Prints one line per mutation (the test that caught it) and a markdown table at the end; exits 1
if any mutation survived.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["csrc/attention/attention_cuda_fwd.cuh", "csrc/attention/attention_cuda_bwd.cuh",
           "csrc/attention/attention_cuda_common.cuh"]
# The emulated attention tests, quick ones first (pytest runs them in file order; -x stops at
# the first failure).
TESTS = ["tests/test_attention_cuda.py"]

# (file, regex, replacement, description): every match of the regex is one mutation.
RULES = [
    (KERNELS[0], r"__syncthreads\(\);", ";", "delete __syncthreads()"),
    (KERNELS[1], r"__syncthreads\(\);", ";", "delete __syncthreads()"),
    (KERNELS[2], r"__syncthreads_and\((\w+)\)", r"(\1)", "delete the barrier of __syncthreads_and"),
    (KERNELS[2], r"__syncthreads_or\((\w+)\)", r"(\1)", "delete the barrier of __syncthreads_or"),
    (KERNELS[0], r"cp_async_wait<\d>\(\);", ";", "delete cp_async_wait"),
    (KERNELS[1], r"cp_async_wait<\d>\(\);", ";", "delete cp_async_wait"),
    # Fragment indices: the Q fragment's column half, the K fragment's row half (forward), the
    # P packing order and a dS fragment row (backward).
    (KERNELS[0], r"kk \* 16 \+ 8 \* \(lane / 16\)\);", "kk * 16 + 8 * ((lane / 16) ^ 1));",
     "shift the Q fragment's column half (ldmatrix address)"),
    (KERNELS[0], r"pa\[1\] = Ops::pack\(s\[2 \* kk\]\[2\], s\[2 \* kk\]\[3\]\);",
     "pa[1] = Ops::pack(s[2 * kk][3], s[2 * kk][2]);", "swap two elements of the P fragment"),
    (KERNELS[1], r"\(lane % 8\) \+ 8 \* \(\(lane / 8\) % 2\)\)", "(lane % 8) + 8 * (((lane / 8) + 1) % 2))",
     "shift a fragment's row half (ldmatrix address)"),
]


def mutations():
    out = []
    for rel, pattern, repl, what in RULES:
        text = (ROOT / rel).read_text()
        for i, m in enumerate(re.finditer(pattern, text)):
            line = text.count("\n", 0, m.start()) + 1
            mutated = text[:m.start()] + m.expand(repl) + text[m.end():]
            out.append((rel, line, what, mutated))
    return out


def tool(module, attr, name):
    mod = __import__(module)
    return str(Path(getattr(mod, attr)) / name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--only", default="", help="run the mutations whose description or file contains this")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args, pytest_args = ap.parse_known_args()
    muts = [m for m in mutations() if args.only in m[2] or args.only in m[0]]
    if args.list:
        for rel, line, what, _ in muts:
            print(f"{rel}:{line}: {what}")
        return 0
    import pybind11  # noqa: F401  (the build needs it; fail early)

    work = Path(tempfile.mkdtemp(prefix="imgtx_mutation_"))
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        "build", ".git", "__pycache__", "*.so", ".pytest_cache", ".hypothesis", "*.egg-info"))
    pkg = src / "imgtx_fast"
    build = work / "build"
    cmake = tool("cmake", "CMAKE_BIN_DIR", "cmake")
    subprocess.run([cmake, "-S", str(src), "-B", str(build), "-GNinja",
                    f"-DCMAKE_MAKE_PROGRAM={tool('ninja', 'BIN_DIR', 'ninja')}",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={pkg}",
                    f"-DPython_EXECUTABLE={sys.executable}",
                    f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", "-DIMGTX_FAST_CUDA=OFF",
                    "-DIMGTX_FAST_SIMT=ON"], check=True, capture_output=True)

    def build_modules():
        done = subprocess.run([cmake, "--build", str(build), "--target", "_C", "_C_simt",
                               "--parallel", os.environ.get("MAX_JOBS", "2")],
                              capture_output=True, text=True)
        return done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ok, log = build_modules()
    if not ok:
        print(log)
        return 2
    env = dict(os.environ, PYTHONPATH=str(src))
    results = []
    for rel, line, what, mutated in muts:
        path = src / rel
        original = path.read_text()
        path.write_text(mutated)
        t0 = time.time()
        try:
            ok, log = build_modules()
            if not ok:
                caught = "compile error (the mutation does not build)"
            else:
                run = subprocess.run(
                    [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                     "-m", "not gpu and not slow", "-k", "emulated", *TESTS, *pytest_args],
                    cwd=src, env=env, capture_output=True, text=True, timeout=1800)
                failed = re.findall(r"^FAILED (\S+)", run.stdout, re.M)
                errored = re.findall(r"^ERROR (\S+)", run.stdout, re.M)
                if failed or errored:
                    caught = (failed or errored)[0]
                elif run.returncode != 0:
                    caught = f"pytest exit {run.returncode}: " + run.stdout[-300:]
                else:
                    caught = ""
        finally:
            path.write_text(original)
        results.append((rel, line, what, caught))
        status = caught if caught else "NOT CAUGHT"
        print(f"{rel}:{line}: {what} -> {status} ({time.time() - t0:.0f} s)", flush=True)
    build_modules()
    print("\n| mutation | caught by |\n| --- | --- |")
    for rel, line, what, caught in results:
        print(f"| `{Path(rel).name}:{line}` {what} | {caught or '**not caught**'} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[3] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
