"""The CUDA emulator (csrc/simt) itself: its C++ tests (tests/cpp/test_simt*.cpp: warp and block
built-ins, mma/ldmatrix/cp.async against the PTX ISA, and every detector on a broken kernel),
and its fp16/bf16 conversions, bit for bit, against torch."""
import importlib
import os
import shutil

import numpy as np
import pytest
import torch

from cpp_build_helpers import build_and_run, needs_tree, tool


@needs_tree
def test_simt_cpp_tests(tmp_path):
    if tool("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs cmake and a C++ compiler")
    build_and_run(tmp_path, "imgtx_simt_tests", ["-DIMGTX_FAST_SIMT=ON"])


@pytest.fixture(scope="module")
def simt():
    try:
        return importlib.import_module("imgtx_fast._C_simt")
    except ImportError:
        pytest.skip("needs imgtx_fast._C_simt (IMGTX_FAST_SIMT=1 pip install .)")


def _convert(fn, src, out_dtype):
    src = src.contiguous()
    out = torch.empty(src.numel(), dtype=out_dtype)
    fn(src.data_ptr(), out.data_ptr(), src.numel())
    return out


ALL_BITS = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)  # every 16-bit pattern


def _f32_bits(t):
    return t.view(torch.int32).numpy().view(np.uint32)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_bits_to_f32_every_pattern(simt, kind):
    dtype = torch.float16 if kind == "f16" else torch.bfloat16
    got = _f32_bits(_convert(getattr(simt, f"{kind}_bits_to_f32"), ALL_BITS, torch.float32))
    nan = ALL_BITS.view(dtype).isnan().numpy()
    want = _f32_bits(ALL_BITS.view(dtype).float())
    np.testing.assert_array_equal(got[~nan], want[~nan])
    # NaNs keep sign and payload. torch's fp16 path (F16C) quiets signalling NaNs, so numpy's
    # conversion, which keeps them as IEEE 754 allows, is the reference; bf16 -> f32 is a shift.
    if kind == "f16":
        keep = ALL_BITS.numpy().view(np.float16).astype(np.float32).view(np.uint32)
    else:
        keep = ALL_BITS.numpy().view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(got[nan], keep[nan])
    assert nan.sum() == (2046 if kind == "f16" else 254)


def _neighbours(x):
    """x and its float32 neighbours one ulp below and above (past the largest float: infinity)."""
    with np.errstate(over="ignore"):
        return np.concatenate([x, np.nextafter(x, np.float32(-np.inf)), np.nextafter(x, np.float32(np.inf))])


def _f16_probe_floats():
    """Every fp16 value, every midpoint between adjacent finite fp16 values (the ties, including
    the one between 65504 and the overflow threshold 65536), each +- 1 float32 ulp, both signs."""
    values = np.arange(0x7C01, dtype=np.uint16).view(np.float16).astype(np.float64)  # 0 .. inf
    upper = values[1:].copy()
    upper[-1] = 65536.0  # what the next value would be without the exponent limit
    mids = ((values[:-1] + upper) / 2).astype(np.float32)  # exact: 12 significant bits
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    every = every[~np.isnan(every)]
    return np.concatenate([every, _neighbours(mids), -_neighbours(mids)])


def _bf16_probe_floats():
    """Every bf16 value, every midpoint between adjacent finite bf16 values (float32 bits
    b << 16 | 0x8000, the last one the overflow threshold) and each +- 1 ulp, both signs."""
    b = np.arange(0x7F80, dtype=np.uint32) << 16
    probes = np.concatenate([b, b | 0x8000, b | 0x7FFF, b | 0x8001])
    return np.concatenate([probes, probes | 0x80000000]).view(np.float32)


def _special_floats():
    """Float32 subnormals, values around the smallest fp16 subnormal (2^-24) and its half, the
    fp16 and fp32 extremes, infinities, and random bit patterns."""
    rng = np.random.default_rng(1234)
    sub = np.concatenate([np.arange(1, 64, dtype=np.uint32), rng.integers(1, 1 << 23, 4096, dtype=np.uint32),
                          np.array([(1 << 23) - 1], dtype=np.uint32)]).view(np.float32)
    edges = np.array([2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -24, 2.0 ** -26, 2.0 ** -14, 65504.0, 65519.0,
                      65520.0, 65536.0, 3.0e38, np.finfo(np.float32).max, np.finfo(np.float32).tiny,
                      0.0, np.inf], dtype=np.float32)
    noise = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    noise = noise[~np.isnan(noise)]
    both = np.concatenate([sub, _neighbours(edges)])
    return np.concatenate([both, -both, noise])


NAN_BITS = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA00000,
                     0x7F802000, 0xFFBFFFFF], dtype=np.uint32)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_f32_to_bits_against_torch(simt, kind):
    dtype = torch.float16 if kind == "f16" else torch.bfloat16
    probes = np.concatenate([_f16_probe_floats(), _bf16_probe_floats(), _special_floats()])
    assert not np.isnan(probes).any()
    x = torch.from_numpy(probes)
    got = _convert(getattr(simt, f"f32_to_{kind}_bits"), x, torch.int16).numpy().view(np.uint16)
    want = x.to(dtype).view(torch.int16).numpy().view(np.uint16)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(int(probes.view(np.uint32)[i])), hex(int(got[i])), hex(int(want[i])))
                           for i in bad[:8]]
    # The probes reach overflow (to infinity) and subnormal results, not only ordinary values.
    infinity, exponent = (0x7C00, 0x7C00) if kind == "f16" else (0x7F80, 0x7F80)
    assert ((want & 0x7FFF) == infinity).any() and (((want & exponent) == 0) & ((want & 0x7FFF) != 0)).any()


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_f32_nan_to_canonical_nan(simt, kind):
    rng = np.random.default_rng(7)
    payloads = rng.integers(1, 1 << 23, 1000, dtype=np.uint32)
    nans = np.concatenate([NAN_BITS, 0x7F800000 | payloads, 0xFF800000 | payloads]).view(np.float32)
    got = _convert(getattr(simt, f"f32_to_{kind}_bits"), torch.from_numpy(nans), torch.int16)
    assert (got.numpy().view(np.uint16) == 0x7FFF).all()  # as the GPU's cvt.rn: sign dropped too
