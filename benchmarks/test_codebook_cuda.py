"""codebook_lookup on the GPU against torch on the GPU (cdist + argmin, the matmul formula),
fp32 and bf16, with a large torch.mm of the same dtype as the ceiling. Marked `gpu`; skipped
without a CUDA device. Run by scripts/device_check.sh (`pytest benchmarks -m gpu`)."""
import pytest
import torch

from imgtx_fast import _C, codebook_lookup

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and _C.cuda_compiled()),
                       reason="needs a CUDA device and a CUDA build of imgtx_fast"),
]

N = 65536
KS, DS = (8192, 16384), (64, 256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("imgtx_fast", "cdist_argmin", "matmul_formula")
GRID = [(dt, K, D, impl) for dt in DTYPES for K in KS for D in DS for impl in IMPLS]


def _impl(name, z, C):
    if name == "imgtx_fast":
        return lambda: codebook_lookup(z, C)
    if name == "cdist_argmin":
        def cdist():
            idx = torch.cdist(z.float(), C.float()).argmin(1)  # cdist has no bf16 kernel
            return idx, C[idx]
        return cdist

    def formula():
        d = (C.float() ** 2).sum(1) - 2 * (z @ C.T).float()
        idx = d.argmin(1)
        return idx, C[idx]
    return formula


def _time(benchmark, settings, fn):
    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out
    if not benchmark.enabled:
        return benchmark.pedantic(synced, rounds=1, iterations=1)
    for _ in range(2):
        synced()
    return benchmark.pedantic(synced, rounds=max(5, settings.rounds), iterations=1)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gpu_mm_ceiling(benchmark, bench_settings, bench_results, dtype):
    M = 8192
    a = torch.randn(M, M, device="cuda", dtype=DTYPES[dtype])
    benchmark.group = f"gpu ceiling {dtype}"
    _time(benchmark, bench_settings, lambda: a @ a)
    if benchmark.enabled:
        tflops = 2 * M**3 / benchmark.stats.stats.median / 1e12
        benchmark.extra_info["tflops"] = round(tflops, 1)
        bench_results.gpu_ceiling[dtype] = tflops


@pytest.mark.parametrize("dtype,K,D,impl", GRID, ids=[f"{i}-{t}-K{k}-D{d}" for t, k, d, i in GRID])
def test_gpu_codebook(benchmark, bench_settings, bench_results, dtype, K, D, impl):
    g = torch.Generator(device="cuda").manual_seed(K + D)
    C = torch.randn(K, D, device="cuda", generator=g).to(DTYPES[dtype])
    z = torch.randn(N, D, device="cuda", generator=g).to(DTYPES[dtype])
    benchmark.group = f"gpu codebook {dtype} N={N} K={K} D={D}"
    idx, q = _time(benchmark, bench_settings, _impl(impl, z, C))
    assert torch.equal(q, C[idx])
    if impl != "imgtx_fast":  # fp32/bf16-rounded peers may break near-ties differently
        ours = codebook_lookup(z, C)[0]
        assert (idx == ours).float().mean() > 0.999
    if benchmark.enabled:
        med = benchmark.stats.stats.median
        benchmark.extra_info["tflops"] = round(2 * N * K * D / med / 1e12, 2)
        bench_results.gpu_cases.setdefault((dtype, N, K, D), {})[impl] = med
