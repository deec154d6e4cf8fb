"""The mask-and-replace schedule table in NumPy, for the framework-free front ends.

The one copy of the schedule's checks, messages and arithmetic: the torch class,
imgtx_fast.diffusion.MaskAndReplaceSchedule, subclasses this one and only turns the arrays into
tensors (tests/test_numpy_frontend.py asserts the two tables are bitwise equal).
"""
import numpy as np

from .. import _C
from .common import int_scalar

_NAMES = ("alpha_cum_start", "alpha_cum_end", "gamma_cum_start", "gamma_cum_end")
_OWNER = "MaskAndReplaceSchedule"


class MaskAndReplaceSchedule:
    """K real classes plus MASK (= K); T timesteps; cumulative alpha/gamma linear in t.

    `table` is the (T, MR_COEFS) float64 array the kernels read, one row per t (columns in the
    order of enum MrCoef, csrc/include/imgtx/diffusion.h). The front ends also accept the torch
    schedule (anything with num_classes, num_timesteps and a table numpy can read).
    """

    def __init__(self, num_classes: int, num_timesteps: int = 100, *,
                 alpha_cum_start: float = 0.99999, alpha_cum_end: float = 0.000009,
                 gamma_cum_start: float = 0.000009, gamma_cum_end: float = 0.99999):
        K, T = int_scalar(num_classes), int_scalar(num_timesteps)  # numpy integers too
        if K is None or K < 1:
            raise ValueError(f"{_OWNER}: num_classes must be an int >= 1, got {num_classes!r}")
        if K > 2**30:
            raise ValueError(f"{_OWNER}: num_classes must be <= 2^30, got {num_classes}")
        if T is None or T < 2:
            raise ValueError(f"{_OWNER}: num_timesteps must be an int >= 2, got {num_timesteps!r}")
        values = (alpha_cum_start, alpha_cum_end, gamma_cum_start, gamma_cum_end)
        for name, v in zip(_NAMES, values):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{_OWNER}: {name} must be in [0, 1], got {v}")
        self.num_classes, self.num_timesteps = K, T
        self.config = dict(zip(_NAMES, map(float, values)))
        frac = np.arange(T, dtype=np.float64) / (T - 1)
        A = alpha_cum_start + frac * (alpha_cum_end - alpha_cum_start)
        C = gamma_cum_start + frac * (gamma_cum_end - gamma_cum_start)
        A_prev = np.concatenate([np.ones(1), A[:-1]])
        C_prev = np.concatenate([np.zeros(1), C[:-1]])
        B, B_prev = (1 - A - C) / K, (1 - A_prev - C_prev) / K
        if not (A > 0).all():
            raise ValueError(f"{_OWNER}: alpha_cum_start/alpha_cum_end must be > 0")
        if not (C < 1).all():
            raise ValueError(f"{_OWNER}: gamma_cum_start/gamma_cum_end must be < 1")
        if not (B > 0).all():
            raise ValueError(f"{_OWNER}: alpha_cum + gamma_cum must stay < 1 at every t "
                             "(B_t = (1 - A_t - C_t) / K must be > 0)")
        a = A / A_prev
        c = 1 - (1 - C) / (1 - C_prev)
        b = (1 - a - c) / K
        if not ((a > 0) & (a <= 1) & (c >= 0) & (c < 1) & (b > 0)).all():
            raise ValueError(f"{_OWNER}: the one-step transitions are not probabilities "
                             "(alpha_cum must decrease and gamma_cum increase over t)")
        t0 = np.zeros(T)
        t0[0] = 1.0
        self.table = np.ascontiguousarray(np.stack([a, b, c, A, B, C, A_prev, B_prev, C_prev, t0], axis=1))
        assert self.table.shape[1] == _C.MR_COEFS
        self.table.flags.writeable = False  # shared by every call (and uploaded once per GPU)
        self.A, self.B, self.C = A, B, C

    @classmethod
    def from_diffusers(cls, scheduler) -> "MaskAndReplaceSchedule":
        """The schedule of a diffusers VQDiffusionScheduler (its config)."""
        cfg = scheduler.config
        return cls(cfg.num_vec_classes - 1, cfg.num_train_timesteps,
                   **{name: cfg[name] for name in _NAMES})

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{_OWNER}(num_classes={self.num_classes}, num_timesteps={self.num_timesteps}, {args})"
