"""torch.ops.imgtx.attention_forward / attention_backward: fused (flash-style) attention.

One op serves dense, causal (any alignment), key-padded, masked, GQA/MQA and Image Transformer
local 1D/2D attention: the kernel visits only the key tiles a query tile can see and masks
boundary tiles only. The forward saves the log-sum-exp; the backward recomputes P tile by
tile. Semantics: csrc/include/imgtx/attention.h and docs/specs/local_attention.md.

CUDA tensors run the fp32 plain-PyTorch path unless IMGTX_FAST_CUDA_ATTENTION=1 enables the
CUDA kernels (compiled, not yet verified on a GPU; see cuda_kernels_enabled).
"""
import math
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _C
from .._backend import get_backend
from .._dtypes import FLOAT_CODES, float_code
# The kernels' argument encoding (pattern list, attn_mask argument) and the shape checks are the
# torch-free front end's; `_NO_CAUSAL` is the causal_offset meaning "not causal".
from .._frontend.attention import (_DENSE, _NO_CAUSAL, _OP, NO_MASK, check_shapes,
                                   kernel_causal_offset, mask_arg, pattern_args, pattern_from_args)
from .._frontend.common import check_int, check_real
from ..reference import attention as _reference
from ._launch import (cuda_module, cuda_stream, device_guard,
                      eager_fast_path, num_threads)


def _tensor_arg(t: Tensor, name: str):
    s = t.stride()  # one call, not three: this runs three times per call on the eager path
    return (t.data_ptr(), float_code(t, name, _OP), s[0], s[1], s[2])


def _mask_arg(mask: Optional[Tensor]):
    if mask is None:
        return NO_MASK
    code = None if mask.dtype == torch.bool else float_code(mask, "attn_mask", _OP)
    return mask_arg(mask.data_ptr(), code, mask.stride())


def _dense_last(t: Tensor) -> Tensor:
    """D must be contiguous for the kernels; any strides on B, H, N are taken as they are."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _reference_mask(q, k, attn_mask, causal_offset):
    """attn_mask with the causal rule folded in (the reference takes no offset)."""
    if causal_offset == _NO_CAUSAL:
        return attn_mask
    Nq, Nk = q.shape[2], k.shape[2]
    i = torch.arange(Nq, device=q.device)[:, None] + causal_offset
    causal = torch.arange(Nk, device=q.device)[None, :] <= i
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, -math.inf)


def _reference_forward(q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale):
    out, lse = _reference.attention(q.float(), k.float(), v.float(), key_lengths=key_lengths,
                                    attn_mask=_reference_mask(q, k, attn_mask, causal_offset),
                                    pattern=pattern_from_args(pattern), scale=scale,
                                    return_lse=True)
    return out.to(q.dtype), lse.float()


def _reference_backward(grad_out, grad_lse, q, k, v, out, key_lengths, attn_mask, pattern,
                        causal_offset, scale):
    """The backward formulas in fp32 torch ops (custom ops run with autograd off)."""
    group = q.shape[1] // k.shape[1]
    qf, dof, of = q.float(), grad_out.float(), out.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    p, _ = _reference.attention(qf, kf, vf, key_lengths=key_lengths,
                                attn_mask=_reference_mask(q, k, attn_mask, causal_offset),
                                pattern=pattern_from_args(pattern), scale=scale,
                                return_lse=True, return_probs=True)
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    delta = (dof * of).sum(-1, keepdim=True)
    if grad_lse is not None:  # d lse / d s = P
        delta = delta - grad_lse.float()[..., None]
    ds = p * (dp - delta)
    dq = scale * ds @ kf
    dk = scale * ds.transpose(-1, -2) @ qf
    B, Hkv = k.shape[:2]
    dk = dk.reshape(B, Hkv, group, *dk.shape[2:]).sum(2)
    dv = dv.reshape(B, Hkv, group, *dv.shape[2:]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_BWD = "attention_backward"


def _check_strided(t, name: str, op: str = _OP) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:  # sparse/mkldnn tensors have no strided data pointer
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {t.layout}")


def _check_qkv(q, k, v, pattern, kernel_device: bool = True) -> None:
    """q, k and v against each other and the pattern: attention_op's and the raw ops' check.
    kernel_device=False (the fake impls) lets meta tensors through: they have shapes, no data."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_strided(t, name)
        float_code(t, name, _OP)
        if t.dim() != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D (B, heads, N, D), got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{_OP}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{_OP}: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if kernel_device and q.device.type not in ("cpu", "cuda"):  # meta tensors have no data
        raise ValueError(f"{_OP}: q, k and v must be on a cpu or cuda device, got {q.device}")
    check_shapes(q.shape, k.shape, v.shape, pattern)


def _check_aux(t, name: str, shape, refs, dtypes, op: str = _OP) -> None:
    """A tensor whose shape, dtypes and device q fixes: key_lengths, and the backward's out,
    grad_out, lse and grad_lse. refs: the (name, tensor) pairs its shape comes from, q first."""
    if not isinstance(t, Tensor) or t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{op}: {name} must be {'an' if names[0] == 'i' else 'a'} {names} tensor "
                        f"of shape {tuple(shape)}, got {got}")
    _check_strided(t, name, op)
    if tuple(t.shape) != tuple(shape):
        source = " and ".join(f"{n} {tuple(r.shape)}" for n, r in refs)
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} (from {source}), got "
                         f"{tuple(t.shape)}")
    if t.device != refs[0][1].device:
        raise ValueError(f"{op}: {name} is on {t.device}, {refs[0][0]} on {refs[0][1].device}")


def _check_mask(attn_mask, q, k, expanded: bool) -> None:
    """attn_mask: bool (True = visible) or additive float, on q's device, broadcastable to
    (B, H, Nq, Nk) of q and k; expanded=True (the raw ops, whose kernels read it through four
    strides) wants that shape exactly."""
    shape = tuple(q.shape[:3]) + (k.shape[2],)
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_OP}: attn_mask must be a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        float_code(attn_mask, "attn_mask", _OP)
    _check_strided(attn_mask, "attn_mask")
    if expanded:
        if tuple(attn_mask.shape) != shape:
            raise ValueError(f"{_OP}: the op takes attn_mask expanded to (B, H, Nq, Nk) = {shape} "
                             f"of q and k (a stride-0 view), got shape {tuple(attn_mask.shape)}")
    else:
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(attn_mask.shape, shape) == shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{_OP}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to (B, H, Nq, Nk) = {shape}")
    if attn_mask.device != q.device:
        raise ValueError(f"{_OP}: attn_mask is on {attn_mask.device}, q on {q.device}")


def _check_raw(q, k, v, key_lengths, attn_mask, pattern, causal_offset,
               kernel_device: bool = True) -> Tuple[List[int], int]:
    """The raw forward's arguments, as attention_op builds them: key_lengths int64 and
    contiguous, attn_mask expanded, the kernels' pattern list. Shapes, dtypes and devices only,
    no data (the fake impls run it too). Returns the pattern list and causal_offset as the
    kernels take them (pattern_args and kernel_causal_offset: the same pattern and offset)."""
    pat = pattern_from_args(pattern)
    _check_qkv(q, k, v, pat, kernel_device)
    if key_lengths is not None:
        _check_aux(key_lengths, "key_lengths", (q.shape[0],), (("q", q),), (torch.int64,))
        if not key_lengths.is_contiguous():  # the kernels read B consecutive int64
            raise ValueError(f"{_OP}: key_lengths must be contiguous, got stride {key_lengths.stride()}")
    if attn_mask is not None:
        _check_mask(attn_mask, q, k, expanded=True)
    if pat is not None and causal_offset != _NO_CAUSAL:
        raise ValueError(f"{_OP}: a pattern carries its own causality; causal_offset must be "
                         f"{_NO_CAUSAL} (not causal) with it, got {causal_offset}")
    return pattern_args(pat), kernel_causal_offset(causal_offset)


def _check_backward_raw(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask, pattern,
                        causal_offset, kernel_device: bool = True) -> Tuple[List[int], int]:
    """_check_raw, and the tensors only the backward reads: out and lse as the forward gave
    them, grad_out and grad_lse of their shapes (any kernel float dtype: they are converted)."""
    kernel_args = _check_raw(q, k, v, key_lengths, attn_mask, pattern, causal_offset, kernel_device)
    rows, out_shape = tuple(q.shape[:3]), tuple(q.shape[:3]) + (v.shape[3],)
    qv = (("q", q), ("v", v))
    _check_aux(out, "out", out_shape, qv, (q.dtype,), _BWD)
    _check_aux(grad_out, "grad_out", out_shape, qv, tuple(FLOAT_CODES), _BWD)
    _check_aux(lse, "lse", rows, qv[:1], (torch.float32,), _BWD)
    if grad_lse is not None:
        _check_aux(grad_lse, "grad_lse", rows, qv[:1], tuple(FLOAT_CODES), _BWD)
    return kernel_args


def cuda_kernels_enabled() -> bool:
    """The CUDA attention kernels are compiled but have not run on a GPU yet: they are opt-in
    (IMGTX_FAST_CUDA_ATTENTION=1) until verified; otherwise CUDA tensors run the fp32 torch path."""
    return os.environ.get("IMGTX_FAST_CUDA_ATTENTION", "0") == "1" and _C.cuda_compiled()


def _cuda_kernels(q, k, v, key_lengths, attn_mask, pattern, causal_offset, backward=False):
    """The module whose CUDA attention kernels take this pass of the call (_C on CUDA tensors
    when enabled, _C_simt on CPU tensors under emulated_cuda(), whatever the opt-in says), or
    None. The forward and the backward decide apart: the backward needs more shared memory, so
    on sm_86/sm_89 a head-dim-128 forward runs the kernel and its backward falls back."""
    mod = cuda_module(q)
    if mod is None or (q.device.type == "cuda" and not cuda_kernels_enabled()):
        return None
    B, H, Nq, D = q.shape
    supported = mod.attention_cuda_supported(
        (B, H, k.shape[1], Nq, k.shape[2], D, v.shape[3]), _tensor_arg(q, "q"),
        _tensor_arg(k, "k"), _tensor_arg(v, "v"), int(causal_offset), _mask_arg(attn_mask),
        key_lengths.data_ptr() if key_lengths is not None else 0, list(pattern), backward)
    return mod if supported else None


def _workspace(nbytes: int, device) -> Tensor:
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=device)


def _forward_impl(q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale):
    """The forward on checked arguments (_check_raw, or attention_op's _check)."""
    q, k, v = _dense_last(q), _dense_last(k), _dense_last(v)
    cuda = _cuda_kernels(q, k, v, key_lengths, attn_mask, pattern, causal_offset)
    if q.device.type != "cpu" and cuda is None:
        return _reference_forward(q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale)
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = v.shape[1], v.shape[2], v.shape[3]
    out = q.new_empty((B, Nq, H, Dv)).transpose(1, 2)  # (B, N, H, D) memory: what projections want
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(_reference.LSE_EMPTY)
    if Nk == 0:  # no key at all: an (.., Nq, 0) attn_mask has no data pointer for the kernels
        return out.zero_(), lse.fill_(_reference.LSE_EMPTY)
    so = out.stride()
    args = ((B, H, Hkv, Nq, Nk, D, Dv), _tensor_arg(q, "q"), _tensor_arg(k, "k"),
            _tensor_arg(v, "v"), (out.data_ptr(), so[0], so[1], so[2]),
            lse.data_ptr(), float(scale), int(causal_offset), _mask_arg(attn_mask),
            key_lengths.data_ptr() if key_lengths is not None else 0, list(pattern))
    if cuda is not None:
        with device_guard(q):
            ws = _workspace(cuda.attention_forward_cuda_workspace_size(*args), q.device)
            cuda.attention_forward_cuda(*args, ws.data_ptr(), cuda_stream(q))
    else:
        _C.attention_forward_cpu(*args, num_threads())
    return out, lse


@torch.library.custom_op("imgtx::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_lengths: Optional[Tensor],
                      attn_mask: Optional[Tensor], pattern: List[int], causal_offset: int,
                      scale: float) -> Tuple[Tensor, Tensor]:
    """(out (B, H, Nq, Dv) in q's dtype, lse (B, H, Nq) float32)."""
    pattern, causal_offset = _check_raw(q, k, v, key_lengths, attn_mask, pattern, causal_offset)
    return _forward_impl(q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale)


@attention_forward.register_fake
def _(q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale):
    _check_raw(q, k, v, key_lengths, attn_mask, pattern, causal_offset, kernel_device=False)
    B, H, Nq, _ = q.shape
    out = q.new_empty((B, Nq, H, v.shape[3])).transpose(1, 2)
    return out, q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("imgtx::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor,
                       v: Tensor, out: Tensor, lse: Tensor, key_lengths: Optional[Tensor],
                       attn_mask: Optional[Tensor], pattern: List[int], causal_offset: int,
                       scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask, pattern,
                          causal_offset, scale)


def _backward_impl(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask, pattern,
                   causal_offset, scale):
    """The backward op's body: (dq, dk, dv)."""
    pattern, causal_offset = _check_backward_raw(grad_out, grad_lse, q, k, v, out, lse, key_lengths,
                                                 attn_mask, pattern, causal_offset)
    cuda = _cuda_kernels(q, k, v, key_lengths, attn_mask, pattern, causal_offset, backward=True)
    if q.device.type != "cpu" and cuda is None:
        return _reference_backward(grad_out, grad_lse, q, k, v, out, key_lengths, attn_mask,
                                   pattern, causal_offset, scale)
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = v.shape[1], v.shape[2], v.shape[3]
    q, k, v, out = _dense_last(q), _dense_last(k), _dense_last(v), _dense_last(out)
    grad_out = _dense_last(grad_out.to(q.dtype))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    glse = grad_lse.to(torch.float32).contiguous() if grad_lse is not None else None
    lse = lse.contiguous()
    args = ((B, H, Hkv, Nq, Nk, D, Dv), _tensor_arg(q, "q"), _tensor_arg(k, "k"),
            _tensor_arg(v, "v"), _tensor_arg(out, "out"), _tensor_arg(grad_out, "grad_out"),
            lse.data_ptr(), glse.data_ptr() if glse is not None else 0,
            _tensor_arg(dq, "q"), _tensor_arg(dk, "k"), _tensor_arg(dv, "v"), float(scale),
            int(causal_offset), _mask_arg(attn_mask),
            key_lengths.data_ptr() if key_lengths is not None else 0, list(pattern))
    if cuda is not None:
        with device_guard(q):
            ws = _workspace(cuda.attention_backward_cuda_workspace_size(*args), q.device)
            cuda.attention_backward_cuda(*args, ws.data_ptr(), cuda_stream(q))
    else:
        _C.attention_backward_cpu(*args, num_threads())
    return dq, dk, dv


@attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask, pattern, causal_offset, scale):
    _check_backward_raw(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask, pattern,
                        causal_offset, kernel_device=False)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], key_lengths, attn_mask)
    ctx.args = (pattern, causal_offset, scale)


def _eager_backward(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask, pattern,
                    causal_offset, scale):
    """The backward of a plain eager CPU call: one compiled call
    (_C.attention_backward_cpu_call, which makes the state checks, reads the tensors and checks
    them itself; ~20 us less than the op's body at (8, 8, 16, 64)), else the op's body
    (_backward_impl), which also writes the error messages."""
    if pattern[0] == _DENSE:
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if _C.attention_backward_cpu_call(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv,
                                          attn_mask, key_lengths, scale, causal_offset):
            return dq, dk, dv
    return _backward_impl(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask, pattern,
                          causal_offset, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_lengths, attn_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if torch.is_grad_enabled():
        # create_graph=True (double backward, torch.func transforms): the backward formulas in
        # torch ops, which autograd can differentiate again; the kernel's backward cannot be
        dq, dk, dv = _reference_backward(grad_out, grad_lse, q, k, v, out, key_lengths, attn_mask,
                                         *ctx.args)
    elif eager_fast_path(grad_out, grad_lse, q, k, v, key_lengths, attn_mask):
        dq, dk, dv = _eager_backward(grad_out, grad_lse, q, k, v, out, lse, key_lengths, attn_mask,
                                     *ctx.args)
    else:
        dq, dk, dv = torch.ops.imgtx.attention_backward(grad_out, grad_lse, q, k, v, out, lse,
                                                        key_lengths, attn_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _FunctorchAttention(torch.autograd.Function):
    """attention_forward with the op's own autograd, for torch.func transforms (grad, jacrev,
    vmap): the autograd.Function that torch.library builds for a custom op has no
    setup_context, which functorch requires. The forward under vmap takes the op's vmap rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale):
        return torch.ops.imgtx.attention_forward(q, k, v, key_lengths, attn_mask, pattern,
                                                 causal_offset, scale)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)


class _EagerAttention(torch.autograd.Function):
    """attention_forward's kernels called directly and recorded as one autograd node, for plain
    eager calls that autograd must record (eager_fast_path(..., autograd=True)). The custom op's
    autograd wrapper runs ~100 us of torch's Python per forward and ~150 us per backward: a
    (8, 8, 16, 64) forward + backward took 594 us (torch SDPA: 240 us). Same kernels, saved
    tensors and backward (_backward) as the op's. The forward takes ctx itself: with a separate
    setup_context, apply() cost 30 us against 10."""

    @staticmethod
    def forward(ctx, q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale):
        args = (q, k, v, key_lengths, attn_mask, pattern, causal_offset, scale)
        output = _forward_impl(*args)
        _setup_context(ctx, args, output)
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a tensor of zeros
        return output

    backward = staticmethod(_backward)


def _fold(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """t (..., B, ...) with its vmapped dim `dim` (None: not vmapped, broadcast) folded into its
    batch dim: (size * B, ...)."""
    if t is None:
        return None
    t = t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _vmap_rule(op, n_tensors: int):
    """The vmap rule of an attention op whose first n_tensors arguments are (B, ...) tensors or
    None: every batch of the vmapped dim is one more batch entry of a single op call."""
    def rule(info, in_dims, *args):
        size = info.batch_size
        folded = [_fold(t, d, size) for t, d in zip(args[:n_tensors], in_dims[:n_tensors])]
        outs = op(*folded, *args[n_tensors:])
        return tuple(o.unflatten(0, (size, -1)) for o in outs), (0,) * len(outs)
    return rule


attention_forward.register_vmap(_vmap_rule(torch.ops.imgtx.attention_forward, 5))
attention_backward.register_vmap(_vmap_rule(torch.ops.imgtx.attention_backward, 9))


def _autocast_inputs(device_type: str, args):
    """args as torch's autocast casts a lower-precision op's inputs (SDPA is one, on CPU and
    CUDA): floating tensors of that device to the autocast dtype, float64 excepted; args
    unchanged when autocast is off there."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return args
    return torch.amp.autocast_mode._cast(args, device_type, torch.get_autocast_dtype(device_type))


_AUTOCAST_LIB = torch.library.Library("imgtx", "FRAGMENT")


def _register_autocast(op, device_type: str) -> None:
    """torch.library.register_autocast with the dtype read when the op runs (register_autocast
    fixes one dtype; torch's own ops follow torch.autocast(dtype=...))."""
    key = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}[device_type]
    exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(keyset, *args):
        args = _autocast_inputs(device_type, args)  # before the guard: it turns autocast off
        with torch._C._ExcludeDispatchKeyGuard(exclude):
            return op(*args)

    _AUTOCAST_LIB.impl(op._name.split("::")[1], kernel, key, with_keyset=True)


for _op in (torch.ops.imgtx.attention_forward.default, torch.ops.imgtx.attention_backward.default):
    for _device_type in ("cpu", "cuda"):
        _register_autocast(_op, _device_type)


def eager_forward(q, k, v, causal_offset: int, align_end: bool, key_lengths, attn_mask, scale,
                  gqa: bool, contiguous: bool, want_lse: bool):
    """The forward of a plain eager CPU call in one compiled call (_C.attention_forward_cpu_call,
    which makes the per-call checks, reads the tensors' sizes and strides, allocates the output
    and runs the kernel): (out, lse or None), or None when the call takes the general path:
    autograd, torch.compile, tracing, a functorch transform or dispatch mode, autocast, the
    reference backend, the emulator, other devices or dtypes, int32 key_lengths, or anything
    the kernels would reject (the general path then says why).

    causal_offset: the kernels' (_NO_CAUSAL: not causal); align_end adds Nk - Nq (bottom-right).
    gqa: False allows only Hkv == H or 1 (torch SDPA without enable_gqa). contiguous: out laid out
    (B, H, Nq, Dv) as torch's SDPA returns it; else (B, Nq, H, Dv) memory, what the output
    projection reads."""
    # in Python: under torch.compile dynamo folds it, so the graph never meets the C call
    if torch.compiler.is_compiling():
        return None
    return _C.attention_forward_cpu_call(q, k, v, causal_offset, align_end, key_lengths, attn_mask,
                                         scale, gqa, contiguous, want_lse)


def _on_meta(t) -> bool:
    """Meta tensors (deferred init, shape inference) run the op's fake impl: shapes, no data."""
    return isinstance(t, Tensor) and t.device.type == "meta"


def _check(q, k, v, key_lengths, attn_mask, pattern, scale):
    _check_qkv(q, k, v, pattern, kernel_device=not _on_meta(q))
    Nk = k.shape[2]
    if key_lengths is not None:
        _check_aux(key_lengths, "key_lengths", (q.shape[0],), (("q", q),), (torch.int32, torch.int64))
        # Values are data: read them in eager mode on the CPU only (the CPU kernel checks them
        # again; on CUDA a read would synchronise every call, and the kernels clamp them).
        if (key_lengths.device.type == "cpu" and not torch.compiler.is_compiling() and key_lengths.numel()
                and not torch._C._are_functorch_transforms_active()  # vmap: no values to read
                and (int(key_lengths.min()) < 0 or int(key_lengths.max()) > Nk)):
            raise ValueError(f"{_OP}: key_lengths must be in [0, {Nk}], got values in "
                             f"[{int(key_lengths.min())}, {int(key_lengths.max())}]")
    if attn_mask is not None:
        _check_mask(attn_mask, q, k, expanded=False)
        if attn_mask.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{_OP}: attn_mask requires grad, and the fused kernel has no "
                             "gradient for masks (use torch's scaled_dot_product_attention)")
    check_real(scale, "scale", _OP, optional=True)  # numpy scalars too, as the numpy front end


def attention_op(q: Tensor, k: Tensor, v: Tensor, *, causal_offset: Optional[int] = None,
                 key_lengths: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
                 pattern=None, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """attention() with the causal alignment spelled out: query i sees keys j <= i +
    causal_offset (None: no causal mask). Returns (out, lse)."""
    if pattern is None and (causal_offset is None or type(causal_offset) is int):
        offset = _NO_CAUSAL if causal_offset is None else kernel_causal_offset(causal_offset)
        done = eager_forward(q, k, v, offset, False, key_lengths, attn_mask, scale, gqa=True,
                             contiguous=False, want_lse=True)
        if done is not None:
            return done
    _check(q, k, v, key_lengths, attn_mask, pattern, scale)
    if causal_offset is not None:
        causal_offset = check_int(causal_offset, "causal_offset", _OP)
        if pattern is not None:
            raise ValueError(f"{_OP}: a pattern carries its own causality; pass causal_offset=None with it")
    q, k, v, attn_mask = _autocast_inputs(q.device.type, (q, k, v, attn_mask))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if attn_mask is not None:
        attn_mask = attn_mask.expand(B, H, Nq, Nk)  # stride-0 views: no copy
    if key_lengths is not None:
        key_lengths = key_lengths.to(torch.int64).contiguous()
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    offset = _NO_CAUSAL if causal_offset is None else kernel_causal_offset(causal_offset)
    if get_backend() == "reference" and not _on_meta(q):  # the plain-PyTorch twin, differentiable
        out, lse = _reference.attention(q, k, v, key_lengths=key_lengths,
                                        attn_mask=_reference_mask(q, k, attn_mask, offset),
                                        pattern=pattern, scale=scale, return_lse=True)
        return out, lse.float()
    args = (q, k, v, key_lengths, attn_mask, pattern_args(pattern), offset, scale)
    if eager_fast_path(q, k, v, key_lengths, attn_mask):
        return _forward_impl(*args)
    if eager_fast_path(q, k, v, key_lengths, attn_mask, autograd=True):
        return _EagerAttention.apply(*args)
    if torch._C._are_functorch_transforms_active():
        return _FunctorchAttention.apply(*args)
    return torch.ops.imgtx.attention_forward(*args)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              key_lengths: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
              pattern=None, scale: Optional[float] = None, return_lse: bool = False):
    """softmax(scale * q k^T + mask) v, fused; q (B, H, Nq, D), k/v (B, Hkv, Nk, D[v]).

    causal:      query i sees keys j <= i + Nk - Nq (bottom-right aligned: with a KV cache the
                 queries are the newest positions).
    key_lengths: (B,) ints; keys j >= key_lengths[b] are padding and never seen.
    attn_mask:   bool (True = visible) or additive float, broadcastable to (B, H, Nq, Nk).
    pattern:     Local1d / Local2d (Image Transformer local attention), block-sparse.
    A query that sees no key outputs zeros (its lse is reference.LSE_EMPTY).
    """
    if pattern is None and (causal is False or causal is True):
        done = eager_forward(q, k, v, 0 if causal else _NO_CAUSAL, causal, key_lengths, attn_mask,
                             scale, gqa=True, contiguous=False, want_lse=return_lse is True)
        if done is not None:
            return done if return_lse is True else done[0]
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    if causal and pattern is not None:
        raise ValueError(f"{_OP}: a pattern carries its own causality; pass causal=False with it")
    offset = None
    if causal:
        if not isinstance(k, Tensor) or not isinstance(q, Tensor) or k.dim() != 4 or q.dim() != 4:
            _check(q, k, v, key_lengths, attn_mask, pattern, scale)
        offset = k.shape[2] - q.shape[2]
    out, lse = attention_op(q, k, v, causal_offset=offset, key_lengths=key_lengths,
                            attn_mask=attn_mask, pattern=pattern, scale=scale)
    return (out, lse) if return_lse else out
