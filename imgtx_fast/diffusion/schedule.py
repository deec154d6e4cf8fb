"""The mask-and-replace noise schedule of VQ-Diffusion (diffusers' VQDiffusionScheduler defaults).

All schedule values are float64. `coefs(t)` gathers, per sample, the row the kernels read
(csrc/include/imgtx/diffusion.h, enum MrCoef): one-step (a, b, c) at t, cumulative (A, B, C) at
t and at t - 1, and a t == 0 flag. The gather happens on the data's device, so a per-sample `t`
on the GPU never costs a host sync.
"""
from typing import Dict, Union

import torch
from torch import Tensor

from .. import _C

_NAMES = ("alpha_cum_start", "alpha_cum_end", "gamma_cum_start", "gamma_cum_end")


class MaskAndReplaceSchedule:
    """K real classes plus MASK (= K); T timesteps; cumulative alpha/gamma linear in t.

    Raises ValueError when the schedule is not a valid mask-and-replace process (every
    probability in [0, 1], and B_t > 0, b_t > 0 so that every posterior is well defined).
    """

    def __init__(self, num_classes: int, num_timesteps: int = 100, *,
                 alpha_cum_start: float = 0.99999, alpha_cum_end: float = 0.000009,
                 gamma_cum_start: float = 0.000009, gamma_cum_end: float = 0.99999):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"MaskAndReplaceSchedule: num_classes must be an int >= 1, got {num_classes!r}")
        if num_classes > 2**30:
            raise ValueError(f"MaskAndReplaceSchedule: num_classes must be <= 2^30, got {num_classes}")
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"MaskAndReplaceSchedule: num_timesteps must be an int >= 2, got {num_timesteps!r}")
        values = (alpha_cum_start, alpha_cum_end, gamma_cum_start, gamma_cum_end)
        for name, v in zip(_NAMES, values):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"MaskAndReplaceSchedule: {name} must be in [0, 1], got {v}")
        self.num_classes = K = num_classes
        self.num_timesteps = T = num_timesteps
        self.config = dict(zip(_NAMES, map(float, values)))
        frac = torch.arange(T, dtype=torch.float64) / (T - 1)
        A = alpha_cum_start + frac * (alpha_cum_end - alpha_cum_start)
        C = gamma_cum_start + frac * (gamma_cum_end - gamma_cum_start)
        A_prev = torch.cat([torch.ones(1, dtype=torch.float64), A[:-1]])
        C_prev = torch.cat([torch.zeros(1, dtype=torch.float64), C[:-1]])
        B, B_prev = (1 - A - C) / K, (1 - A_prev - C_prev) / K
        if not bool((A > 0).all()):
            raise ValueError("MaskAndReplaceSchedule: alpha_cum_start/alpha_cum_end must be > 0")
        if not bool((C < 1).all()):
            raise ValueError("MaskAndReplaceSchedule: gamma_cum_start/gamma_cum_end must be < 1")
        if not bool((B > 0).all()):
            raise ValueError("MaskAndReplaceSchedule: alpha_cum + gamma_cum must stay < 1 at every t "
                             "(B_t = (1 - A_t - C_t) / K must be > 0)")
        a = A / A_prev
        c = 1 - (1 - C) / (1 - C_prev)
        b = (1 - a - c) / K
        if not bool(((a > 0) & (a <= 1) & (c >= 0) & (c < 1) & (b > 0)).all()):
            raise ValueError("MaskAndReplaceSchedule: the one-step transitions are not probabilities "
                             "(alpha_cum must decrease and gamma_cum increase over t)")
        # Columns in the order of enum MrCoef (csrc/include/imgtx/diffusion.h).
        t0 = torch.zeros(T, dtype=torch.float64)
        t0[0] = 1.0
        self.table = torch.stack([a, b, c, A, B, C, A_prev, B_prev, C_prev, t0], dim=1).contiguous()
        assert self.table.shape[1] == _C.MR_COEFS
        self.A, self.B, self.C = A, B, C
        self._on_device: Dict[torch.device, Tensor] = {}

    @classmethod
    def from_diffusers(cls, scheduler) -> "MaskAndReplaceSchedule":
        """The schedule of a diffusers VQDiffusionScheduler (its config)."""
        cfg = scheduler.config
        return cls(cfg.num_vec_classes - 1, cfg.num_train_timesteps,
                   **{name: cfg[name] for name in _NAMES})

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"MaskAndReplaceSchedule(num_classes={self.num_classes}, num_timesteps={self.num_timesteps}, {args})"

    def table_on(self, device: torch.device) -> Tensor:
        device = torch.device(device)
        t = self._on_device.get(device)
        if t is None:
            t = self._on_device[device] = self.table.to(device)
        return t

    def check_t(self, t, batch: int, device, op: str) -> Tensor:
        """t (int, 0-d or (batch,) integer tensor) as a (batch,) int64 tensor on `device`."""
        T = self.num_timesteps
        if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
            raise TypeError(f"{op}: t must be an int or an integer tensor, got {type(t).__name__}")
        if isinstance(t, int):
            if not 0 <= t < T:
                raise ValueError(f"{op}: t must be in [0, {T}), got {t}")
            return torch.full((batch,), t, dtype=torch.int64, device=device)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{op}: t must be an integer tensor, got {t.dtype}")
        if t.layout != torch.strided or t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: t must be a dense tensor on a cpu or cuda device, got "
                             f"{t.layout} on {t.device}")
        if t.dim() == 0:
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"{op}: t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        t = t.to(device=device, dtype=torch.int64)
        # On a GPU this reads two numbers back (a small sync); under CUDA-graph capture it
        # cannot, and an out-of-range t is clamped by the gather instead of raising.
        capturing = t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if t.numel() and not capturing:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= T:
                raise ValueError(f"{op}: t must be in [0, {T}), got values in [{lo}, {hi}]")
        if capturing:
            t = t.clamp(0, T - 1)
        return t

    def coefs(self, t: Union[int, Tensor], batch: int, device, op: str = "MaskAndReplaceSchedule") -> Tensor:
        """(batch, MR_COEFS) float64 rows for the kernels."""
        return self.table_on(device).index_select(0, self.check_t(t, batch, device, op))
