"""Shared oracles for the mask-and-replace tests: explicit transition matrices and chi-square."""
import torch

from imgtx_fast.diffusion import MaskAndReplaceSchedule


def one_step_matrix(sched: MaskAndReplaceSchedule, t: int) -> torch.Tensor:
    """Q[i, j] = q(x_t = j | x_{t-1} = i), (K+1, K+1) float64, from the one-step a, b, c."""
    K = sched.num_classes
    a, b, c = (float(sched.table[t, i]) for i in range(3))
    Q = torch.full((K + 1, K + 1), b, dtype=torch.float64)
    Q[:K, :K] += a * torch.eye(K, dtype=torch.float64)
    Q[:K, K] = c
    Q[K, :] = 0.0
    Q[K, K] = 1.0
    return Q


def cumulative_matrix(sched: MaskAndReplaceSchedule, t: int) -> torch.Tensor:
    """q(x_t | x_0) as the product of the one-step matrices (identity for t = -1): an
    independent check of the closed-form cumulative schedule."""
    K = sched.num_classes
    Q = torch.eye(K + 1, dtype=torch.float64)
    for s in range(t + 1):
        Q = Q @ one_step_matrix(sched, s)
    return Q


def jump_matrix(sched: MaskAndReplaceSchedule, t_prev: int, t: int) -> torch.Tensor:
    """q(x_t | x_{t_prev}) as the product of the one-step matrices t_prev+1 .. t."""
    K = sched.num_classes
    Q = torch.eye(K + 1, dtype=torch.float64)
    for s in range(t_prev + 1, t + 1):
        Q = Q @ one_step_matrix(sched, s)
    return Q


def posterior_by_bayes(p_x0: torch.Tensor, x_t: int, t: int, sched: MaskAndReplaceSchedule,
                       t_prev=None) -> torch.Tensor:
    """p(x_{t'} | x_t) = sum_x0 q(x_t | x_{t'}) q(x_{t'} | x0) / q(x_t | x0) p(x0 | x_t),
    normalised, for one token (t' = t_prev, default t - 1; -1 is x0): p_x0 (K,) probabilities,
    result (K+1,) float64, with explicit (K+1, K+1) transition matrices."""
    K = sched.num_classes
    t_prev = t - 1 if t_prev is None else t_prev
    p = torch.zeros(K + 1, dtype=torch.float64)
    p[:K] = p_x0.double() / p_x0.double().sum()
    if t == 0:
        return p
    Q1 = jump_matrix(sched, t_prev, t)
    Qprev = cumulative_matrix(sched, t_prev)
    Qt = cumulative_matrix(sched, t)
    out = torch.zeros(K + 1, dtype=torch.float64)
    for x0 in range(K):
        if p[x0] == 0 or Qt[x0, x_t] == 0:
            continue
        out += p[x0] * Q1[:, x_t] * Qprev[x0, :] / Qt[x0, x_t]
    return out / out.sum()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expected < 5 are pooled into one cell."""
    counts = counts.double()
    n = counts.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] < 5:  # pooled tail still small: fold it into the largest cell
        i = int(torch.argmax(exp[:-1]))
        obs[i] += obs[-1]
        exp[i] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = max(int(exp.numel()) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def replace_heavy_schedule(K: int, T: int = 10) -> MaskAndReplaceSchedule:
    """A schedule whose 'replace' part is large (the defaults make it ~1e-6 / K)."""
    return MaskAndReplaceSchedule(K, T, alpha_cum_start=0.9, alpha_cum_end=0.2,
                                  gamma_cum_start=0.02, gamma_cum_end=0.5)


def large_logit_case(t: int, guided: bool):
    """Raw logits around 1e4 (the kernels are shift-invariant, so users pass them unnormalised):
    (x, x_t, t, sched, kwargs of posterior_log_probs, the float64 reference log-probs). The
    t = 0 log-space path must form (l - M) + (log u - log pi) so the large values cancel first;
    l + (log u - log pi - M) rounded the 1e4-sized sum and lost ~2.4e-4 of total variation."""
    import torch
    from imgtx_fast.reference import diffusion as ref

    g = torch.Generator().manual_seed(7 + t)
    B, K, N = 2, 50, 64
    sched = replace_heavy_schedule(K, 10)
    x = (torch.randn(B, K, N, generator=g, dtype=torch.float64) * 3 + 1e4).float()
    u = (torch.randn(B, K, N, generator=g, dtype=torch.float64) * 3 + 1e4).float() if guided else None
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    tt = torch.full((B,), t)
    kw = dict(guidance_scale=2.0, log_p_x0_uncond=u) if guided else {}
    want = ref.posterior_log_probs(x.double(), x_t, sched.coefs(tt, B, "cpu").double(),
                                   log_p_uncond=None if u is None else u.double(),
                                   guidance_scale=2.0 if guided else None)
    return x, x_t, tt, sched, kw, want
