"""CUDA mask-and-replace kernels against the float64 reference and the CPU kernels.

Marked `gpu`: skipped without a CUDA device (see conftest.py); run by scripts/device_check.sh.
"""
import pytest
import torch

from diffusion_helpers import chi_square_pvalue, replace_heavy_schedule
from imgtx_fast.diffusion import (MaskAndReplaceSchedule, posterior_log_probs, posterior_sample,
                                  q_sample, vb_terms)
from imgtx_fast.diffusion.sampling import philox_seed
from imgtx_fast.reference import diffusion as ref
from test_diffusion import _logits, _tv

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("B,K,N", [(1, 1, 1), (2, 7, 33), (3, 64, 17), (2, 4096, 70), (1, 20000, 9)])
def test_log_probs_vs_reference(B, K, N, layout, dtype):
    g = torch.Generator().manual_seed(B + K + N)
    sched = replace_heavy_schedule(K, 20)
    logp = _logits(B, K, N, layout, dtype, gen=g)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    t = torch.randint(0, 20, (B,), generator=g)
    for kw in (dict(), dict(truncation_rate=0.7),
               dict(guidance_scale=3.0, log_p_x0_uncond=_logits(B, K, N, layout, dtype, gen=g))):
        got = posterior_log_probs(logp.cuda(), x_t.cuda(), t.cuda(), sched,
                                  **{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()})
        want = ref.posterior_log_probs(logp, x_t, sched.coefs(t, B, "cpu"),
                                       log_p_uncond=kw.get("log_p_x0_uncond"),
                                       guidance_scale=kw.get("guidance_scale"),
                                       truncation_rate=kw.get("truncation_rate"))
        assert _tv(got.cpu().exp(), want.exp()) < 1e-6, kw.keys()
        if "truncation_rate" in kw and int(t[0]) == 0:
            assert torch.equal(torch.isinf(got.cpu()[0, :K]), want[0, :K].exp() == 0)


@pytest.mark.parametrize("materialise", [False, True])
@pytest.mark.parametrize("case", [dict(x=6, t=5), dict(x=2, t=3, r=0.6), dict(x=2, t=0, r=0.8),
                                  dict(x=6, t=7, s=2.5)])
def test_sampler_frequencies(case, materialise):
    K, draws = 6, 400_000
    sched = replace_heavy_schedule(K, 10)
    g = torch.Generator().manual_seed(11)
    l1 = (torch.randn(K, generator=g) * 1.5).log_softmax(0)
    u1 = (torch.randn(K, generator=g) * 1.5).log_softmax(0)
    logp = l1.view(1, K, 1).expand(1, K, draws)
    unc = u1.view(1, K, 1).expand(1, K, draws) if "s" in case else None
    if materialise:  # token-contiguous memory, the diffusers layout
        logp = logp.contiguous()
        unc = unc.contiguous() if unc is not None else None
    x_t = torch.full((1, draws), case["x"], dtype=torch.int64)
    x = posterior_sample(logp.cuda(), x_t.cuda(), case["t"], sched, torch.Generator("cuda").manual_seed(3),
                         truncation_rate=case.get("r"), guidance_scale=case.get("s"),
                         log_p_x0_uncond=None if unc is None else unc.cuda())
    counts = torch.bincount(x.cpu().view(-1), minlength=K + 1)
    probs = ref.posterior_log_probs(l1.view(1, K, 1), x_t[:, :1], sched.coefs(case["t"], 1, "cpu"),
                                    log_p_uncond=None if unc is None else u1.view(1, K, 1),
                                    guidance_scale=case.get("s"), truncation_rate=case.get("r")).exp().view(-1)
    assert int(counts[probs == 0].sum()) == 0
    assert chi_square_pvalue(counts, probs) > 1e-4


def test_q_sample_frequencies_and_determinism():
    K, draws = 5, 300_000
    sched = replace_heavy_schedule(K, 10)
    x0 = torch.full((1, draws), 3, dtype=torch.int64, device="cuda")
    a = q_sample(x0, 4, sched, torch.Generator("cuda").manual_seed(1))
    b = q_sample(x0, 4, sched, torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a, b)
    A, B, C = (float(sched.table[4, i]) for i in (3, 4, 5))
    probs = torch.full((K + 1,), B, dtype=torch.float64)
    probs[3], probs[K] = A + B, C
    assert chi_square_pvalue(torch.bincount(a.cpu().view(-1), minlength=K + 1), probs) > 1e-4


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
@pytest.mark.parametrize("B,K,N", [(3, 7, 11), (2, 513, 40), (1, 4096, 33)])
def test_vb_terms_and_grad_vs_reference(B, K, N, layout):
    T = 30
    sched = replace_heavy_schedule(K, T)
    g = torch.Generator().manual_seed(K)
    logits = torch.randn(B, K, N, generator=g) * 2
    if layout == "class_contiguous":
        logits = logits.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    x0 = torch.randint(0, K, (B, N), generator=g)
    x_t = torch.where(torch.rand(B, N, generator=g) < 0.5, K, torch.randint(0, K, (B, N), generator=g))
    t = torch.randint(0, T, (B,), generator=g)
    x = logits.cuda().requires_grad_()
    lv, la = vb_terms(x, x0.cuda(), x_t.cuda(), t.cuda(), sched)
    xr = logits.double().requires_grad_()
    rv, ra = ref.vb_terms(xr, x0, x_t, sched.coefs(t, B, "cpu"))
    torch.testing.assert_close(lv.cpu().double(), rv, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(la.cpu().double(), ra, rtol=2e-5, atol=2e-5)
    gv = torch.randn(B, N, generator=g)
    (gx,) = torch.autograd.grad((lv * gv.cuda()).sum() + la.sum(), x)
    (gr,) = torch.autograd.grad((rv * gv.double()).sum() + ra.sum(), xr)
    torch.testing.assert_close(gx.cpu().double(), gr, rtol=2e-5, atol=2e-5)


def test_bad_input_raises_on_cuda():
    K = 6
    sched = MaskAndReplaceSchedule(K, 10)
    logp = torch.randn(2, K, 5, device="cuda").log_softmax(1)
    x_t = torch.randint(0, K + 1, (2, 5), device="cuda")
    nan = logp.clone()
    nan[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        posterior_sample(nan, x_t, 3, sched)
    bad = x_t.clone()
    bad[1, 1] = K + 3
    with pytest.raises(ValueError, match="x_t has values outside"):
        posterior_sample(logp, bad, 3, sched)
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
        posterior_sample(logp, x_t, torch.tensor([1, 11], device="cuda"), sched)
    assert posterior_sample(logp, x_t, 3, sched).shape == (2, 5)  # the context is still healthy


def test_cuda_graph_capture():
    """The op reads its seed and schedule rows from device memory: capturable, replayable."""
    B, K, N = 2, 300, 64
    sched = MaskAndReplaceSchedule(K, 100)
    logp = torch.randn(B, K, N, device="cuda").log_softmax(1)
    x_t = torch.randint(0, K + 1, (B, N), device="cuda")
    coefs = sched.coefs(torch.tensor([5, 60], device="cuda"), B, "cuda")
    seed = torch.tensor([7], device="cuda")
    op = torch.ops.imgtx.mr_posterior_sample
    eager = op(logp, None, x_t, coefs, seed, 1.0, 0.9)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op(logp, None, x_t, coefs, seed, 1.0, 0.9)  # warm-up on the side stream
        with torch.cuda.graph(graph):
            out = op(logp, None, x_t, coefs, seed, 1.0, 0.9)
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    seed.fill_(8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, op(logp, None, x_t, coefs, seed, 1.0, 0.9))
    assert not torch.equal(out, eager)


def test_philox_seed_from_cuda_generator_is_reproducible():
    g1, g2 = torch.Generator("cuda").manual_seed(5), torch.Generator("cuda").manual_seed(5)
    assert torch.equal(philox_seed(g1, torch.device("cuda")), philox_seed(g2, torch.device("cuda")))
