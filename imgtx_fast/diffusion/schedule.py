"""The mask-and-replace noise schedule of VQ-Diffusion (diffusers' VQDiffusionScheduler defaults).

All schedule values are float64. `coefs(t)` gathers, per sample, the row the kernels read
(csrc/include/imgtx/diffusion.h, enum MrCoef): one-step (a, b, c) at t, cumulative (A, B, C) at
t and at t - 1, and a t == 0 flag. The gather happens on the data's device, so a per-sample `t`
on the GPU never costs a host sync.

`coefs(t, t_prev=...)` gives the rows of an exact skip step t -> t_prev instead (jump_rows):
the kernels only ever read "the forward transition from the previous state to x_t" and the
cumulative rows at both ends, so a jump is just another row.
"""
from typing import Dict, Union

import torch
from torch import Tensor

from .._frontend import schedule as _array_schedule
from .._frontend.common import int_scalar


class MaskAndReplaceSchedule(_array_schedule.MaskAndReplaceSchedule):
    """K real classes plus MASK (= K); T timesteps; cumulative alpha/gamma linear in t.

    Raises ValueError when the schedule is not a valid mask-and-replace process (every
    probability in [0, 1], and B_t > 0, b_t > 0 so that every posterior is well defined).
    The checks and the float64 arithmetic are the torch-free schedule's
    (imgtx_fast._frontend.schedule, which imgtx_fast.numpy exports); this class holds its
    table and A, B, C as CPU tensors and adds the per-device table and `coefs(t)`.
    """

    def __init__(self, num_classes: int, num_timesteps: int = 100, *,
                 alpha_cum_start: float = 0.99999, alpha_cum_end: float = 0.000009,
                 gamma_cum_start: float = 0.000009, gamma_cum_end: float = 0.99999):
        super().__init__(num_classes, num_timesteps, alpha_cum_start=alpha_cum_start,
                         alpha_cum_end=alpha_cum_end, gamma_cum_start=gamma_cum_start,
                         gamma_cum_end=gamma_cum_end)
        # Copies (the array table is read-only): writable float64 CPU tensors, bitwise the arrays.
        self.table = torch.tensor(self.table)
        self.A, self.B, self.C = (torch.tensor(x) for x in (self.A, self.B, self.C))
        self._on_device: Dict[torch.device, Tensor] = {}

    def table_on(self, device: torch.device) -> Tensor:
        device = torch.device(device)
        t = self._on_device.get(device)
        if t is None:
            t = self._on_device[device] = self.table.to(device)
        return t

    def check_t(self, t, batch: int, device, op: str, *, name: str = "t", low: int = 0) -> Tensor:
        """t (int, 0-d or (batch,) integer tensor) as a (batch,) int64 tensor on `device`, each
        value in [low, T) (low = -1 for a t_prev, where -1 means x0)."""
        T = self.num_timesteps
        if not isinstance(t, Tensor) and int_scalar(t) is not None:
            t = int_scalar(t)  # numpy integer scalars and 0-d arrays, as the numpy front end
        if isinstance(t, bool) or not isinstance(t, (int, Tensor)):
            raise TypeError(f"{op}: {name} must be an int or an integer tensor, got {type(t).__name__}")
        if isinstance(t, int):
            if not low <= t < T:
                raise ValueError(f"{op}: {name} must be in [{low}, {T}), got {t}")
            return torch.full((batch,), t, dtype=torch.int64, device=device)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
        if t.layout != torch.strided or t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: {name} must be a dense tensor on a cpu or cuda device, got "
                             f"{t.layout} on {t.device}")
        if t.dim() == 0:
            t = t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"{op}: {name} must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        t = t.to(device=device, dtype=torch.int64)
        # On a GPU this reads two numbers back (a small sync); under CUDA-graph capture it
        # cannot, and an out-of-range t is clamped by the gather instead of raising.
        capturing = _capturing(t)
        if t.numel() and not capturing:
            lo, hi = int(t.min()), int(t.max())
            if lo < low or hi >= T:
                raise ValueError(f"{op}: {name} must be in [{low}, {T}), got values in [{lo}, {hi}]")
        if capturing:
            t = t.clamp(low, T - 1)
        return t

    def check_t_prev(self, t_prev, t: Tensor, op: str) -> Tensor:
        """t_prev (int or tensor, -1 = x0) as a (batch,) int64 tensor, each below its t."""
        tp = self.check_t(t_prev, t.shape[0], t.device, op, name="t_prev", low=-1)
        if _capturing(tp):  # no host read under capture: an invalid pair is clamped instead
            return torch.minimum(tp, t - 1)
        if tp.numel() and bool((tp >= t).any()):
            raise ValueError(f"{op}: t_prev must be < t for every sample (a reverse step goes back "
                             f"in time), got t_prev = {tp.tolist()} for t = {t.tolist()}")
        return tp

    def coefs(self, t: Union[int, Tensor], batch: int, device, op: str = "MaskAndReplaceSchedule",
              t_prev: Union[None, int, Tensor] = None) -> Tensor:
        """(batch, MR_COEFS) float64 rows for the kernels: the reverse step t -> t - 1, or the
        exact jump t -> t_prev when t_prev is given (-1: straight to x0)."""
        tt = self.check_t(t, batch, device, op)
        if t_prev is None:
            return self.table_on(device).index_select(0, tt)
        return self.jump_rows(tt, self.check_t_prev(t_prev, tt, op))

    def jump_rows(self, t: Tensor, t_prev: Tensor) -> Tensor:
        """The kernels' rows for the jump t_prev -> t (t_prev < t, -1 = x0).

        One-step mask-and-replace matrices are closed under products: the forward transition
        from t_prev to t has the same form, with a = A_t / A_tp (the chance of never leaving
        the class), 1 - c = (1 - C_t) / (1 - C_tp) (the chance of never being masked) and
        b = (1 - a - c) / K, just as the one-step row is formed from the cumulative one. With
        t_prev = t - 1 these are the table's rows bit for bit. A jump to x0 (t_prev = -1) sets
        the t == 0 flag: the posterior is then p(x0 | x_t) itself."""
        table = self.table_on(t.device)
        # cumulative (A, B, C) at -1 .. T-1: row 0 is (1, 0, 0), the t = 0 row's "previous"
        cum = torch.cat([table[:1, 6:9], table[:, 3:6]])
        A, B, C = cum.index_select(0, t + 1).unbind(1)
        Ap, Bp, Cp = cum.index_select(0, t_prev + 1).unbind(1)
        a = A / Ap
        c = 1 - (1 - C) / (1 - Cp)
        b = (1 - a - c) / self.num_classes
        t0 = (t_prev < 0).to(torch.float64)
        return torch.stack([a, b, c, A, B, C, Ap, Bp, Cp, t0], dim=1)


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
