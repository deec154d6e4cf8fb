#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU kernels and of the CUDA kernels
# under the emulator.
#
# Builds the CPU core, the pybind11 modules (_C, and _C_simt: the CUDA kernels compiled for the
# CPU-side emulator) and the C++ tests with -fsanitize=address,undefined into build/sanitize/
# (never touching the installed or editable build), then runs the C++ tests and a pytest subset
# (CPU kernels, and the CUDA kernels under the emulator) against a copy of the Python package
# that holds the sanitized modules. The emulated kernels are built without the emulator's own
# access hooks (they and ASan instrument the same accesses), so its race detector is off here. Python itself is not instrumented, so libasan is
# preloaded and leak detection is off (CPython and torch keep allocations alive at exit).
# UBSan is fatal (-fno-sanitize-recover=all): any report fails the run.
#
# Usage: bash scripts/sanitize.sh [extra pytest args]
#   SANITIZE_BUILD  build folder (default build/sanitize)
#   SANITIZE_TESTS  test files to run (default: the kernel-level CPU tests, below)
#   MAX_JOBS        parallel compile jobs (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD="${SANITIZE_BUILD:-$ROOT/build/sanitize}"  # build/ is git-ignored
PY="${PYTHON:-python}"
start=$SECONDS

# The build tools: in a CI venv they came only into pip's isolated build env, so install them.
if ! "$PY" -c "import pybind11, cmake, ninja" 2>/dev/null; then
  "$PY" -m pip install -q "pybind11>=2.12" "cmake>=3.24" ninja
fi
CMAKE="$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))')"
NINJA="$("$PY" -c 'import ninja, os; print(os.path.join(ninja.BIN_DIR, "ninja"))')"
PYBIND11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"

# A copy of the pure-Python package; the sanitized _C is built straight into it.
PKG="$BUILD/pkg"
rm -rf "$PKG"
mkdir -p "$PKG"
(cd "$ROOT" && tar --exclude='__pycache__' --exclude='_C.*.so' --exclude='_C.so' \
   --exclude='_C_simt.*.so' --exclude='_C_simt.so' -cf - imgtx_fast) \
  | tar -C "$PKG" -xf -

# -O1: fast enough for the test suite, and keeps stack traces readable. asserts stay on.
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
# (-O1 with the sanitizers makes GCC warn about its own AVX-512 headers: noise, silenced.)
WNO="-Wno-maybe-uninitialized -Wno-uninitialized"
echo "== sanitize: configure + build ($BUILD/cmake)"
nice "$CMAKE" -S "$ROOT" -B "$BUILD/cmake" -GNinja -DCMAKE_MAKE_PROGRAM="$NINJA" \
  -DCMAKE_BUILD_TYPE=Sanitize \
  -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g $SAN $WNO" \
  -DCMAKE_MODULE_LINKER_FLAGS_SANITIZE="$SAN" \
  -DCMAKE_SHARED_LINKER_FLAGS_SANITIZE="$SAN" \
  -DCMAKE_EXE_LINKER_FLAGS_SANITIZE="$SAN" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PKG/imgtx_fast" \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$PYBIND11_DIR" \
  -DIMGTX_FAST_CUDA=OFF -DIMGTX_FAST_BUILD_TESTS=ON -DIMGTX_FAST_SIMT=ON \
  -DIMGTX_FAST_SIMT_ACCESS_HOOKS=OFF >"$BUILD/configure.log"
nice "$CMAKE" --build "$BUILD/cmake" --target _C _C_simt imgtx_core_tests imgtx_simt_tests \
  --parallel "${MAX_JOBS:-2}"
echo "   built in $((SECONDS - start)) s"

export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

echo "== sanitize: C++ core and emulator tests"
t0=$SECONDS
"$BUILD/cmake/imgtx_core_tests" | tail -n 3
"$BUILD/cmake/imgtx_simt_tests" | tail -n 3
echo "   C++ tests clean in $((SECONDS - t0)) s"

echo "== sanitize: CPU pytest subset against the sanitized _C"
# Kernel-level CPU tests and the nn modules on top of them (the model/integration tests call
# the same kernels through more Python and would only add time). test_cpp_core is left out: it runs the compiler, which
# must not run under the preloaded libasan; the C++ core tests ran above.
DEFAULT_TESTS="tests/test_codebook.py tests/test_codebook_autograd.py tests/test_diffusion.py
  tests/test_diffusion_api.py tests/test_diffusion_loss.py tests/test_attention.py
  tests/test_attention_nn.py tests/test_vector_quantizer.py
  tests/test_reliability_bad_input.py tests/test_reliability_fuzz.py
  tests/test_reliability_threads.py tests/test_raw_op_checks.py tests/test_attention_eager.py"
# shellcheck disable=SC2086
read -r -a TESTS <<<"$(echo ${SANITIZE_TESTS:-$DEFAULT_TESTS})"
# libstdc++ is preloaded with libasan: python itself does not link it, and ASan's __cxa_throw
# interceptor must find it at start-up or the first C++ exception (torch's dispatcher rethrowing
# a Python error) aborts with "real___cxa_throw != 0".
PRELOAD="$(c++ -print-file-name=libasan.so) $(c++ -print-file-name=libstdc++.so.6)"
SANENV=(env LD_PRELOAD="$PRELOAD" PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}")
# Run from the build folder: `python -m` puts the cwd first on sys.path, and the source tree's
# imgtx_fast/ (an editable install's, with the unsanitized _C) must not shadow the copy.
cd "$BUILD"
"${SANENV[@]}" "$PY" -c "
import imgtx_fast._C as c, imgtx_fast._C_simt as s
for m in (c, s):
    assert m.__file__.startswith('$PKG'), 'not the sanitized module: ' + m.__file__
    print('   sanitized module:', m.__file__)"
t0=$SECONDS
# torch.compile tests run the host compiler in-process (it must not run with libasan
# preloaded, and it adds minutes); the kernels they call are covered by the other tests.
set +e
"${SANENV[@]}" nice "$PY" -m pytest -q -p no:cacheprovider -m "not gpu and not slow" \
  -k "not compile" --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
  "${TESTS[@]/#/$ROOT/}" "$@"
rc=$?
set -e
echo "   pytest under ASan+UBSan: exit $rc in $((SECONDS - t0)) s"

echo "== sanitize: the CUDA kernels under the emulator (emulated cases, head dim 64 for attention)"
# detect_stack_use_after_return is off here: with it ASan gives every emulated thread (a fiber)
# its own fake stack, which made these tests 4x slower; the CPU run above keeps it on.
EMULATED_TESTS=(tests/test_codebook_cuda.py tests/test_diffusion_cuda.py tests/test_attention_cuda.py)
t0=$SECONDS
set +e
ASAN_OPTIONS="${ASAN_OPTIONS/detect_stack_use_after_return=1/detect_stack_use_after_return=0}" \
  "${SANENV[@]}" nice "$PY" -m pytest -q -p no:cacheprovider -m "emulated and not slow" \
  -k "not attention or 64" --rootdir "$ROOT" -c "$ROOT/pyproject.toml" \
  "${EMULATED_TESTS[@]/#/$ROOT/}" "$@"
rc2=$?
set -e
echo "   emulated pytest under ASan+UBSan: exit $rc2 in $((SECONDS - t0)) s; total $((SECONDS - start)) s"
[ "$rc" -eq 0 ] || exit "$rc"
exit "$rc2"
