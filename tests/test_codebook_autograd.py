"""codebook_lookup as a torch op: opcheck, torch.compile, and gradients."""
import pytest
import torch

from imgtx_fast import codebook_lookup
from imgtx_fast.reference.codebook import codebook_lookup_differentiable


def sample(n=30, k=20, d=9, seed=0, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    c = torch.randn(k, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return z, c


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(metric, dtype):
    z, c = sample(dtype=dtype)
    torch.library.opcheck(torch.ops.imgtx.codebook_lookup.default, (z, c, metric))
    z3 = torch.randn(2, 5, 7, 9, dtype=dtype).permute(0, 2, 1, 3)
    torch.library.opcheck(torch.ops.imgtx.codebook_lookup.default, (z3, c.detach(), metric))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradients_match_float64_formula(metric):
    z, c = sample(seed=1)
    g_q = torch.randn(z.shape)
    g_s = torch.randn(z.shape[0])
    _, q, s, _ = codebook_lookup(z, c, metric=metric, return_stats=True)
    gz, gc = torch.autograd.grad((q * g_q).sum() + (s * g_s).sum(), (z, c))

    z64 = z.detach().double().requires_grad_()
    c64 = c.detach().double().requires_grad_()
    idx = codebook_lookup(z, c, metric=metric)[0]
    codes = torch.nn.functional.normalize(c64, dim=1, eps=1e-12) if metric == "cosine" else c64
    s64 = ((z64 - codes[idx]) ** 2).sum(1)
    q64 = z64 + (codes[idx] - z64).detach()  # straight-through
    rz, rc = torch.autograd.grad((q64 * g_q.double()).sum() + (s64 * g_s.double()).sum(), (z64, c64))
    torch.testing.assert_close(gz.double(), rz, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gc.double(), rc, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_formula_gradcheck_float64(metric):
    """The formula the op's backward is checked against is itself right (finite differences)."""
    z, c = sample(n=6, k=5, d=4, seed=2, dtype=torch.float32, requires_grad=False)
    idx = codebook_lookup(z, c, metric=metric)[0]
    z64 = z.double().requires_grad_()
    c64 = c.double().requires_grad_()

    def sqdist(z_, c_):
        codes = torch.nn.functional.normalize(c_, dim=1, eps=1e-12) if metric == "cosine" else c_
        return ((z_ - codes[idx]) ** 2).sum(1)

    assert torch.autograd.gradcheck(sqdist, (z64, c64))


def test_reference_backend_has_the_same_gradients():
    z, c = sample(seed=4)
    out = codebook_lookup(z, c, return_stats=True)
    ga = torch.autograd.grad(out.quantized.sum() + out.sqdist.sum(), (z, c))
    ref = codebook_lookup_differentiable(z, c)
    gb = torch.autograd.grad(ref[1].sum() + ref[2].sum(), (z, c))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_half_precision_gradients_keep_dtype():
    z, c = sample(dtype=torch.bfloat16, seed=5)
    _, q, s, _ = codebook_lookup(z, c, return_stats=True)
    gz, gc = torch.autograd.grad(q.float().sum() + s.sum(), (z, c))
    assert gz.dtype == torch.bfloat16 and gc.dtype == torch.bfloat16
    assert torch.isfinite(gz).all() and gc.abs().sum() > 0


def test_torch_compile_fullgraph():
    z, c = sample(n=64, k=40, d=16, seed=6, requires_grad=False)

    def f(z_, c_):
        idx, q = codebook_lookup(z_, c_)
        return idx, q * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    idx, q2 = compiled(z, c)
    ridx, rq = codebook_lookup(z, c)
    assert torch.equal(idx, ridx) and torch.equal(q2, rq * 2.0)
    # a new leading shape (dynamic) and a second metric go through the same graph logic
    z2 = torch.randn(3, 50, 16)
    assert torch.equal(compiled(z2, c)[0], codebook_lookup(z2, c)[0])
