"""scaled_dot_product_attention: torch's function, computed by imgtx_fast's fused attention op.

Why: code written against `torch.nn.functional.scaled_dot_product_attention` (diffusers, timm,
hand-written transformers) gets the fused kernel by changing one import:

    from imgtx_fast.nn.functional import scaled_dot_product_attention

The semantics are torch's: query (N, ..., Hq, L, E), key (N, ..., H, S, E), value
(N, ..., H, S, Ev) (also 2-D and 3-D: dim -3, where present, is the heads dim); `is_causal`
is TOP-LEFT aligned (query i sees keys j <= i, also when L != S); a bool `attn_mask` keeps the
True entries, a float one (query's dtype) is added to the logits; `enable_gqa` lets Hq be a
multiple of H; a query that sees no key gives zeros (as torch's CPU kernels do). The result
has torch's shape and dtype; its memory is laid out (..., L, heads, Ev), so
`out.transpose(-3, -2).reshape(..., L, heads * Ev)` costs nothing.

Calls the fused op cannot serve, but torch can -- dropout_p > 0, an attn_mask that requires
grad, float64, head dims above 256, batch dims that broadcast, empty tensors -- run torch's
own function, with a warning (once per reason) saying why. Calls torch rejects are passed to
torch too, so they raise torch's own error; two errors torch documents but its CPU flash kernel
skips (attn_mask with is_causal, key and value of different lengths) are raised here, and an
attn_mask of fewer than 2 dims raises IndexError as in torch, with a message naming it.

As torch's function, it follows torch.autocast (SDPA is a lower-precision op on CPU and CUDA:
float32 inputs are computed and returned in the autocast dtype), runs on meta tensors (shapes
and dtypes only, for deferred init and shape inference) and under torch.func transforms
(grad, jacrev, vmap; double backward too).
"""
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dtypes import FLOAT_CODES
from .._frontend.common import real_scalar
from .._frontend.attention import _NO_CAUSAL
from ..ops.fused_attention import attention_op, eager_forward

__all__ = ["scaled_dot_product_attention"]

_MAX_HEAD_DIM = 256
# where the fused op runs: its kernels, or on meta tensors its fake impl (shapes only)
KERNEL_DEVICES = ("cpu", "cuda", "meta")
_warned = set()
_MASK_SHAPE = "attn_mask that does not broadcast to (..., L, S)"


def warn_fallback(reason: str, what: str = "torch's implementation") -> None:
    """Warn once per reason that a call ran `what` instead of the fused kernel."""
    if reason and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"imgtx_fast: {reason}; running {what} instead of the fused attention "
                      "kernel (this warning is shown once)", stacklevel=3)


def _heads_view(t: Tensor) -> Tuple[Tuple[int, ...], int]:
    """(batch dims, heads) of a (..., [H,] N, D) tensor: dim -3 is the heads dim when present."""
    if t.dim() >= 3:
        return tuple(t.shape[:-3]), t.shape[-3]
    return (), 1


def _why_not_fused(query, key, value, attn_mask, dropout_p, is_causal, scale,
                   enable_gqa) -> Tuple[Optional[str], bool]:
    """(None, _) when the fused op computes this call exactly; else (reason, warn)."""
    if not all(isinstance(t, Tensor) for t in (query, key, value)):
        return "non-tensor query/key/value", False
    if any(t.is_nested for t in (query, key, value)):
        return "nested tensors are not supported", True
    # errors torch documents but its CPU flash kernel does not check
    if is_causal is True and attn_mask is not None:
        raise RuntimeError("scaled_dot_product_attention: Explicit attn_mask should not be set "
                           "when is_causal=True")
    if isinstance(attn_mask, Tensor) and attn_mask.dim() < 2:  # torch: IndexError, unnamed
        raise IndexError(f"scaled_dot_product_attention: attn_mask must have at least 2 dims "
                         f"(..., L, S), got shape {tuple(attn_mask.shape)}")
    if key.dim() >= 2 and value.dim() >= 2 and key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: key and value must have the same "
                           f"sequence length, got {key.shape[-2]} and {value.shape[-2]}")
    if not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return "is_causal/enable_gqa that are not bools", True
    if scale is not None and real_scalar(scale) is None:  # torch takes numpy scalars as well
        return f"scale of type {type(scale).__name__}", True
    if dropout_p != 0.0:
        return "dropout_p > 0", True
    if not (query.dtype == key.dtype == value.dtype) or not (
            query.device == key.device == value.device):
        return "query, key and value differ in dtype or device", False
    if query.dtype not in FLOAT_CODES:
        return f"dtype {query.dtype} (the kernel takes float32, float16 and bfloat16)", True
    if query.device.type not in KERNEL_DEVICES:
        return f"tensors on {query.device.type}", True
    if query.dim() < 2 or not (query.dim() == key.dim() == value.dim()):
        return "query, key and value of different ranks (broadcast batch dims)", True
    (qb, hq), (kb, hk), (vb, hv) = _heads_view(query), _heads_view(key), _heads_view(value)
    if not (qb == kb == vb) or hk != hv or hk == 0 or (hq != hk and not (
            hk == 1 or (enable_gqa and hq % hk == 0))):
        return "batch or head dims that broadcast", True
    L, E = query.shape[-2:]
    S, Ev = value.shape[-2:]
    if key.shape[-1] != E:
        return "mismatched key shape", False  # torch raises
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return "empty tensors", False  # torch's result (zeros or empty) at no cost
    if E > _MAX_HEAD_DIM or Ev > _MAX_HEAD_DIM:
        return f"head dims above {_MAX_HEAD_DIM}", True
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            return "a non-tensor attn_mask", False
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return "attn_mask of another dtype than query", False  # torch raises
        if attn_mask.requires_grad:
            return "attn_mask requires grad (the kernel has no mask gradient)", True
        if attn_mask.device != query.device or attn_mask.is_nested:
            return "attn_mask on another device", True
        full = tuple(query.shape[:-1]) + (S,)
        try:
            ok = attn_mask.dim() <= query.dim() and torch.broadcast_shapes(attn_mask.shape, full) == full
        except RuntimeError:
            ok = False
        if not ok:
            return _MASK_SHAPE, True
    return None, False


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention on the fused kernel (same arguments,
    same result); falls back to torch's function where the kernel cannot compute the call."""
    # The common eager CPU call -- 4-D, no dropout, an optional mask of torch's accepted dtypes --
    # in one compiled call, which checks the rest (shapes, heads, head dims, strides) itself
    # and declines, leaving torch's errors and the fallbacks to the checks below.
    if (type(query) is Tensor and type(dropout_p) in (float, int) and dropout_p == 0
            and (enable_gqa is False or enable_gqa is True)
            and (is_causal is False or (is_causal is True and attn_mask is None))
            and (attn_mask is None or (type(attn_mask) is Tensor and (
                attn_mask.dtype is torch.bool or attn_mask.dtype is query.dtype)))):
        done = eager_forward(query, key, value, 0 if is_causal else _NO_CAUSAL, False, None,
                             attn_mask, scale, gqa=enable_gqa, contiguous=True, want_lse=False)
        if done is not None:
            return done[0]
    reason, warn = _why_not_fused(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                  enable_gqa)
    if reason is not None:
        try:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                 dropout_p=dropout_p, is_causal=is_causal,
                                                 scale=scale, enable_gqa=enable_gqa)
        except RuntimeError as e:
            if reason != _MASK_SHAPE or type(e) is not RuntimeError:
                raise
            # torch's error, with the argument named (torch's message names no argument)
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape "
                               f"{tuple(attn_mask.shape)} does not broadcast to (..., L, S) = "
                               f"{tuple(query.shape[:-1]) + (key.shape[-2],)}: {e}") from e
        if warn:  # only once torch has accepted the call: a call torch rejects raised above
            warn_fallback(reason)
        return out
    (lead, H), (_, Hkv) = _heads_view(query), _heads_view(key)
    L, E = query.shape[-2:]
    S, Ev = value.shape[-2:]
    q = query.reshape(-1, H, L, E)  # a view unless leading batch dims cannot merge
    k = key.reshape(-1, Hkv, S, E)
    v = value.reshape(-1, Hkv, S, Ev)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(tuple(query.shape[:-1]) + (S,)).reshape(-1, H, L, S)
    out, _ = attention_op(q, k, v, causal_offset=0 if is_causal else None, attn_mask=mask,
                          scale=scale)
    # torch returns a contiguous tensor; the op's is laid out (B, L, H, Ev) (free for
    # projections). Callers of a drop-in may .view() the result, so match torch.
    return out.reshape(lead + ((H,) if query.dim() >= 3 else ()) + (L, Ev)).contiguous()
