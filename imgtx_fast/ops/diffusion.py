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
    return posterior_sample_impl(logp, logp_uncond, x_t, coefs, seed, guidance_scale, truncation_rate)


@mr_posterior_sample.register_fake
def _(logp, logp_uncond, x_t, coefs, seed, guidance_scale, truncation_rate):
    return logp.new_empty((logp.shape[0], logp.shape[2]), dtype=torch.int64)


@torch.library.custom_op("imgtx::mr_posterior_log_probs", mutates_args=())
def mr_posterior_log_probs(logp: Tensor, logp_uncond: Optional[Tensor], x_t: Tensor,
                           coefs: Tensor, guidance_scale: float, truncation_rate: float) -> Tensor:
    return posterior_log_probs_impl(logp, logp_uncond, x_t, coefs, guidance_scale, truncation_rate)


@mr_posterior_log_probs.register_fake
def _(logp, logp_uncond, x_t, coefs, guidance_scale, truncation_rate):
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
    return torch.empty_like(x0, dtype=torch.int64, memory_format=torch.contiguous_format)


@torch.library.custom_op("imgtx::mr_vb_terms", mutates_args=())
def mr_vb_terms(logits: Tensor, x0: Tensor, x_t: Tensor, coefs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss_vb, loss_aux, saved): per-token (B, N) float32 terms and the float64 scalars the
    backward pass reuses."""
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
    B, K, N = logits.shape
    return (logits.new_empty((B, N), dtype=torch.float32), logits.new_empty((B, N), dtype=torch.float32),
            logits.new_empty((B, N, _C.MR_VB_SAVED), dtype=torch.float64))


@torch.library.custom_op("imgtx::mr_vb_terms_backward", mutates_args=())
def mr_vb_terms_backward(grad_vb: Tensor, grad_aux: Tensor, logits: Tensor, x0: Tensor,
                         x_t: Tensor, coefs: Tensor, saved: Tensor) -> Tensor:
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
