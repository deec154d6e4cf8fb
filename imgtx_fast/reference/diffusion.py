"""Plain-PyTorch float64 mask-and-replace diffusion: the test oracle and the "reference" backend.

Written from the spec's formulas (docs/specs/mask_and_replace.md) in probability space,
independently of the kernels' (u, v, w, y) form. Memory is O(B K N): this is for checking, not
for speed.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def truncate(p: Tensor, r: float) -> Tensor:
    """Top-r on probabilities p (B, K, N): in descending order, equal values by index (a stable
    sort), keep a class while the mass before it is < r (the first class always kept: r = 0
    keeps only it); the rest become 0. This is diffusers' `truncate` with its ties ordered."""
    sorted_p, order = torch.sort(p, dim=1, descending=True, stable=True)
    above = sorted_p.cumsum(1) - sorted_p
    keep_sorted = above < r
    keep_sorted[:, 0] = True
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return torch.where(keep, p, torch.zeros_like(p))


def compose_steps(first: Tuple[float, float, float], then: Tuple[float, float, float],
                  K: int) -> Tuple[float, float, float]:
    """(a, b, c) of the product of two mask-and-replace transition matrices, `first` applied
    first: the real block (a1 I + b1 11')(a2 I + b2 11') and the MASK column (a1 + K b1) c2 + c1.
    No subtraction, so b keeps full relative precision however close a + c is to 1."""
    a1, b1, c1 = first
    a2, b2, c2 = then
    return a1 * a2, a1 * b2 + b1 * a2 + K * b1 * b2, c1 + (a1 + K * b1) * c2


def _steps_product(table: Tensor, K: int, start: int, stop: int) -> Tuple[float, float, float]:
    """(a, b, c) of the forward transition over the one-step rows start..stop-1 (identity when
    empty), composed step by step from the table's one-step columns."""
    acc = (1.0, 0.0, 0.0)
    for s in range(start, stop):
        acc = compose_steps(acc, tuple(float(v) for v in table[s, :3]), K)
    return acc


def jump_coefs(table: Tensor, K: int, t: Tensor, t_prev: Tensor) -> Tensor:
    """The kernels' coefficient rows (B, 10) for the reverse jump t -> t_prev (t_prev = -1: x0),
    built from the one-step rows of `table` alone: the jump's (a, b, c) is the product of the
    steps t_prev+1 .. t, the cumulative rows at t and t_prev the products from step 0."""
    rows = []
    for ti, tpi in zip(t.tolist(), t_prev.tolist()):
        a, b, c = _steps_product(table, K, tpi + 1, ti + 1)
        A, B, C = _steps_product(table, K, 0, ti + 1)
        Ap, Bp, Cp = _steps_product(table, K, 0, tpi + 1)
        rows.append([a, b, c, A, B, C, Ap, Bp, Cp, 1.0 if tpi < 0 else 0.0])
    return torch.tensor(rows, dtype=torch.float64, device=t.device).view(len(rows), 10)


def guided_log_p(log_p: Tensor, log_p_uncond: Optional[Tensor], guidance_scale: Optional[float]) -> Tensor:
    l = log_p.double()
    if log_p_uncond is not None:
        lu = log_p_uncond.double()
        l = lu + guidance_scale * (l - lu)
    return l


def posterior_probs(p: Tensor, x_t: Tensor, coefs: Tensor, dtype=torch.float64) -> Tensor:
    """Normalised p(x_{t-1} | x_t) (B, K+1, N) from p(x0 | x_t) (B, K, N), which need not be
    normalised (the posterior is 1-homogeneous in p). Differentiable in p. Computed in `dtype`
    (float64 for checking; the benchmarks also time it in float32 as the plain-PyTorch peer)."""
    p = p.to(dtype)
    B, K, N = p.shape
    a, b, c, A, Bc, C, Ap, Bp, Cp, t0 = [coefs.to(dtype)[:, i].view(B, 1, 1) for i in range(10)]
    P = p.sum(1, keepdim=True)
    is_mask = (x_t == K).view(B, 1, N)
    m = x_t.clamp(max=K - 1).view(B, 1, N)
    # x_t = MASK
    mask_real = (c / C) * (Ap * p + Bp * P)
    mask_K = (Cp / C) * P
    # x_t = m < K
    p_m = p.gather(1, m)
    Z = p_m / (A + Bc) + (P - p_m) / Bc
    real = b * (Ap * p / Bc + Bp * Z)
    at_m = (a + b) * (Ap * p_m / (A + Bc) + Bp * Z)
    onehot_m = torch.zeros_like(p, dtype=torch.bool).scatter_(1, m, True)
    real = torch.where(onehot_m, at_m, real)
    pi_real = torch.where(is_mask, mask_real, real)
    pi_K = torch.where(is_mask, mask_K, torch.zeros_like(mask_K))
    # t = 0: p(x_{t-1}) = p(x0 | x_t), MASK impossible
    pi_real = torch.where(t0 > 0, p, pi_real)
    pi_K = torch.where(t0 > 0, torch.zeros_like(pi_K), pi_K)
    pi = torch.cat([pi_real, pi_K], dim=1)
    return pi / pi.sum(1, keepdim=True)


def posterior_log_probs(log_p: Tensor, x_t: Tensor, coefs: Tensor, *, log_p_uncond=None,
                        guidance_scale=None, truncation_rate=None) -> Tensor:
    l = guided_log_p(log_p, log_p_uncond, guidance_scale)
    p = torch.softmax(l, dim=1)
    if truncation_rate is not None and truncation_rate < 1:
        p = truncate(p, truncation_rate)
    return posterior_probs(p, x_t, coefs).log()


def posterior_sample(log_p, x_t, coefs, *, generator=None, **kw) -> Tensor:
    probs = posterior_log_probs(log_p, x_t, coefs, **kw).exp()
    B, K1, N = probs.shape
    flat = probs.permute(0, 2, 1).reshape(B * N, K1)
    return torch.multinomial(flat, 1, generator=generator).view(B, N)


def q_sample_probs(x0: Tensor, coefs: Tensor, K: int) -> Tensor:
    """q(x_t | x0) as (B, K+1, N) float64 probabilities."""
    B, N = x0.shape
    A, Bc, C = [coefs.double()[:, i].view(B, 1, 1) for i in (3, 4, 5)]
    onehot = F.one_hot(x0, K).permute(0, 2, 1).double()
    real = A * onehot + Bc
    return torch.cat([real, C.expand(B, 1, N)], dim=1)


def q_sample(x0, coefs, K, *, generator=None) -> Tensor:
    probs = q_sample_probs(x0, coefs, K)
    B, K1, N = probs.shape
    return torch.multinomial(probs.permute(0, 2, 1).reshape(B * N, K1), 1, generator=generator).view(B, N)


def vb_terms(logits: Tensor, x0: Tensor, x_t: Tensor, coefs: Tensor,
             dtype=torch.float64) -> Tuple[Tensor, Tensor]:
    """Per-token (L_vb, L_aux) (B, N) in `dtype`, differentiable in logits."""
    B, K, N = logits.shape
    tiny = torch.finfo(dtype).tiny
    log_p = torch.log_softmax(logits.to(dtype), dim=1)
    model = posterior_probs(log_p.exp(), x_t, coefs, dtype)
    true = posterior_probs(F.one_hot(x0, K).permute(0, 2, 1).to(dtype), x_t, coefs, dtype)
    log_model = model.clamp_min(tiny).log()
    kl = torch.where(true > 0, true * (true.clamp_min(tiny).log() - log_model), torch.zeros_like(true)).sum(1)
    ce = -log_p.gather(1, x0.view(B, 1, N)).squeeze(1)
    t0 = coefs[:, 9].view(B, 1) > 0
    return torch.where(t0, ce, kl), ce
