"""Float64-capable dense reference of imgtx_fast.attention: the test oracle.

Builds the full (B, H, Nq, Nk) visibility and runs softmax(scale * q k^T + mask) v in the
inputs' dtype (pass float64 tensors for the oracle). A query row with no visible key gives a
zero output and the log-sum-exp sentinel LSE_EMPTY.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from ..patterns import Local1d, Local2d

# Log-sum-exp of a query that sees no key: finite (spec) and -inf-like, so merging partial
# results weighted by exp(lse) gives such a chunk weight 0.
LSE_EMPTY = torch.finfo(torch.float32).min


def visible_mask(q_len: int, k_len: int, *, causal: bool = False, pattern=None,
                 device=None) -> Tensor:
    """(Nq, Nk) bool: which keys each query sees. Query i sits at position i + Nk - Nq."""
    p = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    if pattern is None:
        return (j <= p) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if isinstance(pattern, Local1d):
        L = pattern.block
        if pattern.causal:
            return (j <= p) & (j >= (p // L) * L - L)
        b = p // L
        return (j >= b * L - pattern.filter_width) & (j < (b + 1) * L + pattern.filter_width)
    if isinstance(pattern, Local2d):
        W = pattern.width
        (qh, qw), (fh, fw) = pattern.query_shape, pattern.memory_flange
        r, c = p // W, p % W
        r0, c0 = (r // qh) * qh, (c // qw) * qw
        rk, ck = j // W, j % W
        if not pattern.causal:
            return (rk >= r0 - fh) & (rk < r0 + qh + fh) & (ck >= c0 - fw) & (ck < c0 + qw + fw)
        top = (rk >= r0 - fh) & (rk < r0) & (ck >= c0 - fw) & (ck < c0 + qw + fw)
        rows = (rk >= r0) & (rk < r0 + qh)
        left = rows & (ck >= c0 - fw) & (ck < c0)
        center = rows & (ck >= c0) & (ck < c0 + qw) & (
            (rk - r0) * qw + (ck - c0) <= (r - r0) * qw + (c - c0))
        return top | left | center
    raise TypeError(f"attention: pattern must be Local1d, Local2d or None, got {type(pattern).__name__}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              key_lengths: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
              pattern=None, scale: Optional[float] = None, return_lse: bool = False,
              return_probs: bool = False):
    """q (B, H, Nq, D), k/v (B, Hkv, Nk, D) with Hkv dividing H; computed in q's dtype (float32
    for float16/bfloat16 inputs, as the kernels accumulate), autocast off; the output (or the
    probabilities) in q's dtype, the lse in float32 for half inputs (the kernels' dtypes).
    return_probs=True returns the (B, H, Nq, Nk) probabilities in place of the output."""
    kwargs = dict(causal=causal, key_lengths=key_lengths, attn_mask=attn_mask, pattern=pattern,
                  scale=scale, return_lse=return_lse, return_probs=return_probs)
    if q.dtype in (torch.float16, torch.bfloat16):
        # LSE_EMPTY and the logits' range need float32; the result comes back in q's dtype
        if attn_mask is not None and attn_mask.is_floating_point():
            kwargs["attn_mask"] = attn_mask.float()
        res = attention(q.float(), k.float(), v.float(), **kwargs)
        if return_lse:
            return res[0].to(q.dtype), res[1]
        return res.to(q.dtype)
    if q.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(q.device.type):
        # the caller chose the dtype (attention_op casts as autocast says): compute in it
        with torch.autocast(q.device.type, enabled=False):
            return attention(q, k, v, **kwargs)
    return _attention(q, k, v, **kwargs)


def _attention(q: Tensor, k: Tensor, v: Tensor, *, causal, key_lengths, attn_mask, pattern,
               scale, return_lse, return_probs):
    """attention() in q's dtype, autocast off."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if Nk == 0:  # every query sees no key
        shape = (B, H, Nq, 0) if return_probs else (B, H, Nq, v.shape[-1])
        out = q.new_zeros(shape)
        return (out, q.new_full((B, H, Nq), LSE_EMPTY)) if return_lse else out
    s = torch.matmul(q, k.transpose(-1, -2).to(q.dtype)) * scale
    visible = visible_mask(Nq, Nk, causal=causal, pattern=pattern, device=q.device)
    visible = visible.expand(B, H, Nq, Nk)
    if key_lengths is not None:
        keep = torch.arange(Nk, device=q.device)[None, :] < key_lengths.to(q.device)[:, None]
        visible = visible & keep[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            s = s + attn_mask.to(s.dtype)
    s = s.masked_fill(~visible, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    probs = torch.where(empty, torch.zeros_like(e), e / torch.where(empty, torch.ones_like(l), l))
    out = probs if return_probs else torch.matmul(probs, v.to(q.dtype))
    out = torch.where(empty, torch.zeros_like(out), out)
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(m, LSE_EMPTY), m + torch.log(l)).squeeze(-1)
    return out, lse
