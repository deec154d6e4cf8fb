"""CUDA mask-and-replace kernels against the float64 reference and the CPU kernels.

Every test taking `target` runs twice (tests/cuda_targets.py): on a GPU (param `gpu`, skipped
without a CUDA device; run by scripts/device_check.sh) and under the CPU emulator of the CUDA
kernels (param `emulated`, with smaller sizes where the GPU sizes would take minutes). Graph
capture is GPU-only (marked `gpu`).
"""
import pytest
import torch

from cuda_targets import full_sizes_too, sized_cases, skip_slow_unless_requested, target  # noqa: F401
from diffusion_helpers import chi_square_pvalue, large_logit_case, replace_heavy_schedule
from imgtx_fast.diffusion import (MaskAndReplaceSchedule, posterior_log_probs, posterior_sample,
                                  q_sample, vb_terms)
from imgtx_fast.diffusion.sampling import philox_seed
from imgtx_fast.reference import diffusion as ref
from test_diffusion import _logits, _tv

# (B, K, N) on the GPU and under the emulator. A block caches G in {1, 2, 4, 8} tokens' rows in
# shared memory (G = 4 token-fast and 1 class-fast at K = 4096; one row of 20000 classes needs
# an opt-in over 72 KB; 60000 classes fit no device: every pass re-reads global memory).
LOG_PROB_SIZES = {
    "1x1x1": ((1, 1, 1), (1, 1, 1)),
    "2x7x33": ((2, 7, 33), (2, 7, 33)),
    "3x64x17": ((3, 64, 17), (3, 64, 17)),
    "2x4096x70": ((2, 4096, 70), (2, 4096, 7)),
    "1x20000x9": ((1, 20000, 9), (1, 20000, 3)),
    "1x60000x3": ((1, 60000, 3), (1, 60000, 2)),
}


@pytest.mark.parametrize("variant", ["plain", "truncation", "zero_rate", "guidance"])
@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("target,case", sized_cases(LOG_PROB_SIZES), indirect=["target"])
def test_log_probs_vs_reference(target, case, dtype, layout, variant):
    """The "strided" layout with truncation reads the logits with one thread map and writes the
    output with another: it caught the output pass truncating with the threshold of the token a
    thread had read instead of the token it writes."""
    B, K, N = target.pick(*LOG_PROB_SIZES[case])
    g = torch.Generator().manual_seed(B + K + N)
    sched = replace_heavy_schedule(K, 20)
    logp = _logits(B, K, N, layout, dtype, gen=g)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    t = torch.randint(0, 20, (B,), generator=g)
    kw = {"plain": dict(), "truncation": dict(truncation_rate=0.7), "zero_rate": dict(truncation_rate=0.0),
          "guidance": dict(guidance_scale=3.0,
                           log_p_x0_uncond=_logits(B, K, N, layout, dtype, gen=g))}[variant]
    with target.kernels():
        got = posterior_log_probs(target.to(logp), target.to(x_t), target.to(t), sched,
                                  **target.to_kw(kw))
    # fp16/bf16 probabilities tie: the reference orders ties by index, as the kernels
    want = ref.posterior_log_probs(logp, x_t, sched.coefs(t, B, "cpu"),
                                   log_p_uncond=kw.get("log_p_x0_uncond"),
                                   guidance_scale=kw.get("guidance_scale"),
                                   truncation_rate=kw.get("truncation_rate"))
    assert _tv(got.cpu().exp(), want.exp()) < 1e-6
    if "truncation_rate" in kw and int(t[0]) == 0:
        assert torch.equal(torch.isinf(got.cpu()[0, :K]), want[0, :K].exp() == 0)


TIE_SIZES = {"2x37x150": ((2, 37, 150), (2, 37, 40)), "1x300x20": ((1, 300, 20), (1, 300, 6))}


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("target,case", sized_cases(TIE_SIZES), indirect=["target"])
def test_truncation_ties_by_index(target, case, dtype, layout):
    """Logits on a coarse grid tie in every token: the cut often falls inside a group of equal
    classes, where the kernels keep the lowest indices (the index bisection), and r = 0 keeps
    the first most likely class; as the reference and the CPU kernels."""
    from test_diffusion import _kept_in_index_order

    B, K, N = target.pick(*TIE_SIZES[case])
    g = torch.Generator().manual_seed(K + N)
    logp = (torch.randint(-4, 3, (B, N, K), generator=g).double() * 0.5).to(dtype)
    logp = logp.permute(0, 2, 1) if layout == "class_contiguous" else logp.permute(0, 2, 1).contiguous()
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    sched = replace_heavy_schedule(K, 10)
    p = torch.softmax(logp.double(), 1)
    for r in (0.0, 0.3, 0.6):
        for t in (0, 5):
            tt = torch.full((B,), t)
            with target.kernels():
                got = posterior_log_probs(target.to(logp), target.to(x_t), target.to(tt), sched,
                                          truncation_rate=r).cpu()
            want = ref.posterior_log_probs(logp, x_t, sched.coefs(tt, B, "cpu"), truncation_rate=r)
            assert _tv(got.exp(), want.exp()) < 1e-6, (r, t)
            cpu = posterior_log_probs(logp, x_t, tt, sched, truncation_rate=r)
            assert _tv(got.exp(), cpu.exp()) < 1e-6, (r, t)
            if t == 0:
                for b in range(B):
                    assert torch.equal(torch.isfinite(got[b, :K]), _kept_in_index_order(p[b], r)), (r, b)


@full_sizes_too
@pytest.mark.parametrize("materialise", [False, True])
@pytest.mark.parametrize("case", [dict(x=6, t=5), dict(x=2, t=3, r=0.6), dict(x=2, t=0, r=0.8),
                                  dict(x=6, t=7, s=2.5), dict(x=2, t=3, r=0.0),
                                  dict(x=6, t=0, tie=True)],
                         ids=["masked", "truncation", "truncation_t0", "guidance", "zero_rate",
                              "tie_cut"])
def test_sampler_frequencies(target, case, materialise):
    """Chi-square of the sample frequencies against the exact distribution. The emulator draws
    fewer samples (~0.7 ms per token with truncation): 3000, where every possible class still
    expects >= 18 draws (the chi-square approximation holds, cells expected below 5 would be
    pooled anyway), with less power against small biases only (a wrong class, a lost
    truncation or a mis-scaled guidance moves whole cells: chi-square in the hundreds);
    emulated_full (slow) draws 40000."""
    K, draws = 6, target.pick(400_000, 3_000, emulated_full=40_000)
    sched = replace_heavy_schedule(K, 10)
    g = torch.Generator().manual_seed(11)
    l1 = (torch.randn(K, generator=g) * 1.5).log_softmax(0)
    u1 = (torch.randn(K, generator=g) * 1.5).log_softmax(0)
    if case.get("tie"):  # 4 equal classes (0, 2, 3, 5): the rate keeps the first two of them
        l1 = torch.tensor([1.0, 0.0, 1.0, 1.0, -1.0, 1.0]).log_softmax(0)
        case = dict(case, r=1.5 * float(l1[0].exp()))
    # stride-0 token axis (class-fast thread map), or token-contiguous memory (the diffusers
    # layout); the views are taken on the target device
    logp = target.to(l1).view(1, K, 1).expand(1, K, draws)
    unc = target.to(u1).view(1, K, 1).expand(1, K, draws) if "s" in case else None
    if materialise:
        logp = logp.contiguous()
        unc = unc.contiguous() if unc is not None else None
    x_t = torch.full((1, draws), case["x"], dtype=torch.int64)
    with target.kernels():
        x = posterior_sample(logp, target.to(x_t), case["t"], sched, target.generator(3),
                             truncation_rate=case.get("r"), guidance_scale=case.get("s"),
                             log_p_x0_uncond=unc)
    counts = torch.bincount(x.cpu().view(-1), minlength=K + 1)
    probs = ref.posterior_log_probs(l1.view(1, K, 1), x_t[:, :1], sched.coefs(case["t"], 1, "cpu"),
                                    log_p_uncond=None if unc is None else u1.view(1, K, 1),
                                    guidance_scale=case.get("s"), truncation_rate=case.get("r")).exp().view(-1)
    assert int(counts[probs == 0].sum()) == 0
    assert chi_square_pvalue(counts, probs) > 1e-4
    if case.get("tie"):
        assert int(counts[3]) == int(counts[5]) == 0 < int(counts[0]) and int(counts[2]) > 0


def test_q_sample_frequencies_and_determinism(target):
    K, draws = 5, 300_000
    sched = replace_heavy_schedule(K, 10)
    x0 = target.to(torch.full((1, draws), 3, dtype=torch.int64))
    with target.kernels():
        a = q_sample(x0, 4, sched, target.generator(1))
    b = q_sample(x0, 4, sched, target.generator(1))
    assert torch.equal(a, b)
    A, B, C = (float(sched.table[4, i]) for i in (3, 4, 5))
    probs = torch.full((K + 1,), B, dtype=torch.float64)
    probs[3], probs[K] = A + B, C
    assert chi_square_pvalue(torch.bincount(a.cpu().view(-1), minlength=K + 1), probs) > 1e-4


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous", "strided"])
@pytest.mark.parametrize("case", [dict(), dict(r=0.7), dict(s=2.5), dict(t0=True, r=0.9)],
                         ids=["plain", "truncation", "guidance", "t0"])
def test_samples_match_cpu_kernel(target, case, layout):
    """The same torch.Generator seed gives bit for bit the CPU kernel's samples (the Philox
    counter of a token is its index, whatever the threads or blocks; a CPU generator's seed
    moves to the device, see diffusion.sampling.philox_seed). Same for q_sample."""
    B, K, N = 2, 50, 150
    g = torch.Generator().manual_seed(21)
    sched = replace_heavy_schedule(K, 10)
    logp = _logits(B, K, N, layout, gen=g)
    unc = _logits(B, K, N, layout, gen=g) if "s" in case else None
    x_t = torch.where(torch.rand(B, N, generator=g) < 0.4, K, torch.randint(0, K, (B, N), generator=g))
    t = torch.tensor([0, 0]) if case.get("t0") else torch.tensor([3, 8])
    kw = dict(truncation_rate=case.get("r"), guidance_scale=case.get("s"))
    for seed in (0, 5):
        with target.kernels():
            got = posterior_sample(target.to(logp), target.to(x_t), target.to(t), sched,
                                   torch.Generator().manual_seed(seed),
                                   log_p_x0_uncond=target.to(unc), **kw)
        with target.host():
            want = posterior_sample(logp, x_t, t, sched, torch.Generator().manual_seed(seed),
                                    log_p_x0_uncond=unc, **kw)
        assert torch.equal(got.cpu(), want), f"seed {seed}: {int((got.cpu() != want).sum())} tokens differ"
    x0 = torch.randint(0, K, (B, N), generator=g)[:, ::2]  # strided rows
    with target.kernels():
        got = q_sample(target.to(x0), target.to(t), sched, torch.Generator().manual_seed(4))
    with target.host():
        want = q_sample(x0, t, sched, torch.Generator().manual_seed(4))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
@pytest.mark.parametrize("B,K,N", [(3, 7, 11), (2, 513, 40), (1, 4096, 33), (1, 60000, 2)])
def test_vb_terms_and_grad_vs_reference(target, B, K, N, layout):
    T = 30
    sched = replace_heavy_schedule(K, T)
    g = torch.Generator().manual_seed(K)
    logits = torch.randn(B, K, N, generator=g) * 2
    if layout == "class_contiguous":
        logits = logits.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    x0 = torch.randint(0, K, (B, N), generator=g)
    x_t = torch.where(torch.rand(B, N, generator=g) < 0.5, K, torch.randint(0, K, (B, N), generator=g))
    t = torch.randint(0, T, (B,), generator=g)
    t[0] = 0  # the NLL branch as well as the KL one
    x = target.to(logits).requires_grad_()
    with target.kernels():
        lv, la = vb_terms(x, target.to(x0), target.to(x_t), target.to(t), sched)
    xr = logits.double().requires_grad_()
    rv, ra = ref.vb_terms(xr, x0, x_t, sched.coefs(t, B, "cpu"))
    torch.testing.assert_close(lv.cpu().double(), rv, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(la.cpu().double(), ra, rtol=2e-5, atol=2e-5)
    gv = torch.randn(B, N, generator=g)
    with target.kernels():
        (gx,) = torch.autograd.grad((lv * target.to(gv)).sum() + la.sum(), x)
    (gr,) = torch.autograd.grad((rv * gv.double()).sum() + ra.sum(), xr)
    assert gx.stride() == x.stride()
    torch.testing.assert_close(gx.cpu().double(), gr, rtol=2e-5, atol=2e-5)


def test_bad_input_raises_on_cuda(target):
    """The kernels' status word raises like the CPU path (the same message): NaN logits,
    out-of-range tokens, for each op; a bad t is caught before any launch."""
    K = 6
    sched = MaskAndReplaceSchedule(K, 10)
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(2, K, 5, generator=g).log_softmax(1)
    x_t = torch.randint(0, K + 1, (2, 5), generator=g)
    nan = logp.clone()
    nan[0, 1, 1] = float("nan")
    high, low = x_t.clone(), x_t.clone()
    high[1, 1], low[0, 3] = K + 3, -1
    t = torch.tensor([1, 2])

    def raises_like_cpu(match, op, *args):
        with pytest.raises(ValueError, match=match) as on_target, target.kernels():
            op(*(target.to(a) for a in args))
        with pytest.raises(ValueError) as on_cpu, target.host():
            op(*args)
        assert str(on_target.value) == str(on_cpu.value)

    raises_like_cpu("NaN", posterior_sample, nan, x_t, 3, sched)
    raises_like_cpu("NaN", posterior_log_probs, nan, x_t, 3, sched)
    raises_like_cpu("NaN", vb_terms, nan, x_t.clamp_max(K - 1), x_t, t, sched)
    for bad in (high, low):
        raises_like_cpu("x_t has values outside", posterior_sample, logp, bad, 3, sched)
        raises_like_cpu("x_t has values outside", posterior_log_probs, logp, bad, 3, sched)
        raises_like_cpu(r"x0 has values outside \[0, 6\)", q_sample, bad, 3, sched)
        raises_like_cpu(r"x0 must be in \[0, 6\) and x_t in \[0, 6\]", vb_terms, logp, bad, x_t, t, sched)
        raises_like_cpu(r"x0 must be in \[0, 6\) and x_t in \[0, 6\]", vb_terms, logp,
                        x_t.clamp_max(K - 1), bad, t, sched)
    raises_like_cpu(r"x0 has values outside \[0, 6\)", q_sample, x_t.clamp_min(K), 3, sched)  # MASK
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
        posterior_sample(target.to(logp), target.to(x_t), target.to(torch.tensor([1, 11])), sched)
    with target.kernels():  # the context is still healthy
        assert posterior_sample(target.to(logp), target.to(x_t), 3, sched).shape == (2, 5)


@pytest.mark.gpu
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


def test_philox_seed_from_device_generator_is_reproducible(target):
    target.expect_launches = False  # draws seeds only
    g1, g2 = target.generator(5), target.generator(5)
    dev = torch.device(target.device)
    assert torch.equal(philox_seed(g1, dev), philox_seed(g2, dev))


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("t", [0, 4])
def test_log_probs_keep_fp32_accuracy_at_large_logits(target, t, guided):
    x, x_t, tt, sched, kw, want = large_logit_case(t, guided)
    with target.kernels():
        got = posterior_log_probs(target.to(x), target.to(x_t), target.to(tt), sched,
                                  logits=True, **target.to_kw(kw))
    assert _tv(got.cpu().exp(), want.exp()) < 3e-6
