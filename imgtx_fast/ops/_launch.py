"""Shared glue between torch tensors and the compiled core: threads, streams, stride views, and
which compiled module runs a tensor's CUDA kernels."""
import contextlib
import contextvars

import torch
from torch import Tensor

from .. import _C

from .._frontend.arrays import two_level_rows as _two_level_rows


def num_threads() -> int:
    """The CPU kernels use exactly torch's intra-op thread count, so they never oversubscribe."""
    return max(1, torch.get_num_threads())


# The module of CUDA host entry points that CPU tensors are routed to inside
# imgtx_fast.testing.emulated_cuda() (imgtx_fast._C_simt: the CUDA kernels under the emulator).
EMULATOR: "contextvars.ContextVar" = contextvars.ContextVar("imgtx_fast_emulator", default=None)


def cuda_module(t: torch.Tensor):
    """The compiled module whose CUDA entry points run the kernels for t, or None when t takes the
    CPU kernels: _C for CUDA tensors; for CPU tensors, _C_simt inside emulated_cuda(), else None."""
    kind = t.device.type
    if kind == "cuda":
        return _C
    return EMULATOR.get() if kind == "cpu" else None


def device_guard(t: torch.Tensor):
    """torch.cuda.device(t.device) for CUDA tensors (allocations and the current stream follow
    it); nothing for emulated calls on CPU tensors."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def cuda_stream(t: torch.Tensor) -> int:
    """The current stream of t's device, read on every call (never cached: graph capture); 0 for
    CPU tensors under the emulator, which runs every launch synchronously."""
    if t.device.type != "cuda":
        return 0
    return torch.cuda.current_stream(t.device).cuda_stream


def two_level_rows(t: torch.Tensor):
    """View the leading dims of t (..., D) as (batch, rows) with one stride each.

    Returns (t, batch, rows, stride_batch, stride_row) where t may be a contiguous copy when the
    leading dims do not collapse to two levels (the only case that costs a copy). Covers
    contiguous inputs, column slices of fused projections and (B, C, H, W) permuted to
    (B, H, W, C). The arithmetic is the front ends' (_frontend/arrays.two_level_rows).
    """
    rows = _two_level_rows(t.shape, t.stride())
    if rows is None:
        t = t.contiguous()
        n = t.numel() // t.shape[-1] if t.shape[-1] else 0
        return t, 1, n, 0, t.shape[-1]
    return (t,) + rows


# The private torch functions behind eager_fast_path's checks, looked up once (None where a torch
# release lacks one: every call then takes the registered op, the public path). Called directly
# they skip the public wrappers' Python frames (torch.jit.is_tracing -> is_scripting ->
# torch._C._is_tracing).
_peek_interpreter_stack = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack",
                                  None)
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_is_tracing = getattr(torch._C, "_is_tracing", None) or torch.jit.is_tracing
_is_grad_enabled = torch.is_grad_enabled
# Whether autocast is on for any device: one call without arguments (parsing "cpu" cost ~7 us
# cold). Autocast on another device sends a CPU call down the registered op too: slower, same result.
any_autocast_enabled = (getattr(torch._C, "_is_any_autocast_enabled", None)
                        or (lambda: torch.is_autocast_enabled("cpu")))


def install_torch_hooks() -> None:
    """Hands the compiled core the torch objects its per-call checks call (csrc/bindings/
    torch_state.h): the checks run in C, because right after a model's torch ops the
    interpreter's caches are cold and every Python frame of them costs microseconds. Run at
    import; again after replacing one of the functions above (tests do)."""
    _C.set_torch_hooks(Tensor, _is_tracing, _peek_interpreter_stack, _dispatch_stack_len,
                       _is_grad_enabled, any_autocast_enabled, EMULATOR, torch.get_num_threads,
                       torch.empty_strided, (torch.float32, torch.float16, torch.bfloat16),
                       torch.bool, torch.int64)


install_torch_hooks()


def eager_fast_path(*tensors, autograd: bool = False) -> bool:
    """Whether a public function may call its op's implementation directly instead of the
    registered custom op: plain CPU tensors (None allowed), no autograd, no torch.compile,
    tracing, functorch transform or dispatch mode. The custom-op dispatcher costs ~40 us per
    call, as much as the kernel of a small call (a decoding step of a small layer, a sampling
    step of a few tokens). A functorch transform (vmap, grad) or a torch_dispatch mode
    (FlopCounterMode, ...) must see the registered op too: only private torch APIs answer that
    cheaply, and where a torch release lacks one the answer is "active".
    autograd=True: the same, except that inputs requiring grad are allowed (the caller records
    the call as an autograd.Function of its own)."""
    # is_compiling in Python: dynamo folds it, so a compiled graph never reaches the C call
    return not torch.compiler.is_compiling() and _C.eager_fast_path(autograd, *tensors)
