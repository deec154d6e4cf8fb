"""Mask-and-replace kernels (posterior, sampling, q_sample) against float64 oracles."""
import pytest
import torch

from diffusion_helpers import (chi_square_pvalue, large_logit_case, posterior_by_bayes,
                               replace_heavy_schedule)
from imgtx_fast.diffusion import (MaskAndReplaceSchedule, posterior_log_probs, posterior_sample,
                                  q_sample)
from imgtx_fast.reference import diffusion as ref

P_MIN = 1e-4  # chi-square p-value floor; every test below draws fresh seeds deterministically


def _logits(B, K, N, layout, dtype=torch.float32, scale=2.0, gen=None):
    x = torch.randn(B, K, N, generator=gen, dtype=torch.float64) * scale
    x = x.log_softmax(1).to(dtype)
    if layout == "class_contiguous":  # (B, N, K) buffer seen as (B, K, N)
        x = x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    elif layout == "strided":  # a slice of a bigger buffer, odd strides everywhere
        big = torch.zeros(B, K + 3, 2 * N + 1, dtype=dtype)
        big[:, 1:K + 1, 1::2] = x
        x = big[:, 1:K + 1, 1::2]
    return x


def _tv(a, b):
    return float((a.double() - b.double()).abs().sum(1).max()) / 2


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("t", [0, 4])
def test_log_probs_keep_fp32_accuracy_at_large_logits(t, guided):
    x, x_t, tt, sched, kw, want = large_logit_case(t, guided)
    got = posterior_log_probs(x, x_t, tt, sched, logits=True, **kw)
    assert _tv(got.exp(), want.exp()) < 3e-6


# ---- schedule --------------------------------------------------------------------------------
def test_schedule_matches_diffusers_formulas():
    diffusers = pytest.importorskip("diffusers.schedulers.scheduling_vq_diffusion")
    for K, T in [(4096, 100), (7, 10)]:
        s = MaskAndReplaceSchedule(K, T)
        at, att = diffusers.alpha_schedules(T)
        ct, ctt = diffusers.gamma_schedules(T)
        torch.testing.assert_close(s.table[:, 0], torch.tensor(at), rtol=1e-12, atol=0)
        torch.testing.assert_close(s.table[:, 2], torch.tensor(ct), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(s.table[:, 3], torch.tensor(att[:-1]), rtol=1e-12, atol=0)
        torch.testing.assert_close(s.table[:, 5], torch.tensor(ctt[:-1]), rtol=1e-12, atol=0)
        btt = (1 - att - ctt) / K
        torch.testing.assert_close(s.table[:, 4], torch.tensor(btt[:-1]), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kwargs", [dict(alpha_cum_start=1.2), dict(gamma_cum_end=-0.1),
                                    dict(alpha_cum_end=0.5, gamma_cum_end=0.5),
                                    dict(alpha_cum_start=0.3, alpha_cum_end=0.9)])
def test_schedule_rejects_invalid(kwargs):
    with pytest.raises(ValueError, match="MaskAndReplaceSchedule"):
        MaskAndReplaceSchedule(5, 10, **kwargs)


# ---- posterior log-probs ---------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 2, 5, 13])
@pytest.mark.parametrize("heavy", [False, True])
def test_posterior_matches_bayes_with_explicit_matrices(K, heavy, cpu_isa):
    T = 6
    sched = replace_heavy_schedule(K, T) if heavy else MaskAndReplaceSchedule(K, T)
    gen = torch.Generator().manual_seed(K * 10 + heavy)
    N = K + 2
    logp = _logits(1, K, N, "token_contiguous", gen=gen)
    x_t = torch.arange(N).remainder(K + 1).view(1, N)  # every class, MASK included
    for t in range(T):
        if t == 0:
            x_t0 = torch.randint(0, K, (1, N), generator=gen)  # x_0 is never MASK... but x_t may be
            xs = [x_t, x_t0]
        else:
            xs = [x_t]
        for xt in xs:
            got = posterior_log_probs(logp, xt, t, sched).exp()
            for n in range(N):
                want = posterior_by_bayes(logp[0, :, n].exp(), int(xt[0, n]), t, sched)
                assert _tv(got[0, :, n].view(1, -1), want.view(1, -1)) < 1e-6, (t, n, int(xt[0, n]))


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,K,N", [(1, 1, 1), (2, 1, 40), (1, 2, 33), (2, 7, 33), (3, 64, 17),
                                   (1, 301, 40), (2, 33, 300), (1, 20000, 17)])
def test_posterior_log_probs_vs_reference(B, K, N, layout, dtype, cpu_isa):
    gen = torch.Generator().manual_seed(B * 1000 + K * 10 + N)
    sched = MaskAndReplaceSchedule(K, 20)
    logp = _logits(B, K, N, layout, dtype, gen=gen)
    x_t = torch.randint(0, K + 1, (B, N), generator=gen)
    t = torch.randint(0, 20, (B,), generator=gen)
    t[0] = 0 if B > 1 else t[0]
    got = posterior_log_probs(logp, x_t, t, sched)
    assert got.shape == (B, K + 1, N) and got.dtype == torch.float32
    want = ref.posterior_log_probs(logp, x_t, sched.coefs(t, B, "cpu"))
    assert _tv(got.exp(), want.exp()) < 1e-6
    # impossible classes are exactly -inf: MASK when x_t is real, and at t = 0
    impossible = want.exp() == 0
    assert torch.equal(torch.isinf(got) & (got < 0), impossible)


@pytest.mark.parametrize("r", [0.1, 0.5, 0.86, 0.999])
@pytest.mark.parametrize("guided", [False, True])
def test_truncation_and_guidance_vs_reference(r, guided, cpu_isa):
    gen = torch.Generator().manual_seed(int(r * 1000) + guided)
    B, K, N = 2, 50, 150  # >= 128 tokens: full tiles of the token-parallel path too
    sched = replace_heavy_schedule(K, 10)
    logp = _logits(B, K, N, "token_contiguous", scale=3.0, gen=gen)
    unc = _logits(B, K, N, "class_contiguous", scale=3.0, gen=gen) if guided else None
    s = 2.5 if guided else None
    x_t = torch.randint(0, K + 1, (B, N), generator=gen)
    for t in [0, 4, 9]:
        kw = dict(truncation_rate=r, guidance_scale=s, log_p_x0_uncond=unc)
        got = posterior_log_probs(logp, x_t, t, sched, **kw)
        want = ref.posterior_log_probs(logp, x_t, sched.coefs(t, B, "cpu"),
                                       log_p_uncond=unc, guidance_scale=s, truncation_rate=r)
        assert _tv(got.exp(), want.exp()) < 1e-6
        if t == 0:  # at t = 0 the kept set is visible: dropped classes are exactly -inf
            assert torch.equal(torch.isinf(got[:, :K]), want[:, :K].exp() == 0)


def test_posterior_matches_diffusers_q_posterior():
    mod = pytest.importorskip("diffusers.schedulers.scheduling_vq_diffusion")
    B, K, N = 2, 33, 29
    stock = mod.VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=100)
    sched = MaskAndReplaceSchedule.from_diffusers(stock)
    gen = torch.Generator().manual_seed(3)
    logp = _logits(B, K, N, "token_contiguous", gen=gen)
    x_t = torch.randint(0, K + 1, (B, N), generator=gen)
    for t in [1, 2, 50, 98, 99]:
        theirs = stock.q_posterior(logp, x_t, t)
        theirs = theirs - theirs.logsumexp(1, keepdim=True)
        ours = posterior_log_probs(logp, x_t, t, sched)
        assert _tv(ours.exp(), theirs.exp()) < 1e-6, t


# ---- sampling: chi-square against the exact posterior ------------------------------------------
def _sample_counts(logp1, x_t_value, t, sched, draws, seed, materialise=False, **kw):
    """Draws `draws` tokens that share one distribution: a stride-0 expand (no copy, the
    per-token kernels), or materialised token-contiguous (the token-parallel kernels)."""
    K = sched.num_classes
    logp = logp1.view(1, K, 1).expand(1, K, draws)
    x_t = torch.full((1, 1), x_t_value, dtype=torch.int64).expand(1, draws)
    unc = kw.pop("unc", None)
    if unc is not None:
        kw["log_p_x0_uncond"] = unc.view(1, K, 1).expand(1, K, draws)
    if materialise:
        logp = logp.contiguous()
        if unc is not None:
            kw["log_p_x0_uncond"] = kw["log_p_x0_uncond"].contiguous()
    g = torch.Generator().manual_seed(seed)
    x = posterior_sample(logp, x_t, t, sched, g, **kw)
    return torch.bincount(x.view(-1), minlength=K + 1)


@pytest.mark.parametrize("case", [
    dict(x_t="mask", t=1), dict(x_t="mask", t=8), dict(x_t="real", t=1), dict(x_t="real", t=8),
    dict(x_t="mask", t=0), dict(x_t="real", t=0),
    dict(x_t="mask", t=5, r=0.7), dict(x_t="real", t=5, r=0.5), dict(x_t="real", t=0, r=0.6),
    dict(x_t="mask", t=5, s=3.0), dict(x_t="real", t=3, s=2.0, r=0.8),
    dict(x_t="real", t=0, r=0.0), dict(x_t="mask", t=4, r=0.0), dict(x_t="mask", t=0, tie=True),
    dict(x_t="real", t=6, tie=True),
])
@pytest.mark.parametrize("heavy,materialise", [(False, False), (True, False), (True, True)])
def test_sampler_frequencies_match_exact_posterior(case, heavy, materialise, cpu_isa):
    K, T, draws = 6, 10, 300_000
    sched = replace_heavy_schedule(K, T) if heavy else MaskAndReplaceSchedule(K, T)
    gen = torch.Generator().manual_seed(hash(str(case)) % 1000 + heavy)
    logp1 = (torch.randn(K, generator=gen) * 1.5).log_softmax(0)
    unc = (torch.randn(K, generator=gen) * 1.5).log_softmax(0) if "s" in case else None
    if case.get("tie"):  # 4 equal classes (0, 2, 3, 5): the rate keeps the first two of them
        logp1 = torch.tensor([1.0, 0.0, 1.0, 1.0, -1.0, 1.0]).log_softmax(0)
        case = dict(case, r=1.5 * float(logp1[0].exp()))
    x_t_value = K if case["x_t"] == "mask" else 2
    r, s = case.get("r"), case.get("s")
    kw = dict(truncation_rate=r, guidance_scale=s, unc=unc)
    counts = _sample_counts(logp1, x_t_value, case["t"], sched, draws, seed=17,
                            materialise=materialise, **dict(kw))
    probs = ref.posterior_log_probs(
        logp1.view(1, K, 1), torch.tensor([[x_t_value]]), sched.coefs(case["t"], 1, "cpu"),
        log_p_uncond=None if unc is None else unc.view(1, K, 1), guidance_scale=s,
        truncation_rate=r).exp().view(-1)
    assert int(counts[probs == 0].sum()) == 0  # impossible classes (truncated at t=0, MASK) never drawn
    if case["t"] == 0:
        assert int(counts[K]) == 0
    if case.get("tie") and case["t"] == 0:
        assert int(counts[3]) == int(counts[5]) == 0 < int(counts[0]) and int(counts[2]) > 0
    assert chi_square_pvalue(counts, probs) > P_MIN


def test_sampler_large_K_frequencies(cpu_isa):
    """K = 1000 over many chunks of the scan: pooled chi-square on the marginal."""
    K, draws = 1000, 400_000
    sched = replace_heavy_schedule(K, 10)
    gen = torch.Generator().manual_seed(5)
    logp1 = (torch.randn(K, generator=gen) * 2).log_softmax(0)
    for x_t_value, t in [(K, 5), (123, 3), (999, 0)]:
        counts = _sample_counts(logp1, x_t_value, t, sched, draws, seed=t)
        probs = ref.posterior_log_probs(logp1.view(1, K, 1), torch.tensor([[x_t_value]]),
                                        sched.coefs(t, 1, "cpu")).exp().view(-1)
        assert chi_square_pvalue(counts, probs) > P_MIN


def test_sampling_is_deterministic_and_thread_invariant():
    B, K, N = 3, 300, 257
    sched = MaskAndReplaceSchedule(K, 100)
    gen = torch.Generator().manual_seed(0)
    logp = _logits(B, K, N, "token_contiguous", gen=gen)
    x_t = torch.randint(0, K + 1, (B, N), generator=gen)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(posterior_sample(logp, x_t, 40, sched, torch.Generator().manual_seed(9),
                                         truncation_rate=0.9))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    other = posterior_sample(logp, x_t, 40, sched, torch.Generator().manual_seed(10), truncation_rate=0.9)
    assert not torch.equal(other, runs[0])
    torch.manual_seed(4)  # the default generator drives generator=None
    a = posterior_sample(logp, x_t, 40, sched)
    torch.manual_seed(4)
    assert torch.equal(a, posterior_sample(logp, x_t, 40, sched))


def test_sampling_layout_invariant():
    """The same logits in another memory layout give the same samples (same draws per token)."""
    B, K, N = 2, 77, 45
    sched = MaskAndReplaceSchedule(K, 100)
    gen = torch.Generator().manual_seed(1)
    base = _logits(B, K, N, "token_contiguous", gen=gen)
    x_t = torch.randint(0, K + 1, (B, N), generator=gen)
    outs = [posterior_sample(x, x_t, 30, sched, torch.Generator().manual_seed(2))
            for x in (base, base.permute(0, 2, 1).contiguous().permute(0, 2, 1))]
    assert torch.equal(outs[0], outs[1])


# ---- q_sample ----------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 4, 9])
def test_q_sample_frequencies(t):
    K, draws = 5, 300_000
    sched = replace_heavy_schedule(K, 10)
    x0 = torch.full((1, 1), 3, dtype=torch.int64).expand(2, draws // 2)
    x = q_sample(x0, t, sched, torch.Generator().manual_seed(t))
    counts = torch.bincount(x.reshape(-1), minlength=K + 1)
    A, B, C = (float(sched.table[t, i]) for i in (3, 4, 5))
    probs = torch.full((K + 1,), B, dtype=torch.float64)
    probs[3] = A + B
    probs[K] = C
    assert abs(float(probs.sum()) - 1) < 1e-12
    assert chi_square_pvalue(counts, probs) > P_MIN


def test_q_sample_per_sample_t_and_determinism():
    K = 9
    sched = MaskAndReplaceSchedule(K, 100)
    x0 = torch.randint(0, K, (4, 1000), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 60, 99])
    a = q_sample(x0, t, sched, torch.Generator().manual_seed(3))
    b = q_sample(x0, t, sched, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    masked = (a == K).float().mean(1)
    assert masked[0] < 0.01 and masked[3] > 0.99  # C_0 ~ 1e-5, C_99 ~ 1
    assert ((a == x0) | (a == K)).float().mean() > 0.999


# ---- empty inputs --------------------------------------------------------------------------------
def test_empty_inputs():
    K = 4
    sched = MaskAndReplaceSchedule(K, 10)
    for B, N in [(0, 5), (2, 0)]:
        logp = torch.zeros(B, K, N)
        x_t = torch.zeros(B, N, dtype=torch.int64)
        assert posterior_sample(logp, x_t, 3, sched).shape == (B, N)
        assert posterior_log_probs(logp, x_t, 3, sched).shape == (B, K + 1, N)
        assert q_sample(x_t, 3, sched).shape == (B, N)


def _kept_in_index_order(p: torch.Tensor, r: float) -> torch.Tensor:
    """diffusers' top-r rule written out per column: classes in descending p, equal p by
    index, each kept while the mass before it is < r (the first always). p (K, N) float64."""
    K, N = p.shape
    keep = torch.zeros(K, N, dtype=torch.bool)
    for n in range(N):
        before = 0.0
        for i, j in enumerate(sorted(range(K), key=lambda j: (-float(p[j, n]), j))):
            keep[j, n] = i == 0 or before < r
            before += float(p[j, n])
    return keep


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
@pytest.mark.parametrize("ties", [1, 2, 3, 5])
def test_truncation_orders_ties_by_index(layout, ties, cpu_isa):
    """Equal probabilities are ordered by index, as diffusers' sort orders them: where the
    cut falls inside a group of equal classes, the lowest indices stay. The tied classes are
    spread over the row, and the rates cut after each of them in turn; r = 0 keeps only the
    first. 5 ties exceed the token-parallel path's top-4 shortcut, so its bisection finishes."""
    K, N = 20, 40
    sched = MaskAndReplaceSchedule(K, 10)
    tied = [3 + 4 * i for i in range(ties)]  # 3, 7, 11, ...
    logits = torch.full((1, K, N), -3.0)
    logits[:, tied] = 2.0                   # `ties` equal most likely classes
    logits[:, 1] = 1.0                      # the next one, at a lower index
    logits[:, :, 8] = torch.linspace(0, 1, K)  # one ordinary token among them
    logp = logits.log_softmax(1)
    if layout == "class_contiguous":
        logp = logp.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    x_t = torch.full((1, N), K)
    p = logp[0].double().exp()
    v = float(p[tied[0], 0])
    rates = [0.0] + [(m + 0.5) * v for m in range(ties)] + [0.5, 0.99]
    for r in rates:
        got = posterior_log_probs(logp, x_t, 0, sched, truncation_rate=r)
        kept = torch.isfinite(got[0, :K])
        assert torch.equal(kept, _kept_in_index_order(p, r)), r
        if 0 < r < ties * v:  # the cut is inside the tie: the first ceil(r / v) tied stay
            assert kept[tied, 0].tolist() == [m < r / v for m in range(ties)], r
        want = ref.posterior_log_probs(logp, x_t, sched.coefs(0, 1, "cpu"), truncation_rate=r)
        assert _tv(got.exp(), want.exp()) < 1e-6, r
        for t in (3, 9):  # the kept set also shapes every later posterior
            got = posterior_log_probs(logp, x_t, t, sched, truncation_rate=r)
            want = ref.posterior_log_probs(logp, x_t, sched.coefs(t, 1, "cpu"), truncation_rate=r)
            assert _tv(got.exp(), want.exp()) < 1e-6, (r, t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
def test_truncation_ties_of_half_precision_logits(dtype, layout, cpu_isa):
    """fp16/bf16 logits on a coarse grid tie often: every rate, r = 0 included, keeps the set
    of diffusers' rule with ties by index (reference.truncate), token by token."""
    B, K, N = 2, 37, 150
    g = torch.Generator().manual_seed(11)
    logits = (torch.randint(-4, 3, (B, K, N), generator=g).double() * 0.5).to(dtype)
    if layout == "class_contiguous":
        logits = logits.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    sched = replace_heavy_schedule(K, 10)
    p = torch.softmax(logits.double(), 1)
    for r in (0.0, 0.1, 0.3, 0.6, 0.9):
        got = posterior_log_probs(logits, x_t, 0, sched, truncation_rate=r)
        for b in range(B):
            assert torch.equal(torch.isfinite(got[b, :K]), _kept_in_index_order(p[b], r)), (r, b)
        for t in (0, 5):
            got = posterior_log_probs(logits, x_t, t, sched, truncation_rate=r)
            want = ref.posterior_log_probs(logits, x_t, sched.coefs(t, B, "cpu"), truncation_rate=r)
            assert _tv(got.exp(), want.exp()) < 1e-6, (r, t)


@pytest.mark.parametrize("K", [1, 2, 3, 5])
@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
def test_truncation_with_few_classes(K, layout, cpu_isa):
    """K below the token-parallel path's top-4 window, and just above it."""
    N = 40
    sched = replace_heavy_schedule(K, 10)
    gen = torch.Generator().manual_seed(K)
    logp = _logits(1, K, N, layout, gen=gen)
    x_t = torch.randint(0, K + 1, (1, N), generator=gen)
    for r in (0.2, 0.7):
        for t in (0, 6):
            got = posterior_log_probs(logp, x_t, t, sched, truncation_rate=r)
            want = ref.posterior_log_probs(logp, x_t, sched.coefs(t, 1, "cpu"), truncation_rate=r)
            assert _tv(got.exp(), want.exp()) < 1e-6, (r, t)
