"""torch.library definitions of the mask-and-replace diffusion kernels (namespace `imgtx`).

Ops (all per token, one pass over the logits, no (B, K+1, N) temporaries):
  mr_posterior_sample      x_{t-1} ~ p(x_{t-1} | x_t), guidance + top-r truncation fused
  mr_posterior_log_probs   the normalised log p(x_{t-1} | x_t), (B, K+1, N)
  mr_q_sample              x_t ~ q(x_t | x0)
  mr_vb_terms              per-token KL / NLL and cross-entropy of VQ-Diffusion's loss, with a
                           fused backward (mr_vb_terms_backward)
Schedule values arrive as the (B, MR_COEFS) float64 table of MaskAndReplaceSchedule.coefs.
Random ops take a (1,) int64 Philox seed tensor on the data's device (drawn from the caller's
torch.Generator by the public API), so they are deterministic and graph-capturable.
Semantics: csrc/include/imgtx/diffusion.h and docs/specs/mask_and_replace.md.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from .._dtypes import float_code
from .._frontend.diffusion import raise_status as _raise_status
from ._launch import cuda_module, cuda_stream, device_guard, num_threads


# The kernels' class limit (csrc/diffusion: num_classes <= 2^30), which the schedule keeps too.
_MAX_CLASSES = 2**30


def _check_strided(t, name: str, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # sparse tensors have no strided data pointer
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {t.layout}")


def check_logits(t, name: str, op: str, kernel_device: bool = True, num_classes=None) -> None:
    """(B, K, N) logits in a kernel float dtype, any strides (the kernels take all three): the
    raw ops' check, and the public functions' (diffusion/sampling.py), which pass the schedule's
    num_classes for K. kernel_device=False (the fake impls) lets meta tensors through."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    float_code(t, name, op)
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must have shape (B, K, N), got {tuple(t.shape)}")
    if num_classes is not None and t.shape[1] != num_classes:
        raise ValueError(f"{op}: {name} has K = {t.shape[1]} classes (dim 1) but the schedule has "
                         f"num_classes = {num_classes}")
    if not 1 <= t.shape[1] <= _MAX_CLASSES:
        raise ValueError(f"{op}: {name} must have K in [1, 2^30] classes (dim 1), got {t.shape[1]}")
    _check_strided(t, name, op)
    if kernel_device and t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: {name} must be on a cpu or cuda device, got {t.device}")


def _check_exact(t, name: str, shape, dtypes, op: str, ref, contiguous: bool = False,
                 sized_by_ref: bool = True) -> None:
    """A tensor whose dtype, shape and device the op fixes: the int64 indices (read through two
    strides), the coefs table and saved terms (read as contiguous rows), the seed, the grads.
    ref = (name, tensor) of the argument whose device (and, if sized_by_ref, B and N) it shares."""
    _check_strided(t, name, op)
    if t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        source = f" (from {ref[0]} {tuple(ref[1].shape)})" if sized_by_ref else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}{source}, got {tuple(t.shape)}")
    if t.device != ref[1].device:
        raise ValueError(f"{op}: {name} is on {t.device}, {ref[0]} on {ref[1].device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (the kernels read it row by row), "
                         f"got stride {t.stride()}")


_INDEX, _TABLE = (torch.int64,), (torch.float64,)
_GRAD = (torch.float32, torch.float64, torch.float16, torch.bfloat16)  # converted to float32


def _check_indices_and_coefs(op, ref, B, N, coefs, **indices) -> None:
    for name, x in indices.items():
        _check_exact(x, name, (B, N), _INDEX, op, ref)
    _check_exact(coefs, "coefs", (B, _C.MR_COEFS), _TABLE, op, ref, contiguous=True)


def _check_posterior(op, logp, logp_uncond, x_t, coefs, seed, kernel_device=True) -> None:
    """The raw posterior ops' arguments (the public functions build them so); seed None for
    mr_posterior_log_probs."""
    check_logits(logp, "logp", op, kernel_device)
    B, K, N = logp.shape
    if logp_uncond is not None:  # its own float dtype may differ from logp's
        check_logits(logp_uncond, "logp_uncond", op, kernel_device)
        if logp_uncond.shape != logp.shape or logp_uncond.device != logp.device:
            raise ValueError(f"{op}: logp_uncond must match logp's shape {tuple(logp.shape)} and "
                             f"device {logp.device}, got {tuple(logp_uncond.shape)} on {logp_uncond.device}")
    _check_indices_and_coefs(op, ("logp", logp), B, N, coefs, x_t=x_t)
    if seed is not None:
        _check_exact(seed, "seed", (1,), _INDEX, op, ("logp", logp), sized_by_ref=False)


def _check_q_sample(x0, coefs, seed, num_classes, kernel_device=True) -> None:
    op = "mr_q_sample"
    _check_strided(x0, "x0", op)
    if x0.dim() != 2:
        raise ValueError(f"{op}: x0 must have shape (B, N), got {tuple(x0.shape)}")
    if kernel_device and x0.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: x0 must be on a cpu or cuda device, got {x0.device}")
    _check_indices_and_coefs(op, ("x0", x0), *x0.shape, coefs, x0=x0)
    _check_exact(seed, "seed", (1,), _INDEX, op, ("x0", x0), sized_by_ref=False)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"{op}: num_classes must be an int, got {type(num_classes).__name__}")
    if not 1 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"{op}: num_classes must be in [1, 2^30], got {num_classes}")


def _check_vb(op, logits, x0, x_t, coefs, kernel_device=True) -> None:
    check_logits(logits, "logits", op, kernel_device)
    B, _, N = logits.shape
    _check_indices_and_coefs(op, ("logits", logits), B, N, coefs, x0=x0, x_t=x_t)


def _check_vb_backward(grad_vb, grad_aux, logits, x0, x_t, coefs, saved, kernel_device=True) -> None:
    op = "mr_vb_terms_backward"
    _check_vb(op, logits, x0, x_t, coefs, kernel_device)
    B, _, N = logits.shape
    for name, g in (("grad_vb", grad_vb), ("grad_aux", grad_aux)):
        _check_exact(g, name, (B, N), _GRAD, op, ("logits", logits))
    _check_exact(saved, "saved", (B, N, _C.MR_VB_SAVED), _TABLE, op, ("logits", logits),
                 contiguous=True)


def _logits_arg(t: Tensor, name: str, op: str):
    return (t.data_ptr(), float_code(t, name, op), t.stride(0), t.stride(1), t.stride(2))


def _index_arg(t: Tensor):
    return (t.data_ptr(), t.stride(0), t.stride(1))


def _cuda_status(device) -> Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _check_cuda_status(status: Tensor, op: str, logits_name: str, index_msg: str) -> None:
    """Reads the kernels' status word (one small sync) and raises like the CPU path. While a
    CUDA graph is being captured it cannot be read: bad tokens then come back as -1 / NaN."""
    if status.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    _raise_status(int(status.item()), op, logits_name, index_msg)


def log_probs_layout(logp: Tensor) -> Tensor:
    """An empty (B, K+1, N) float32 output laid out like logp: class-contiguous when logp is."""
    B, K, N = logp.shape
    if logp.stride(1) == 1 and N > 1:
        return logp.new_empty((B, N, K + 1), dtype=torch.float32).permute(0, 2, 1)
    return logp.new_empty((B, K + 1, N), dtype=torch.float32)


def _posterior(logp, logp_uncond, x_t, coefs, seed, guidance_scale, truncation_rate, sample, op):
    B, K, N = logp.shape
    if sample:
        x_prev, out = torch.empty((B, N), dtype=torch.int64, device=logp.device), None
        out_arg = (0, 0, 0, 0)
    else:
        x_prev, out = None, log_probs_layout(logp)
        out_arg = (out.data_ptr(), out.stride(0), out.stride(1), out.stride(2))
    if B * N == 0:
        return x_prev if sample else out
    name = "log_p_x0" if logp_uncond is None else "the guided log-probs (log_p_x0 with log_p_x0_uncond)"
    uncond = _logits_arg(logp_uncond, "log_p_x0_uncond", op) if logp_uncond is not None else (0, 0, 0, 0, 0)
    args = (B, K, N, _logits_arg(logp, "log_p_x0", op), uncond, float(guidance_scale),
            float(truncation_rate), _index_arg(x_t), coefs.data_ptr(),
            x_prev.data_ptr() if sample else 0, out_arg, seed.data_ptr() if sample else 0)
    cuda = cuda_module(logp)
    if cuda is not None:
        with device_guard(logp):
            status = _cuda_status(logp.device)
            cuda.mr_posterior_cuda(*args, status.data_ptr(), cuda_stream(logp))
        _check_cuda_status(status, op, name, f"x_t has values outside [0, {K}]")
    else:
        _raise_status(_C.mr_posterior_cpu(*args, num_threads()), op, name,
                      f"x_t has values outside [0, {K}]")
    return x_prev if sample else out


@torch.library.custom_op("imgtx::mr_posterior_sample", mutates_args=())
def mr_posterior_sample(logp: Tensor, logp_uncond: Optional[Tensor], x_t: Tensor, coefs: Tensor,
                        seed: Tensor, guidance_scale: float, truncation_rate: float) -> Tensor:
    _check_posterior("mr_posterior_sample", logp, logp_uncond, x_t, coefs, seed)
    return posterior_sample_impl(logp, logp_uncond, x_t, coefs, seed, guidance_scale, truncation_rate)


@mr_posterior_sample.register_fake
def _(logp, logp_uncond, x_t, coefs, seed, guidance_scale, truncation_rate):
    _check_posterior("mr_posterior_sample", logp, logp_uncond, x_t, coefs, seed, kernel_device=False)
    return logp.new_empty((logp.shape[0], logp.shape[2]), dtype=torch.int64)


@torch.library.custom_op("imgtx::mr_posterior_log_probs", mutates_args=())
def mr_posterior_log_probs(logp: Tensor, logp_uncond: Optional[Tensor], x_t: Tensor,
                           coefs: Tensor, guidance_scale: float, truncation_rate: float) -> Tensor:
    _check_posterior("mr_posterior_log_probs", logp, logp_uncond, x_t, coefs, None)
    return posterior_log_probs_impl(logp, logp_uncond, x_t, coefs, guidance_scale, truncation_rate)


@mr_posterior_log_probs.register_fake
def _(logp, logp_uncond, x_t, coefs, guidance_scale, truncation_rate):
    _check_posterior("mr_posterior_log_probs", logp, logp_uncond, x_t, coefs, None, kernel_device=False)
    return log_probs_layout(logp)


def posterior_sample_impl(logp, logp_uncond, x_t, coefs, seed, guidance_scale, truncation_rate):
    """imgtx::mr_posterior_sample without the dispatcher (see _launch.eager_fast_path)."""
    return _posterior(logp, logp_uncond, x_t, coefs, seed, guidance_scale, truncation_rate, True,
                      "posterior_sample")


def posterior_log_probs_impl(logp, logp_uncond, x_t, coefs, guidance_scale, truncation_rate):
    """imgtx::mr_posterior_log_probs without the dispatcher."""
    return _posterior(logp, logp_uncond, x_t, coefs, None, guidance_scale, truncation_rate, False,
                      "posterior_log_probs")


@torch.library.custom_op("imgtx::mr_q_sample", mutates_args=())
def mr_q_sample(x0: Tensor, coefs: Tensor, seed: Tensor, num_classes: int) -> Tensor:
    _check_q_sample(x0, coefs, seed, num_classes)
    return q_sample_impl(x0, coefs, seed, num_classes)


def q_sample_impl(x0: Tensor, coefs: Tensor, seed: Tensor, num_classes: int) -> Tensor:
    """imgtx::mr_q_sample without the dispatcher."""
    B, N = x0.shape
    x_t = torch.empty((B, N), dtype=torch.int64, device=x0.device)
    if B * N == 0:
        return x_t
    args = (B, num_classes, N, _index_arg(x0), coefs.data_ptr(), seed.data_ptr(), x_t.data_ptr())
    cuda = cuda_module(x0)
    if cuda is not None:
        with device_guard(x0):
            status = _cuda_status(x0.device)
            cuda.mr_q_sample_cuda(*args, status.data_ptr(), cuda_stream(x0))
        _check_cuda_status(status, "q_sample", "", f"x0 has values outside [0, {num_classes})")
    else:
        _raise_status(_C.mr_q_sample_cpu(*args, num_threads()), "q_sample", "",
                      f"x0 has values outside [0, {num_classes})")
    return x_t


@mr_q_sample.register_fake
def _(x0, coefs, seed, num_classes):
    _check_q_sample(x0, coefs, seed, num_classes, kernel_device=False)
    return torch.empty_like(x0, dtype=torch.int64, memory_format=torch.contiguous_format)


@torch.library.custom_op("imgtx::mr_vb_terms", mutates_args=())
def mr_vb_terms(logits: Tensor, x0: Tensor, x_t: Tensor, coefs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss_vb, loss_aux, saved): per-token (B, N) float32 terms and the float64 scalars the
    backward pass reuses."""
    _check_vb("mr_vb_terms", logits, x0, x_t, coefs)
    B, K, N = logits.shape
    loss_vb = torch.empty((B, N), dtype=torch.float32, device=logits.device)
    loss_aux = torch.empty((B, N), dtype=torch.float32, device=logits.device)
    saved = torch.empty((B, N, _C.MR_VB_SAVED), dtype=torch.float64, device=logits.device)
    if B * N == 0:
        return loss_vb, loss_aux, saved
    args = (B, K, N, _logits_arg(logits, "logits", "vb_loss"), _index_arg(x0), _index_arg(x_t),
            coefs.data_ptr(), saved.data_ptr(), loss_vb.data_ptr(), loss_aux.data_ptr())
    cuda = cuda_module(logits)
    if cuda is not None:
        with device_guard(logits):
            status = _cuda_status(logits.device)
            cuda.mr_vb_forward_cuda(*args, status.data_ptr(), cuda_stream(logits))
        _check_cuda_status(status, "vb_loss", "logits", f"x0 must be in [0, {K}) and x_t in [0, {K}]")
    else:
        _raise_status(_C.mr_vb_forward_cpu(*args, num_threads()), "vb_loss", "logits",
                      f"x0 must be in [0, {K}) and x_t in [0, {K}]")
    return loss_vb, loss_aux, saved


@mr_vb_terms.register_fake
def _(logits, x0, x_t, coefs):
    _check_vb("mr_vb_terms", logits, x0, x_t, coefs, kernel_device=False)
    B, K, N = logits.shape
    return (logits.new_empty((B, N), dtype=torch.float32), logits.new_empty((B, N), dtype=torch.float32),
            logits.new_empty((B, N, _C.MR_VB_SAVED), dtype=torch.float64))


@torch.library.custom_op("imgtx::mr_vb_terms_backward", mutates_args=())
def mr_vb_terms_backward(grad_vb: Tensor, grad_aux: Tensor, logits: Tensor, x0: Tensor,
                         x_t: Tensor, coefs: Tensor, saved: Tensor) -> Tensor:
    _check_vb_backward(grad_vb, grad_aux, logits, x0, x_t, coefs, saved)
    B, K, N = logits.shape
    grad = torch.empty_like(logits)  # keeps logits' layout (dense permuted views stay permuted)
    if B * N == 0:
        return grad
    grad_vb = grad_vb.to(torch.float32).contiguous()
    grad_aux = grad_aux.to(torch.float32).contiguous()
    args = (B, K, N, _logits_arg(logits, "logits", "vb_loss"), _index_arg(x0), _index_arg(x_t),
            coefs.data_ptr(), saved.data_ptr(), grad_vb.data_ptr(), grad_aux.data_ptr(),
            (grad.data_ptr(), grad.stride(0), grad.stride(1), grad.stride(2)))
    cuda = cuda_module(logits)
    if cuda is not None:
        with device_guard(logits):
            cuda.mr_vb_backward_cuda(*args, cuda_stream(logits))
    else:
        _C.mr_vb_backward_cpu(*args, num_threads())
    return grad


@mr_vb_terms_backward.register_fake
def _(grad_vb, grad_aux, logits, x0, x_t, coefs, saved):
    _check_vb_backward(grad_vb, grad_aux, logits, x0, x_t, coefs, saved, kernel_device=False)
    return torch.empty_like(logits)


def _vb_setup_context(ctx, inputs, output):
    logits, x0, x_t, coefs = inputs
    ctx.save_for_backward(logits, x0, x_t, coefs, output[2])


def _vb_backward(ctx, grad_vb, grad_aux, grad_saved):
    logits, x0, x_t, coefs, saved = ctx.saved_tensors
    if grad_vb is None:
        grad_vb = torch.zeros(saved.shape[:2], dtype=torch.float32, device=saved.device)
    if grad_aux is None:
        grad_aux = torch.zeros(saved.shape[:2], dtype=torch.float32, device=saved.device)
    grad = torch.ops.imgtx.mr_vb_terms_backward(grad_vb, grad_aux, logits, x0, x_t, coefs, saved)
    return grad, None, None, None


mr_vb_terms.register_autograd(_vb_backward, setup_context=_vb_setup_context)
