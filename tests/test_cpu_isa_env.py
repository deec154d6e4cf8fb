"""IMGTX_FAST_CPU_ISA: any case is accepted; an unusable value is ignored with one warning line
naming the variable and the allowed values (as torch does with ATEN_CPU_CAPABILITY), never a
traceback, at `import imgtx_fast` and from `imgtx-fast info`."""
import os
import subprocess
import sys

import pytest

from imgtx_fast import _C

AVAILABLE = _C.cpu_isas_available()
BEST = AVAILABLE[-1]  # listed portable, avx2, avx512: the last is the best


def _run(value, *args, tmp_path):
    env = dict(os.environ, IMGTX_FAST_CPU_ISA=value)
    return subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)


def _cpu_path(stdout):
    row = next(line for line in stdout.splitlines() if line.startswith("cpu path"))
    return row.split()[2]


@pytest.mark.parametrize("value", ["AVX2", "Portable", "avx2", "PORTABLE", "Avx512"])
def test_any_case_selects_the_path(value, tmp_path):
    if value.lower() not in AVAILABLE:
        pytest.skip(f"{value} does not run on this CPU/build")
    r = _run(value, "-m", "imgtx_fast", "info", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert _cpu_path(r.stdout) == value.lower()


@pytest.mark.parametrize("value", ["avx3", "sse4", "AVX-2", " avx2"])
def test_bad_value_warns_one_line_and_auto_detects(value, tmp_path):
    r = _run(value, "-m", "imgtx_fast", "info", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "RuntimeWarning" in lines[0] and f"IMGTX_FAST_CPU_ISA='{value}'" in lines[0]
    assert "portable, avx2, avx512" in lines[0]
    assert _cpu_path(r.stdout) == BEST


def test_bad_value_at_import_warns_once(tmp_path):
    code = ("import warnings, imgtx_fast.numpy, imgtx_fast; from imgtx_fast import _C; "
            "print(_C.cpu_isa())")
    r = _run("fast", "-c", code, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == BEST
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "IMGTX_FAST_CPU_ISA='fast'" in lines[0], r.stderr
    strict = _run("fast", "-W", "error::RuntimeWarning", "-c", "import imgtx_fast", tmp_path=tmp_path)
    assert strict.returncode != 0 and "IMGTX_FAST_CPU_ISA" in strict.stderr  # filterable


def test_unavailable_path_warns_and_auto_detects(tmp_path):
    missing = [isa for isa in ("avx2", "avx512") if isa not in AVAILABLE]
    if not missing:
        pytest.skip("this CPU/build runs every path")
    r = _run(missing[0], "-c", "from imgtx_fast import _C; print(_C.cpu_isa())", tmp_path=tmp_path)
    assert r.stdout.strip() == BEST
    assert "not available" in r.stderr and len(r.stderr.splitlines()) == 1


def test_set_cpu_isa_takes_any_case():
    previous = _C.cpu_isa()
    try:
        _C.set_cpu_isa("PORTABLE")
        assert _C.cpu_isa() == "portable"
        with pytest.raises(ValueError, match="portable.*avx2.*avx512"):
            _C.set_cpu_isa("avx3")
    finally:
        _C.set_cpu_isa(previous)
    if not os.environ.get("IMGTX_FAST_CPU_ISA"):
        assert _C.cpu_isa_env_warning() == ""
