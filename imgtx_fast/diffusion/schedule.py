"""The mask-and-replace noise schedule of VQ-Diffusion (diffusers' VQDiffusionScheduler defaults).

All schedule values are float64. `coefs(t)` gathers, per sample, the row the kernels read
(csrc/include/imgtx/diffusion.h, enum MrCoef): one-step (a, b, c) at t, cumulative (A, B, C) at
t and at t - 1, and a t == 0 flag. The gather happens on the data's device, so a per-sample `t`
on the GPU never costs a host sync.
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

    def check_t(self, t, batch: int, device, op: str) -> Tensor:
        """t (int, 0-d or (batch,) integer tensor) as a (batch,) int64 tensor on `device`."""
        T = self.num_timesteps
        if not isinstance(t, Tensor) and int_scalar(t) is not None:
            t = int_scalar(t)  # numpy integer scalars and 0-d arrays, as the numpy front end
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
