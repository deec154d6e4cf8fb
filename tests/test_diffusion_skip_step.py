"""Exact skip-step sampling: posterior_sample / posterior_log_probs with t_prev.

The jump t_prev -> t is checked three ways: its closed-form rows (schedule.jump_rows) against
an explicit product of one-step (K+1, K+1) matrices, the reference twin's composition
(reference.jump_coefs) against the same product, and the posterior against Bayes' rule with
explicit matrices; sampling by chi-square against the exact distribution."""
import pytest
import torch

from diffusion_helpers import (chi_square_pvalue, cumulative_matrix, jump_matrix,
                               posterior_by_bayes, replace_heavy_schedule)
from imgtx_fast._backend import backend
from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_log_probs, posterior_sample
from imgtx_fast.reference import diffusion as ref

P_MIN = 1e-4


def _tv(a, b):
    return float((a.double() - b.double()).abs().sum(1).max()) / 2


def _matrix(a, b, c, K):
    """The mask-and-replace matrix of a forward transition with rates (a, b, c)."""
    Q = torch.full((K + 1, K + 1), float(b), dtype=torch.float64)
    Q[:K, :K] += float(a) * torch.eye(K, dtype=torch.float64)
    Q[:K, K] = float(c)
    Q[K, :] = 0.0
    Q[K, K] = 1.0
    return Q


def _pairs(T):
    return [(tp, t) for t in range(T) for tp in range(-1, t)]


def _schedules(K, T):
    return [MaskAndReplaceSchedule(K, T), replace_heavy_schedule(K, T)]


@pytest.mark.parametrize("K", [1, 2, 5])
def test_jump_rows_are_the_product_of_one_step_matrices(K):
    T = 7
    for sched in _schedules(K, T):
        pairs = _pairs(T)
        tp = torch.tensor([p for p, _ in pairs])
        t = torch.tensor([q for _, q in pairs])
        fast = sched.coefs(t, len(pairs), "cpu", t_prev=tp)
        twin = ref.jump_coefs(sched.table, K, t, tp)
        for i, (p, q) in enumerate(pairs):
            jump, cum_prev, cum = jump_matrix(sched, p, q), cumulative_matrix(sched, p), cumulative_matrix(sched, q)
            for rows in (fast[i], twin[i]):
                for got, want in ((_matrix(*rows[0:3], K), jump), (_matrix(*rows[3:6], K), cum),
                                  (_matrix(*rows[6:9], K), cum_prev)):
                    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-18)
                assert float(rows[9]) == (1.0 if p == -1 else 0.0)


def test_default_t_prev_is_one_step_bit_for_bit():
    sched = MaskAndReplaceSchedule(9, 30)
    t = torch.arange(30)
    assert torch.equal(sched.coefs(t, 30, "cpu", t_prev=t - 1), sched.table)
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(2, 9, 70, generator=g).log_softmax(1)
    x_t = torch.randint(0, 10, (2, 70), generator=g)
    for tt in (0, 7, 29):
        a = posterior_sample(logp, x_t, tt, sched, torch.Generator().manual_seed(3))
        b = posterior_sample(logp, x_t, tt, sched, torch.Generator().manual_seed(3), t_prev=tt - 1)
        assert torch.equal(a, b)
        assert torch.equal(posterior_log_probs(logp, x_t, tt, sched),
                           posterior_log_probs(logp, x_t, tt, sched, t_prev=tt - 1))


@pytest.mark.parametrize("K", [1, 2, 5])
def test_skip_posterior_matches_bayes_with_explicit_matrices(K, cpu_isa):
    T = 6
    N = K + 1
    x_t = torch.arange(N).view(1, N)  # every class, MASK included
    for heavy, sched in enumerate(_schedules(K, T)):
        g = torch.Generator().manual_seed(10 * K + heavy)
        logp = (torch.randn(1, K, N, generator=g, dtype=torch.float64) * 2).log_softmax(1).float()
        for tp, t in _pairs(T):
            got = posterior_log_probs(logp, x_t, t, sched, t_prev=tp).exp()
            for n in range(N):
                want = posterior_by_bayes(logp[0, :, n].exp(), n, t, sched, t_prev=tp)
                assert _tv(got[0, :, n].view(1, -1), want.view(1, -1)) < 1e-6, (tp, t, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,K,N", [(1, 1, 9), (3, 7, 33), (2, 64, 130), (1, 301, 17)])
def test_skip_log_probs_vs_reference(B, K, N, dtype, cpu_isa):
    g = torch.Generator().manual_seed(B * 100 + K + N)
    T = 40
    sched = MaskAndReplaceSchedule(K, T)
    logp = (torch.randn(B, N, K, generator=g) * 2).log_softmax(2).to(dtype).permute(0, 2, 1)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    t = torch.randint(1, T, (B,), generator=g)
    t_prev = (t.double() * torch.rand(B, generator=g)).long() - 1  # in [-1, t)
    t_prev[0] = -1
    got = posterior_log_probs(logp, x_t, t, sched, t_prev=t_prev)
    want = ref.posterior_log_probs(logp, x_t, ref.jump_coefs(sched.table, K, t, t_prev))
    assert _tv(got.exp(), want.exp()) < 1e-6
    assert torch.equal(torch.isinf(got) & (got < 0), want.exp() == 0)
    with backend("reference"):  # the reference backend composes its own rows
        twin = posterior_log_probs(logp, x_t, t, sched, t_prev=t_prev)
    assert _tv(twin.exp(), want.exp()) < 1e-6  # float32 output


@pytest.mark.parametrize("case", [dict(x_t="mask", t=9, tp=4), dict(x_t="real", t=9, tp=2),
                                  dict(x_t="mask", t=7, tp=-1), dict(x_t="real", t=5, tp=0),
                                  dict(x_t="mask", t=8, tp=3, r=0.6, s=2.0)])
@pytest.mark.parametrize("heavy", [False, True])
def test_skip_sampling_frequencies_match_exact_posterior(case, heavy, cpu_isa):
    K, T, draws = 6, 10, 300_000
    sched = replace_heavy_schedule(K, T) if heavy else MaskAndReplaceSchedule(K, T)
    g = torch.Generator().manual_seed(hash(str(case)) % 1000 + heavy)
    logp1 = (torch.randn(K, generator=g) * 1.5).log_softmax(0)
    unc1 = (torch.randn(K, generator=g) * 1.5).log_softmax(0)
    x_t_value = K if case["x_t"] == "mask" else 2
    r, s = case.get("r"), case.get("s")
    kw = dict(truncation_rate=r)
    if s is not None:
        kw.update(guidance_scale=s, log_p_x0_uncond=unc1.view(1, K, 1).expand(1, K, draws))
    x = posterior_sample(logp1.view(1, K, 1).expand(1, K, draws),
                         torch.full((1, draws), x_t_value), case["t"], sched,
                         torch.Generator().manual_seed(17), t_prev=case["tp"], **kw)
    counts = torch.bincount(x.view(-1), minlength=K + 1)
    coefs = ref.jump_coefs(sched.table, K, torch.tensor([case["t"]]), torch.tensor([case["tp"]]))
    probs = ref.posterior_log_probs(logp1.view(1, K, 1), torch.tensor([[x_t_value]]), coefs,
                                    log_p_uncond=None if s is None else unc1.view(1, K, 1),
                                    guidance_scale=s, truncation_rate=r).exp().view(-1)
    assert int(counts[probs == 0].sum()) == 0
    assert chi_square_pvalue(counts, probs) > P_MIN


def test_skip_steps_chain_reaches_x0():
    """A 3-jump chain from all-MASK ends on real classes only (the last jump lands on x0)."""
    K, T = 5, 20
    sched = MaskAndReplaceSchedule(K, T)
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(2, K, 300, generator=g).log_softmax(1)
    x = torch.full((2, 300), K)
    for t, tp in ((19, 12), (12, 4), (4, -1)):
        x = posterior_sample(logp, x, t, sched, g, t_prev=tp)
    assert int(x.max()) < K


@pytest.mark.parametrize("fn", [posterior_sample, posterior_log_probs])
def test_t_prev_bad_input(fn):
    K, B, N = 4, 2, 3
    sched = MaskAndReplaceSchedule(K, 10)
    logp = torch.randn(B, K, N).log_softmax(1)
    x_t = torch.full((B, N), K)
    with pytest.raises(ValueError, match="t_prev must be < t"):
        fn(logp, x_t, 5, sched, t_prev=5)
    with pytest.raises(ValueError, match="t_prev must be < t"):
        fn(logp, x_t, torch.tensor([5, 3]), sched, t_prev=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"t_prev must be in \[-1, 10\)"):
        fn(logp, x_t, 5, sched, t_prev=-2)
    with pytest.raises(ValueError, match=r"t_prev must be a scalar or have shape \(2,\)"):
        fn(logp, x_t, 5, sched, t_prev=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="t_prev must be an int"):
        fn(logp, x_t, 5, sched, t_prev=1.0)
    with pytest.raises(TypeError, match="t_prev must be an integer tensor"):
        fn(logp, x_t, 5, sched, t_prev=torch.tensor(1.0))
