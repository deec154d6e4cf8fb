"""q_sample, posterior_sample and posterior_log_probs: checks, then one fused kernel call.

log_p_x0 is (B, K, N) as in diffusers (class axis 1) in any memory layout: permuted views of a
(B, N, K) buffer are read without a copy. It need not be normalised: the posterior is
invariant to a per-token shift of the log-probabilities, so raw logits give the same result
(`logits=True` is accepted for clarity and costs nothing).
"""
from typing import Optional

import torch
from torch import Tensor

from .._backend import get_backend
from .._frontend.diffusion import check_truncation_and_guidance
from ..ops import diffusion as _ops
from ..ops._launch import eager_fast_path
from ..reference import diffusion as _reference
from .schedule import MaskAndReplaceSchedule


def philox_seed(generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """A (1,) int64 Philox key on `device`, drawn from `generator` (torch's default generator of
    the device when None), so torch.manual_seed / a seeded generator reproduce every sample."""
    gdev = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=gdev, dtype=torch.int64)
    return seed.to(device, non_blocking=True)


def check_generator(generator, op: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_schedule(sched, op):
    if not isinstance(sched, MaskAndReplaceSchedule):
        raise TypeError(f"{op}: sched must be a MaskAndReplaceSchedule, got {type(sched).__name__}")


def check_logp(t, name: str, sched: MaskAndReplaceSchedule, op: str) -> None:
    _ops.check_logits(t, name, op, num_classes=sched.num_classes)  # the raw ops' check too


def check_index(x, name: str, shape, device, op: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{op}: {name} must be an integer tensor, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {x.layout}")
    if x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device} but the logits are on {device}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} must be on a cpu or cuda device, got {x.device}")
    return x if x.dtype == torch.int64 else x.long()


def step_coefs(sched: MaskAndReplaceSchedule, t, t_prev, batch: int, device, op: str) -> Tensor:
    """The kernels' rows for the reverse step t -> t_prev (None: t - 1). The reference backend
    composes a jump from the one-step rows itself (reference.jump_coefs), independently of the
    schedule's closed form."""
    if t_prev is None or get_backend() != "reference":
        return sched.coefs(t, batch, device, op, t_prev=t_prev)
    tt = sched.check_t(t, batch, device, op)
    return _reference.jump_coefs(sched.table, sched.num_classes, tt, sched.check_t_prev(t_prev, tt, op))


def _check_sampling_args(log_p_x0, x_t, t, t_prev, sched, truncation_rate, guidance_scale,
                         log_p_x0_uncond, op):
    _check_schedule(sched, op)
    check_logp(log_p_x0, "log_p_x0", sched, op)
    B, K, N = log_p_x0.shape
    x_t = check_index(x_t, "x_t", (B, N), log_p_x0.device, op)
    check_truncation_and_guidance(truncation_rate, guidance_scale, log_p_x0_uncond, op)
    if log_p_x0_uncond is not None:
        check_logp(log_p_x0_uncond, "log_p_x0_uncond", sched, op)
        if log_p_x0_uncond.shape != log_p_x0.shape or log_p_x0_uncond.device != log_p_x0.device:
            raise ValueError(f"{op}: log_p_x0_uncond must match log_p_x0's shape and device, got "
                             f"{tuple(log_p_x0_uncond.shape)} on {log_p_x0_uncond.device}")
    coefs = step_coefs(sched, t, t_prev, B, log_p_x0.device, op)
    return x_t, coefs


def posterior_sample(log_p_x0: Tensor, x_t: Tensor, t, sched: MaskAndReplaceSchedule,
                     generator: Optional[torch.Generator] = None, *,
                     truncation_rate: Optional[float] = None, guidance_scale: Optional[float] = None,
                     log_p_x0_uncond: Optional[Tensor] = None, logits: bool = False,
                     t_prev=None) -> Tensor:
    """x_{t-1} ~ p(x_{t-1} | x_t) for every token: (B, N) int64 in [0, K] (K = MASK).

    Fuses classifier-free guidance (l_u + s (l_c - l_u)), top-r truncation and the reverse
    step into one pass per token. At t = 0 it samples p(x0 | x_t) (never MASK).
    t_prev (int or (B,) tensor, each in [-1, t)): sample x_{t_prev} ~ p(x_{t_prev} | x_t)
    exactly instead, for skip-step sampling (-1: x0); None is t - 1.
    truncation_rate: top-r in [0, 1] (see imgtx_fast.diffusion's docs); 0 keeps only the
    most likely class (the lowest index among exact ties, as diffusers' truncate).
    """
    op = "posterior_sample"
    x_t, coefs = _check_sampling_args(log_p_x0, x_t, t, t_prev, sched, truncation_rate,
                                      guidance_scale, log_p_x0_uncond, op)
    check_generator(generator, op)
    r = 1.0 if truncation_rate is None else float(truncation_rate)
    if get_backend() == "reference":
        return _reference.posterior_sample(log_p_x0, x_t, coefs, generator=generator,
                                           log_p_uncond=log_p_x0_uncond,
                                           guidance_scale=guidance_scale, truncation_rate=r)
    seed = philox_seed(generator, log_p_x0.device)
    s = 1.0 if guidance_scale is None else float(guidance_scale)
    fast = eager_fast_path(log_p_x0, log_p_x0_uncond, x_t, coefs, seed)
    run = _ops.posterior_sample_impl if fast else torch.ops.imgtx.mr_posterior_sample
    return run(log_p_x0, log_p_x0_uncond, x_t, coefs, seed, s, r)


def posterior_log_probs(log_p_x0: Tensor, x_t: Tensor, t, sched: MaskAndReplaceSchedule, *,
                        truncation_rate: Optional[float] = None,
                        guidance_scale: Optional[float] = None,
                        log_p_x0_uncond: Optional[Tensor] = None, logits: bool = False,
                        t_prev=None) -> Tensor:
    """log p(x_{t-1} | x_t), normalised over the K+1 classes: (B, K+1, N) float32 (laid out
    class-contiguous when log_p_x0 is). Impossible classes are -inf. t_prev and
    truncation_rate as in posterior_sample (t_prev given: log p(x_{t_prev} | x_t))."""
    op = "posterior_log_probs"
    x_t, coefs = _check_sampling_args(log_p_x0, x_t, t, t_prev, sched, truncation_rate,
                                      guidance_scale, log_p_x0_uncond, op)
    r = 1.0 if truncation_rate is None else float(truncation_rate)
    if get_backend() == "reference":
        return _reference.posterior_log_probs(log_p_x0, x_t, coefs, log_p_uncond=log_p_x0_uncond,
                                              guidance_scale=guidance_scale,
                                              truncation_rate=r).float()
    s = 1.0 if guidance_scale is None else float(guidance_scale)
    fast = eager_fast_path(log_p_x0, log_p_x0_uncond, x_t, coefs)
    run = _ops.posterior_log_probs_impl if fast else torch.ops.imgtx.mr_posterior_log_probs
    return run(log_p_x0, log_p_x0_uncond, x_t, coefs, s, r)


def q_sample(x0: Tensor, t, sched: MaskAndReplaceSchedule,
             generator: Optional[torch.Generator] = None) -> Tensor:
    """x_t ~ q(x_t | x0): MASK w.p. C_t, x0 w.p. A_t + B_t, each other class w.p. B_t."""
    op = "q_sample"
    _check_schedule(sched, op)
    if not isinstance(x0, Tensor):
        raise TypeError(f"{op}: x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() != 2:
        raise ValueError(f"{op}: x0 must have shape (B, N), got {tuple(x0.shape)}")
    x0 = check_index(x0, "x0", x0.shape, x0.device, op)
    coefs = sched.coefs(t, x0.shape[0], x0.device, op)
    check_generator(generator, op)
    if get_backend() == "reference":
        if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= sched.num_classes):
            raise ValueError(f"{op}: x0 has values outside [0, {sched.num_classes})")
        return _reference.q_sample(x0, coefs, sched.num_classes, generator=generator)
    seed = philox_seed(generator, x0.device)
    run = _ops.q_sample_impl if eager_fast_path(x0, coefs, seed) else torch.ops.imgtx.mr_q_sample
    return run(x0, coefs, seed, sched.num_classes)
