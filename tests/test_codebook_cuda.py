"""CUDA codebook_lookup: exact against float64, identical to the CPU kernel, graph-capturable.

Every test taking `target` runs twice (tests/cuda_targets.py): on a GPU (param `gpu`, skipped
without a CUDA device; run by scripts/device_check.sh) and under the CPU emulator of the CUDA
kernels (param `emulated`, with smaller sizes where the GPU sizes would take minutes). Tests
about streams, graphs and huge sizes are GPU-only (marked `gpu`).
"""
import pytest
import torch

from cuda_targets import full_sizes_too, sized_cases, skip_slow_unless_requested, target  # noqa: F401
from imgtx_fast import codebook_lookup
from test_codebook import DTYPES, assert_exact_argmin

DTYPE_IDS = ["fp32", "fp16", "bf16"]


def same(a, b):
    """Bit-identical (NaN where NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def both(target, z, c, metric="l2", z_on_target=None):
    """(the CUDA kernels' result on the target, moved to the CPU; the CPU kernel's result)."""
    zt = target.to(z) if z_on_target is None else z_on_target
    with target.kernels():
        dev = codebook_lookup(zt, target.to(c), metric=metric, return_stats=True)
    with target.host():
        cpu = codebook_lookup(z, c, metric=metric, return_stats=True)
    return type(dev)(*(t.cpu() for t in dev)), cpu


def assert_same_outputs(dev, cpu):
    for name, a, b in zip(("indices", "quantized", "sqdist", "counts"), dev, cpu):
        try:
            same(a, b)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


# (n, k, d) on the GPU, and the stand-in under the emulator: 128 rows x 64 codes per score
# block, code ranges split over blocks, 16 dims per shared-memory stage; the stand-ins keep
# several row blocks, split code ranges, and partial row/code/dim tiles.
SIZES = {
    "1x1x1": ((1, 1, 1), (1, 1, 1)),
    "5x7x3": ((5, 7, 3), (5, 7, 3)),
    "129x65x17": ((129, 65, 17), (129, 65, 17)),
    "square": ((1000, 1000, 64), (300, 700, 64)),
    "large": ((3000, 4097, 256), (260, 1100, 100)),
    "many_codes": ((70, 20000, 40), (70, 3000, 40)),
    "wide": ((4099, 300, 513), (200, 150, 513)),
}


@pytest.mark.parametrize("target,case", sized_cases(SIZES), indirect=["target"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_cpu_and_float64(target, case, metric):
    n, k, d = target.pick(*SIZES[case])
    g = torch.Generator().manual_seed(n + k + d)
    z, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    dev, cpu = both(target, z, c, metric)
    assert_exact_argmin(z, c, dev.indices, metric)
    assert_same_outputs(dev, cpu)


@full_sizes_too
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cb_dtype", DTYPES, ids=["cb_" + n for n in DTYPE_IDS])
def test_dtypes(target, dtype, cb_dtype):
    g = torch.Generator().manual_seed(5)
    rows, codes = target.pick((300, 500), (150, 200))
    z = torch.randn(4, rows, 64, generator=g).to(dtype)
    c = torch.randn(codes, 64, generator=g).to(cb_dtype)
    dev, cpu = both(target, z, c)
    assert_exact_argmin(z, c, dev.indices, "l2")
    assert_same_outputs(dev, cpu)


@full_sizes_too
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_strided_and_trained_regime(target, dtype):
    """Codes 100 +- 0.05 and inputs near them: |z|^2 and |c|^2 dwarf the distances, so the
    fp32 argmin must be certified or re-searched in float64."""
    g = torch.Generator().manual_seed(7)
    c = (100.0 + 0.05 * torch.randn(512, 32, generator=g)).to(dtype)
    h, w = target.pick((20, 30), (8, 15))
    x = (c.float()[torch.randint(0, 512, (2, h, w), generator=g)]
         + 0.03 * torch.randn(2, h, w, 32, generator=g))
    z = x.to(dtype).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # channel-last view of NCHW
    dev, cpu = both(target, z, c)
    assert_exact_argmin(z, c, dev.indices, "l2")
    assert_same_outputs(dev, cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_ties_and_non_finite(target, dtype):
    g = torch.Generator().manual_seed(8)
    c = torch.randn(30, 8, generator=g)
    c = torch.cat([c, c]).to(dtype)
    c[4, 1] = float("nan")
    z = torch.randn(200, 8, generator=g).to(dtype)
    z[0, 0] = float("inf")
    dev, cpu = both(target, z, c)
    assert_same_outputs(dev, cpu)
    assert dev.indices[0].item() == 0 and (dev.indices != 4).all()
    # exact ties between the duplicated codes go to the lower index, except for code 4's twin
    assert ((dev.indices < 30) | (dev.indices == 34)).all()


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided_codebook"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_payloads_of_codes_are_kept(target, dtype, strided):
    """When every code is non-finite a row falls back to index 0, and an l2 code in z's dtype
    is written bit for bit: NaN payloads (signalling ones too) equal the CPU's on both backends,
    whatever the codebook's strides (a float round trip would quiet or drop them)."""
    bits = {torch.float16: [0x7C01, 0xFE55, 0x7D00, 0x7FFF],
            torch.bfloat16: [0x7F81, 0xFFC5, 0x7FA0, 0x7FFF],
            torch.float32: [0x7F800001, 0x7FC01234, 0x7FA00000, 0x7FFFFFFF]}[dtype]
    itype = torch.int32 if dtype == torch.float32 else torch.int16
    g = torch.Generator().manual_seed(9)
    c = torch.randn(5, 8, generator=g).to(dtype)
    c.view(itype)[0, :4] = torch.tensor(bits, dtype=torch.int64).to(itype)  # wraps like C
    c[1:, 0] = float("nan")
    if strided:  # a column-major copy: cb_stride_dim != 1
        c = c.t().contiguous().t()
    z = torch.randn(6, 8, generator=g).to(dtype)
    z[:, 0] = float("nan")
    dev, cpu = both(target, z, c)
    assert (dev.indices == 0).all()
    assert torch.equal(dev.quantized.view(itype), cpu.quantized.view(itype))
    assert torch.equal(cpu.quantized.view(itype)[:, :4],
                       c.contiguous().view(itype)[0, :4].expand(6, 4))


@pytest.mark.gpu
def test_cuda_graph_capture():
    z = torch.randn(2048, 64, device="cuda")
    c = torch.randn(1024, 64, device="cuda")
    expected = codebook_lookup(z, c)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        codebook_lookup(z, c)  # warm-up on the side stream, as torch recommends
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        idx, _ = codebook_lookup(z, c)
    z.copy_(torch.randn_like(z))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(idx, codebook_lookup(z, c)[0])
    assert not torch.equal(idx, expected)


@pytest.mark.gpu
def test_runs_on_the_current_stream():
    z = torch.randn(4096, 128, device="cuda")
    c = torch.randn(2048, 128, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        idx = codebook_lookup(z, c)[0]
    s.synchronize()
    assert torch.equal(idx.cpu(), codebook_lookup(z.cpu(), c.cpu())[0])


def test_autograd_on_cuda(target):
    g = torch.Generator().manual_seed(9)
    z = target.to(torch.randn(100, 16, generator=g)).requires_grad_()
    c = target.to(torch.randn(50, 16, generator=g)).requires_grad_()
    with target.kernels():
        torch.library.opcheck(torch.ops.imgtx.codebook_lookup.default, (z, c, "l2"))


@pytest.mark.gpu
def test_large_rows_64bit_offsets():
    """N * D past 2^31 elements: offsets must be 64-bit."""
    n, d = (2**31) // 64 + 4099, 64
    z = torch.randn(1, d, device="cuda", dtype=torch.bfloat16).expand(n, d)
    c = torch.randn(16, d, device="cuda", dtype=torch.bfloat16)
    idx, q = codebook_lookup(z, c)
    assert (idx == idx[0]).all() and torch.equal(q[-1], q[0])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_views_match_cpu(target, metric):
    """Every layout the CPU tests cover, on the CUDA kernels: the same outputs bit for bit. The
    views are taken on the target device (moving a view would make some of them contiguous)."""
    g = torch.Generator().manual_seed(12)
    c = torch.randn(50, 12, generator=g)
    views = [(torch.randn(2, 12, 5, 7, generator=g), lambda t: t.permute(0, 2, 3, 1)),
             (torch.randn(30, 36, generator=g), lambda t: t[:, 12:24]),
             (torch.randn(12, 30, generator=g), lambda t: t.T),
             (torch.randn(4, 3, 5, 12, generator=g), lambda t: t[:, :, ::2]),
             (torch.randn(12, generator=g), lambda t: t),
             (torch.randn(7, 1, generator=g), lambda t: t.expand(7, 12))]
    for base, view in views:
        z, zt = view(base), view(target.to(base))
        assert zt.stride() == z.stride()
        dev, cpu = both(target, z, c, metric, z_on_target=zt)
        assert_same_outputs(dev, cpu)


# ---- the two score passes: tensor cores (3xTF32 mma.sync) and the fp32 SIMT fallback --------
# Both are exact whatever their rounding: rows their error bound (csrc/codebook/certify.h) cannot
# certify are re-checked in float64 over their candidate codes, or re-searched over all codes
# where fp32 scores may overflow. IMGTX_FAST_CODEBOOK_STATS=1 makes the CUDA entry point add its
# counts to codebook_counters() (of _C_simt under the emulator, of _C on a GPU).

@pytest.fixture(params=["tensor_cores", "simt"])
def score_pass(request, monkeypatch):
    """The CUDA score pass of the test: tensor cores (the default on sm_80+) or the fp32 SIMT
    kernel (IMGTX_FAST_CODEBOOK_SIMT=1); with the exactness counters on."""
    monkeypatch.setenv("IMGTX_FAST_CODEBOOK_SIMT", "1" if request.param == "simt" else "0")
    monkeypatch.setenv("IMGTX_FAST_CODEBOOK_STATS", "1")
    return request.param


def lookup_with_counters(target, z, c, metric="l2"):
    """(CUDA result on the CPU, CPU result, the CUDA call's codebook counters, the mma it issued
    (None on a GPU: not counted))."""
    from imgtx_fast import _C
    module = target.sim if target.emulated else _C
    module.reset_codebook_counters()
    mma_before = target.sim.counters()["mma"] if target.emulated else 0
    with target.kernels():
        dev = codebook_lookup(target.to(z), target.to(c), metric=metric, return_stats=True)
    counters = module.codebook_counters()
    mma = target.sim.counters()["mma"] - mma_before if target.emulated else None
    with target.host():
        cpu = codebook_lookup(z, c, metric=metric, return_stats=True)
    return type(dev)(*(t.cpu() for t in dev)), cpu, counters, mma


def assert_score_pass(score_pass, mma, n, k, d):
    """Under the emulator: the tensor-core pass issued exactly its mma (row blocks of 128 x code
    tiles of 64 x 8-dim steps x 8 warps x 24 mma: 2 x 4 m16n8 tiles, 3 products each); the
    SIMT pass none."""
    if mma is None:
        return
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    expected = cdiv(n, 128) * cdiv(k, 64) * cdiv(d, 8) * 8 * 24 if score_pass == "tensor_cores" else 0
    assert mma == expected, (score_pass, mma, expected)


# (n, k, d, metric): D not a multiple of 8 (nor of 16), K not a multiple of the 64-code tile,
# several row blocks, and an exact multiple of both.
FAST_PASS_CASES = {"d13_k130": (150, 130, 13, "l2"), "d40_k65_cosine": (70, 65, 40, "cosine"),
                   "d8_k64": (129, 64, 8, "l2")}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(FAST_PASS_CASES))
def test_score_passes_match_cpu(target, score_pass, case, dtype):
    n, k, d, metric = FAST_PASS_CASES[case]
    g = torch.Generator().manual_seed(n + k + d)
    z = torch.randn(n, d, generator=g).to(dtype)
    c = torch.randn(k, d, generator=g).to(dtype)
    dev, cpu, _, mma = lookup_with_counters(target, z, c, metric)
    assert_exact_argmin(z, c, dev.indices, metric)
    assert_same_outputs(dev, cpu)
    assert_score_pass(score_pass, mma, n, k, d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_passes_trained_regime(target, score_pass, dtype):
    """Codes 100 +- 0.05, latents near them (a trained VQ codebook): |z||c| ~ 3e5 dwarfs the
    gaps (~0.06), so plain fp32 picks wrong codes and no row can be certified by either bound:
    every row is re-checked over its candidates (here: every code), none fully re-searched."""
    g = torch.Generator().manual_seed(7)
    c = (100.0 + 0.05 * torch.randn(256, 32, generator=g)).to(dtype)
    x = c.float()[torch.randint(0, 256, (2, 8, 12), generator=g)] + 0.03 * torch.randn(2, 8, 12, 32, generator=g)
    z = x.to(dtype).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # channel-last view of NCHW
    n = z.numel() // 32
    if dtype != torch.bfloat16:  # bf16 rounds the codes onto a few values: exact ties instead
        zf, cf = z.reshape(n, 32).float(), c.float()
        plain = ((cf * cf).sum(1) - 2 * zf @ cf.T).argmin(1)
        exact = torch.cdist(zf.double(), cf.double()).argmin(1)
        assert (plain != exact).any(), "the case no longer defeats plain fp32"
    dev, cpu, counters, mma = lookup_with_counters(target, z, c)
    assert_exact_argmin(z, c, dev.indices, "l2")
    assert_same_outputs(dev, cpu)
    assert_score_pass(score_pass, mma, n, 256, 32)
    assert counters["rows_rechecked"] == n and counters["rows_full_search"] == 0, counters


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_passes_ties_and_non_finite(target, score_pass, dtype):
    """Duplicated codes (exact ties: the lowest index), NaN/Inf codes (never picked), NaN/Inf
    rows (index 0, a full search in the counters); D = 12, K = 85."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(40, 12, generator=g)
    c = torch.cat([base, base, base[:5]]).to(dtype)  # code j == 40 + j (== 80 + j for j < 5)
    c[4, 1] = float("nan")
    c[7, 0] = float("inf")
    c[50, 3] = float("-inf")
    z = torch.randn(150, 12, generator=g).to(dtype)
    z[0, 0] = float("inf")
    z[1, 5] = float("nan")
    z[2] = float("-inf")
    z[3], z[4], z[5] = c[9], c[2], c[44]  # distance 0 to 2 or 3 codes
    dev, cpu, counters, _ = lookup_with_counters(target, z, c)
    assert_same_outputs(dev, cpu)
    assert dev.indices[:6].tolist() == [0, 0, 0, 9, 2, 44]
    # The reference: float64 distances, dead codes excluded, ties to the first index.
    dist = ((z[3:].double()[:, None] - c.double()[None]) ** 2).sum(-1)
    dist[:, [4, 7, 50]] = float("inf")
    first = (dist == dist.min(1, keepdim=True).values).int().argmax(1)
    assert torch.equal(dev.indices[3:], first)
    assert counters["rows_full_search"] == 3, counters  # the three non-finite rows


def test_uncertified_rows_take_the_candidate_recheck(target, score_pass):
    """Near-ties (midpoints of two codes) that neither pass can certify go through the float64
    re-check of a few candidates, not a search of every code; rows whose fp32 scores could
    overflow through the full float64 re-search. Both exact."""
    g = torch.Generator().manual_seed(9)
    c = torch.randn(300, 16, generator=g)
    z = (c[:200] + c[100:300]) / 2 + 1e-7 * torch.randn(200, 16, generator=g)
    dev, cpu, counters, mma = lookup_with_counters(target, z, c)
    assert_exact_argmin(z, c, dev.indices, "l2")
    assert_same_outputs(dev, cpu)
    assert_score_pass(score_pass, mma, 200, 300, 16)
    rechecked = counters["rows_rechecked"]
    assert rechecked > 0 and counters["rows_full_search"] == 0, counters
    assert counters["codes_rechecked"] <= 10 * rechecked, counters  # a few candidates per row

    big = torch.randn(40, 8, generator=g) * 1e18  # |c|^2 ~ 1e37: fp32 scores may overflow
    zb = big[:30] + 1e16 * torch.randn(30, 8, generator=g)
    dev, cpu, counters, _ = lookup_with_counters(target, zb, big)
    assert_exact_argmin(zb, big, dev.indices, "l2")
    assert_same_outputs(dev, cpu)
    assert counters["rows_full_search"] == 30 and counters["rows_rechecked"] == 0, counters
