"""VQ-Diffusion's training loss in one fused forward and one fused backward pass, and its
importance sampler for t.

Per token (spec): L_vb = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) for t > 0 and
-log p_theta(x0 | x_t)[x0] at t = 0; L_aux = -log p_theta(x0 | x_t)[x0]. Per sample
  loss_b = mean_n( m_n L_vb + w_aux (1 + (1 - t/T)) m_n L_aux )
with m_n = mask_weight[0] on masked tokens, mask_weight[1] elsewhere (1 at t = 0, as in the
published code), and loss = mean_b( loss_b / (T p(t_b)) ): an unbiased estimate of the mean
over t of the per-step loss, equal to the plain mean of loss_b when t is uniform. (The
published code divides by p(t_b) alone: T times larger, same gradient direction.)
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._backend import get_backend
from ..reference import diffusion as _reference
from .sampling import _check_schedule, check_index, check_logp
from .schedule import MaskAndReplaceSchedule


def vb_terms(logits: Tensor, x0: Tensor, x_t: Tensor, t, sched: MaskAndReplaceSchedule):
    """Per-token (L_vb, L_aux), (B, N) float32 whatever the logits' float dtype and the backend
    (the reference backend computes in float64 and rounds, so a loss keeps its dtype when the
    backend is switched)."""
    op = "vb_loss"
    _check_schedule(sched, op)
    check_logp(logits, "logits", sched, op)
    B, K, N = logits.shape
    x0 = check_index(x0, "x0", (B, N), logits.device, op)
    x_t = check_index(x_t, "x_t", (B, N), logits.device, op)
    coefs = sched.coefs(t, B, logits.device, op)
    if get_backend() == "reference":
        loss_vb, loss_aux = _reference.vb_terms(logits, x0, x_t, coefs)
        return loss_vb.float(), loss_aux.float()
    loss_vb, loss_aux, _ = torch.ops.imgtx.mr_vb_terms(logits, x0, x_t, coefs)
    return loss_vb, loss_aux


def vb_loss(logits: Tensor, x0: Tensor, x_t: Tensor, t, sched: MaskAndReplaceSchedule, *,
            aux_weight: float = 5e-4, pt: Optional[Tensor] = None, adaptive_aux: bool = True,
            mask_weight: Sequence[float] = (1.0, 1.0), return_per_sample: bool = False):
    """VQ-Diffusion's loss from raw logits (B, K, N) of p(x0 | x_t); differentiable in logits.

    t: int or (B,) tensor; pt: (B,) probabilities t was drawn with (None: uniform, 1/T).
    return_per_sample=True also returns the per-sample L_t (mean over tokens of the weighted
    L_vb, detached), which TimestepSampler.update expects.
    """
    loss_vb, loss_aux = vb_terms(logits, x0, x_t, t, sched)
    B, K, N = logits.shape
    if len(mask_weight) != 2:
        raise ValueError(f"vb_loss: mask_weight must be a pair (masked, unmasked), got {mask_weight!r}")
    if pt is not None and (not isinstance(pt, Tensor) or pt.shape != (B,)):
        raise ValueError(f"vb_loss: pt must be a tensor of shape ({B},), got "
                         f"{tuple(pt.shape) if isinstance(pt, Tensor) else type(pt).__name__}")
    T = sched.num_timesteps
    tt = sched.check_t(t, B, logits.device, "vb_loss")
    t0 = (tt == 0).view(B, 1)
    is_mask = x_t == K
    m = torch.where(is_mask, float(mask_weight[0]), float(mask_weight[1]))
    m = torch.where(t0, torch.ones_like(m), m).to(loss_vb.dtype)
    kl = loss_vb * m
    aux_scale = float(aux_weight) * ((1.0 + (1.0 - tt.to(loss_vb.dtype) / T)) if adaptive_aux
                                     else torch.ones(B, dtype=loss_vb.dtype, device=logits.device))
    per_sample_kl = kl.mean(1)
    per_sample = per_sample_kl + aux_scale * (loss_aux * m).mean(1)
    if pt is None:
        pt = torch.full((B,), 1.0 / T, dtype=loss_vb.dtype, device=logits.device)
    loss = (per_sample / pt.to(loss_vb.dtype)).mean() / T  # uniform pt gives the plain mean
    if return_per_sample:
        return loss, per_sample_kl.detach()
    return loss


class TimestepSampler:
    """VQ-Diffusion's importance sampler for t: uniform until every t has been seen more than
    10 times, then p(t) proportional to sqrt(E[L_t^2]) (with p(0) = p(1))."""

    def __init__(self, num_timesteps: int, device="cpu"):
        self.T = num_timesteps
        self.history = torch.zeros(num_timesteps, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_timesteps, dtype=torch.float64, device=device)

    def probs(self) -> Tensor:
        if not bool((self.count > 10).all()):
            return torch.full_like(self.history, 1.0 / self.T)
        w = torch.sqrt(self.history + 1e-10) + 1e-4
        w[0] = w[1]
        return w / w.sum()

    def sample(self, batch: int, generator: Optional[torch.Generator] = None):
        """(t, pt): (batch,) int64 timesteps and their probabilities."""
        p = self.probs()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, p.gather(0, t)

    def state_dict(self) -> dict:
        """Everything sample() depends on besides the caller's generator: the per-t loss
        history and counts (CPU copies), so a resumed run draws the same timesteps."""
        return {"num_timesteps": self.T, "history": self.history.detach().cpu().clone(),
                "count": self.count.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict()'s values in place (onto this sampler's device)."""
        op = f"{type(self).__name__}.load_state_dict"
        missing = {"num_timesteps", "history", "count"} - set(state)
        if missing:
            raise KeyError(f"{op}: state lacks {sorted(missing)}")
        if int(state["num_timesteps"]) != self.T:
            raise ValueError(f"{op}: state is for {state['num_timesteps']} timesteps, this sampler has {self.T}")
        for name in ("history", "count"):
            value = torch.as_tensor(state[name])
            if value.shape != (self.T,):
                raise ValueError(f"{op}: {name} must have shape ({self.T},), got {tuple(value.shape)}")
            getattr(self, name).copy_(value)

    def update(self, t: Tensor, per_sample_loss: Tensor) -> None:
        t = t.to(self.history.device)
        lt2 = per_sample_loss.detach().to(self.history).pow(2)
        new = 0.1 * lt2 + 0.9 * self.history.gather(0, t)
        self.history.scatter_(0, t, new)
        self.count.scatter_add_(0, t, torch.ones_like(lt2))
