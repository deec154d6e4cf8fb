"""CUDA codebook_lookup: exact against float64, identical to the CPU kernel, graph-capturable.

Marked `gpu`: skipped without a CUDA device (see conftest.py); run by scripts/device_check.sh.
"""
import pytest
import torch

from imgtx_fast import codebook_lookup
from test_codebook import DTYPES, assert_exact_argmin

pytestmark = pytest.mark.gpu


def both(z, c, metric="l2"):
    gpu = codebook_lookup(z.cuda(), c.cuda(), metric=metric, return_stats=True)
    cpu = codebook_lookup(z, c, metric=metric, return_stats=True)
    return gpu, cpu


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (5, 7, 3), (129, 65, 17), (1000, 1000, 64),
                                   (3000, 4097, 256), (70, 20000, 40), (4099, 300, 513)])
def test_matches_cpu_and_float64(n, k, d, metric):
    g = torch.Generator().manual_seed(n + k + d)
    z, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    gpu, cpu = both(z, c, metric)
    assert_exact_argmin(z, c, gpu.indices.cpu(), metric)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    assert torch.equal(gpu.quantized.cpu(), cpu.quantized)
    assert torch.equal(gpu.sqdist.cpu(), cpu.sqdist)
    assert torch.equal(gpu.counts.cpu(), cpu.counts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cb_dtype", DTYPES)
def test_dtypes(dtype, cb_dtype):
    z = torch.randn(4, 300, 64).to(dtype)
    c = torch.randn(500, 64).to(cb_dtype)
    gpu, cpu = both(z, c)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    assert torch.equal(gpu.quantized.cpu(), cpu.quantized)


def test_strided_and_trained_regime():
    c = 100.0 + 0.05 * torch.randn(512, 32)
    x = c[torch.randint(0, 512, (2, 20, 30))] + 0.03 * torch.randn(2, 20, 30, 32)
    z = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # channel-last view of NCHW
    gpu, cpu = both(z, c)
    assert_exact_argmin(z, c, gpu.indices.cpu(), "l2")
    assert torch.equal(gpu.indices.cpu(), cpu.indices)


def test_ties_and_non_finite():
    c = torch.randn(30, 8)
    c = torch.cat([c, c])
    c[4, 1] = float("nan")
    z = torch.randn(200, 8)
    z[0, 0] = float("inf")
    gpu, cpu = both(z, c)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    assert gpu.indices[0].item() == 0 and (gpu.indices != 4).all()


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


def test_runs_on_the_current_stream():
    z = torch.randn(4096, 128, device="cuda")
    c = torch.randn(2048, 128, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        idx = codebook_lookup(z, c)[0]
    s.synchronize()
    assert torch.equal(idx.cpu(), codebook_lookup(z.cpu(), c.cpu())[0])


def test_autograd_on_cuda():
    z = torch.randn(100, 16, device="cuda", requires_grad=True)
    c = torch.randn(50, 16, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.imgtx.codebook_lookup.default, (z, c, "l2"))


def test_large_rows_64bit_offsets():
    """N * D past 2^31 elements: offsets must be 64-bit."""
    n, d = (2**31) // 64 + 4099, 64
    z = torch.randn(1, d, device="cuda", dtype=torch.bfloat16).expand(n, d)
    c = torch.randn(16, d, device="cuda", dtype=torch.bfloat16)
    idx, q = codebook_lookup(z, c)
    assert (idx == idx[0]).all() and torch.equal(q[-1], q[0])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_views_match_cpu(metric):
    """Every layout the CPU tests cover, on the GPU: the same outputs bit for bit."""
    g = torch.Generator().manual_seed(12)
    c = torch.randn(50, 12, generator=g)
    x = torch.randn(2, 12, 5, 7, generator=g)
    views = [x.permute(0, 2, 3, 1), torch.randn(30, 36, generator=g)[:, 12:24],
             torch.randn(12, 30, generator=g).T, torch.randn(4, 3, 5, 12, generator=g)[:, :, ::2],
             torch.randn(12, generator=g), torch.randn(7, 1, generator=g).expand(7, 12)]
    for z in views:
        gpu = codebook_lookup(z.cuda(), c.cuda(), metric=metric, return_stats=True)
        cpu = codebook_lookup(z, c, metric=metric, return_stats=True)
        for a, b in zip(gpu, cpu):
            assert torch.equal(a.cpu(), b)
