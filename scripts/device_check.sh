#!/usr/bin/env bash
# One-shot GPU check, for a machine with a CUDA device and no network:
#   build the extension (no build isolation: the machine cannot download build requirements),
#   run the `gpu` tests, compute-sanitizer on a small subset, and the GPU benchmarks.
# Full logs go to $OUT (or ./device_logs); one short table is printed at the end.
# Usage: bash scripts/device_check.sh   [IMGTX_FAST_CUDA_ARCHS=90a-real to build faster]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_logs}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=()

step() {  # step NAME LOGFILE CMD...: run, log, remember pass/fail
  local name=$1 log=$2
  shift 2
  local t0=$SECONDS
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  status+=("$(printf '%-26s %-5s %4ss  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" $((SECONDS - t0)) "$log")")
  tail -n 3 "$OUT/$log"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
export IMGTX_FAST_CUDA=1 IMGTX_FAST_CUDA_ARCHS="${IMGTX_FAST_CUDA_ARCHS:-80-real;90a-real;90-virtual}"
export MAX_JOBS="${MAX_JOBS:-16}"
step build build.log "$PY" -m pip install -v --no-build-isolation --no-deps . || {
  printf '%s\n' "${status[@]}"; exit 1; }
step info info.log "$PY" -m imgtx_fast info
# All-skipped is a failure here: it means torch saw no GPU or the build has no CUDA.
step "gpu tests" gpu_tests.log bash -c "'$PY' -m pytest tests -m gpu -v -rs && \
  grep -q ' passed' '$OUT/gpu_tests.log'"
# The `emulated` params (the CUDA kernels under the CPU emulator) need no GPU: CI runs them.
step "cpu tests (smoke)" cpu_tests.log "$PY" -m pytest tests -m "not gpu and not emulated" -q -x \
  -k "not hypothesis and not compile"
if command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer" sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" -m pytest tests/test_codebook_cuda.py -m gpu -q -x -k "matches_cpu and 129 or ties"
  step "racecheck" racecheck.log compute-sanitizer --tool racecheck --error-exitcode 9 \
    "$PY" -m pytest tests/test_codebook_cuda.py -m gpu -q -x -k "matches_cpu and 129 and l2"
  step "sanitizer (diffusion)" sanitizer_diffusion.log compute-sanitizer --tool memcheck \
    --error-exitcode 9 "$PY" -m pytest tests/test_diffusion_cuda.py -m gpu -q -x \
    -k "(log_probs and 2x7x33 and fp32) or (vb_terms and 3-7-11) or bad_input"
  step "racecheck (diffusion)" racecheck_diffusion.log compute-sanitizer --tool racecheck \
    --error-exitcode 9 "$PY" -m pytest tests/test_diffusion_cuda.py -m gpu -q -x \
    -k "log_probs and 3x64x17 and fp32 and token"
  step "sanitizer (attention)" sanitizer_attention.log compute-sanitizer --tool memcheck \
    --error-exitcode 9 "$PY" -m pytest tests/test_attention_cuda.py -m gpu -q -x \
    -k "(forward and 64 and fp16 and (dense- or local2d- or decode- or key_lengths)) or (backward and 64 and fp16 and (causal- or local1d))"
  step "racecheck (attention)" racecheck_attention.log compute-sanitizer --tool racecheck \
    --error-exitcode 9 "$PY" -m pytest tests/test_attention_cuda.py -m gpu -q -x \
    -k "(forward and 64 and bf16 and causal-) or (backward and 64 and bf16 and dense)"
else
  status+=("compute-sanitizer         SKIP  (not installed)")
fi
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  step "gpu benchmarks" bench.log "$PY" -m pytest benchmarks -m gpu -q
else
  status+=("gpu benchmarks            SKIP  (pytest-benchmark missing)")
fi

echo
echo "==== device_check summary ($(cat "$OUT/gpu.txt" | head -1)) ===="
printf '%s\n' "${status[@]}"
grep -A 16 "codebook_lookup GPU summary" "$OUT/bench.log" 2>/dev/null | head -16
grep -A 12 "mask-and-replace diffusion summary" "$OUT/bench.log" 2>/dev/null | head -12
