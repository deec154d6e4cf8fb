"""posterior_sample, posterior_log_probs and q_sample for the framework-free front ends: the
checks of diffusion/sampling.py and diffusion/schedule.py and the kernel calls of
ops/diffusion.py, on arrays."""
from .arrays import float_code, is_integer
from .common import check_real, int_scalar, philox_key, strided
from .schedule import MaskAndReplaceSchedule

_BAD_LOGITS, _BAD_INDEX = 1, 2  # the kernels' status bits


def raise_status(status: int, op: str, logits_name: str, index_msg: str) -> None:
    """Raises for the status word of a diffusion kernel (the CPU return value or the CUDA
    status buffer): bad logits first, then out-of-range indices."""
    if status & _BAD_LOGITS:
        raise ValueError(f"{op}: {logits_name} has a token whose values hold NaN or +inf, or are all -inf")
    if status & _BAD_INDEX:
        raise ValueError(f"{op}: {index_msg}")


def _check_schedule(sched, op):
    # The torch MaskAndReplaceSchedule (a subclass of this one) is accepted as well: its table
    # is a CPU tensor, which numpy reads through __array__ without this module importing torch.
    if not (isinstance(sched, MaskAndReplaceSchedule)
            or (type(sched).__name__ == "MaskAndReplaceSchedule"
                and all(hasattr(sched, a) for a in ("num_classes", "num_timesteps", "table")))):
        raise TypeError(f"{op}: sched must be a MaskAndReplaceSchedule, got {type(sched).__name__}")


def check_truncation_and_guidance(truncation_rate, guidance_scale, log_p_x0_uncond, op: str) -> None:
    """The posterior ops' truncation_rate and guidance arguments (diffusion/sampling.py too)."""
    check_real(guidance_scale, "guidance_scale", op, optional=True)
    if truncation_rate is not None:
        r = check_real(truncation_rate, "truncation_rate", op)
        if not 0.0 <= r <= 1.0:  # 0 keeps only the most likely class, as diffusers' truncate
            raise ValueError(f"{op}: truncation_rate must be in [0, 1], got {truncation_rate}")
    if (guidance_scale is None) != (log_p_x0_uncond is None):
        raise ValueError(f"{op}: guidance_scale and log_p_x0_uncond must be given together")


def _check_logp(rt, t, name, sched, op):
    t = rt.array(t, name, op)
    float_code(t, name, op)
    if t.ndim != 3:
        raise ValueError(f"{op}: {name} must have shape (B, K, N), got {tuple(t.shape)}")
    if t.shape[1] != sched.num_classes:
        raise ValueError(f"{op}: {name} has K = {t.shape[1]} classes (dim 1) but the schedule has "
                         f"num_classes = {sched.num_classes}")
    return t


def _check_index(rt, x, name, shape, device, op):
    x = rt.array(x, name, op)
    if not is_integer(x):
        raise TypeError(f"{op}: {name} must be an integer array, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if rt.device(x) != device:
        raise ValueError(f"{op}: {name} is on {rt.device(x)} but the logits are on {device}")
    return x if x.dtype == rt.xp.int64 else x.astype(rt.xp.int64)


def _coefs(rt, sched, t, batch, device, op):
    """(batch, MR_COEFS) float64 rows of the schedule table for t (MaskAndReplaceSchedule.check_t
    and .coefs): t is an int, or a 0-d or (batch,) integer array on the data's device."""
    T = sched.num_timesteps
    xp = rt.xp
    with rt.on_device(device):
        table = rt.table(sched)
        if int_scalar(t) is not None:  # an int, a numpy integer or a 0-d integer array
            t = int_scalar(t)
            if not 0 <= t < T:
                raise ValueError(f"{op}: t must be in [0, {T}), got {t}")
            return xp.ascontiguousarray(xp.broadcast_to(table[t], (batch, table.shape[1])))
        if isinstance(t, bool) or not rt.is_array(t):
            raise TypeError(f"{op}: t must be an int or an integer array, got {type(t).__name__}")
        t = rt.array(t, "t", op)
        if not is_integer(t):
            raise TypeError(f"{op}: t must be an integer array, got {t.dtype}")
        if t.ndim == 0:
            t = xp.broadcast_to(t.reshape(1), (batch,))
        if tuple(t.shape) != (batch,):
            raise ValueError(f"{op}: t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if rt.device(t) != device:
            raise ValueError(f"{op}: t is on {rt.device(t)} but the data are on {device}")
        # On a GPU this reads two numbers back (a small sync), as the torch schedule does.
        if t.size:
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= T:
                raise ValueError(f"{op}: t must be in [0, {T}), got values in [{lo}, {hi}]")
        return xp.ascontiguousarray(table[t.astype(xp.int64)])


def _logits_arg(rt, a, name, op):
    a, st = strided(rt, a)
    return a, (rt.ptr(a), float_code(a, name, op), st[0], st[1], st[2])


def _index_arg(rt, x):
    x, st = strided(rt, x)
    return x, (rt.ptr(x), st[0], st[1])


def _log_probs_layout(rt, logp):
    """(B, K+1, N) float32, class-contiguous when logp is (ops/diffusion.log_probs_layout)."""
    B, K, N = logp.shape
    xp = rt.xp
    if logp.strides[1] == logp.itemsize and N > 1:
        return xp.empty((B, N, K + 1), dtype=xp.float32).transpose(0, 2, 1)
    return xp.empty((B, K + 1, N), dtype=xp.float32)


def posterior(rt, log_p_x0, x_t, t, sched, generator, truncation_rate, guidance_scale,
              log_p_x0_uncond, sample: bool):
    """posterior_sample (sample=True) or posterior_log_probs."""
    op = "posterior_sample" if sample else "posterior_log_probs"
    _check_schedule(sched, op)
    logp = _check_logp(rt, log_p_x0, "log_p_x0", sched, op)
    B, K, N = logp.shape
    device = rt.device(logp)
    x_t = _check_index(rt, x_t, "x_t", (B, N), device, op)
    check_truncation_and_guidance(truncation_rate, guidance_scale, log_p_x0_uncond, op)
    uncond = None
    if log_p_x0_uncond is not None:
        uncond = _check_logp(rt, log_p_x0_uncond, "log_p_x0_uncond", sched, op)
        if uncond.shape != logp.shape or rt.device(uncond) != device:
            raise ValueError(f"{op}: log_p_x0_uncond must match log_p_x0's shape and device, got "
                             f"{tuple(uncond.shape)} on {rt.device(uncond)}")
    coefs = _coefs(rt, sched, t, B, device, op)
    r = 1.0 if truncation_rate is None else float(truncation_rate)
    s = 1.0 if guidance_scale is None else float(guidance_scale)
    xp = rt.xp
    with rt.on_device(device):
        # Drawn after the checks and before the empty-batch return, as the torch API does, so
        # both consume a generator alike.
        seed = rt.seed(philox_key(generator, op)) if sample else None
        if sample:
            x_prev = xp.empty((B, N), dtype=xp.int64)
            out, out_arg = x_prev, (0, 0, 0, 0)
        else:
            out = _log_probs_layout(rt, logp)
            ost = tuple(st // out.itemsize for st in out.strides)
            out_arg = (rt.ptr(out),) + ost
        if B * N == 0:
            return out
        name = "log_p_x0" if uncond is None else "the guided log-probs (log_p_x0 with log_p_x0_uncond)"
        logp, logp_arg = _logits_arg(rt, logp, "log_p_x0", op)
        if uncond is not None:
            uncond, uncond_arg = _logits_arg(rt, uncond, "log_p_x0_uncond", op)
        else:
            uncond_arg = (0, 0, 0, 0, 0)
        x_t, x_t_arg = _index_arg(rt, x_t)
        args = (B, K, N, logp_arg, uncond_arg, s, r, x_t_arg, rt.ptr(coefs),
                rt.ptr(out) if sample else 0, out_arg, rt.ptr(seed) if sample else 0)
        raise_status(rt.mr_posterior(args), op, name, f"x_t has values outside [0, {K}]")
    return out


def q_sample(rt, x0, t, sched, generator):
    op = "q_sample"
    _check_schedule(sched, op)
    x0 = rt.array(x0, "x0", op)
    if x0.ndim != 2:
        raise ValueError(f"{op}: x0 must have shape (B, N), got {tuple(x0.shape)}")
    device = rt.device(x0)
    x0 = _check_index(rt, x0, "x0", x0.shape, device, op)
    K = sched.num_classes
    B, N = x0.shape
    coefs = _coefs(rt, sched, t, B, device, op)
    xp = rt.xp
    with rt.on_device(device):
        seed = rt.seed(philox_key(generator, op))
        x_t = xp.empty((B, N), dtype=xp.int64)
        if B * N == 0:
            return x_t
        x0, x0_arg = _index_arg(rt, x0)
        args = (B, K, N, x0_arg, rt.ptr(coefs), rt.ptr(seed), rt.ptr(x_t))
        raise_status(rt.mr_q_sample(args), op, "", f"x0 has values outside [0, {K})")
    return x_t

