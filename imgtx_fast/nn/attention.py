"""MultiheadAttention: torch.nn.MultiheadAttention whose attention runs imgtx_fast's fused op.

Why: models built on torch.nn.MultiheadAttention (and checkpoints saved from them) get the
fused kernel by swapping the class: it subclasses torch's, so the constructor, parameters,
state_dict keys, `isinstance` checks and the forward contract are torch's own.

forward(..., need_weights=False) -- what nn.TransformerEncoderLayer/DecoderLayer pass -- runs
the fused op: the in-projection in the input's own layout, heads as strided views (no copy),
bias_k/bias_v and add_zero_attn appended as keys, the masks combined as torch combines them
(bool attn_mask True = masked, float added; key_padding_mask likewise), and a key_padding_mask
that pads a suffix of each batch passed as key_lengths so the padded keys are skipped.
is_causal is torch's hint that attn_mask is the causal mask: the kernel then applies causality
itself and reads no mask.

need_weights=True (torch's default) needs the (L, S) weights, which the fused kernel never
builds; that call, dropout in training mode, and inputs the kernel cannot take (float64, head
dim > 256, a mask that requires grad, tensors on other devices, ...) run torch's
implementation, with a warning once per reason. Calls torch rejects raise torch's own errors.
The fused path follows torch.autocast as torch's does, and runs on meta tensors (a module
built under torch.device("meta") infers shapes) and under torch.func transforms.

The Image Transformer local attention layers live in local_attention.py and are re-exported
here.
"""
import math
import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._dtypes import FLOAT_CODES
from ..ops.fused_attention import attention_op
from ._masks import key_lengths_from_mask
from .functional import KERNEL_DEVICES, warn_fallback
from .local_attention import KVCache, LocalAttention1d, LocalAttention2d

__all__ = ["KVCache", "LocalAttention1d", "LocalAttention2d", "MultiheadAttention"]

_MAX_HEAD_DIM = 256


def _mask_ok(mask: Optional[Tensor], shapes, query: Tensor) -> bool:
    """A mask the fused path takes: bool, or float of the query's dtype (what torch's SDPA
    accepts), of one of the given shapes, on the query's device, no gradient."""
    if mask is None:
        return True
    return (isinstance(mask, Tensor) and (mask.dtype == torch.bool or mask.dtype == query.dtype)
            and tuple(mask.shape) in shapes and mask.device == query.device
            and not mask.requires_grad)


def _pad_keys(mask: Tensor, extra: int) -> Tensor:
    """Append `extra` visible key columns (bias_k, the zero attention) to a mask."""
    if extra == 0:
        return mask
    return F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A visibility mask as torch's _canonical_mask makes it: 0 where visible, -inf where not."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention (same arguments, parameters, state dict and
    results). See the module docstring.

    The fast call passes need_weights=False (as nn.TransformerEncoderLayer does)::

        out, _ = mha(query, key, value, need_weights=False)  # the fused attention kernel

    With torch's default need_weights=True, forward must return the attention weights, which
    the fused kernel never builds, so it takes the slow path -- torch's own implementation, with
    a warning once -- just as torch.nn.MultiheadAttention skips its fast path then."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        reason, warn = self._why_not_fused(query, key, value, key_padding_mask, need_weights,
                                           attn_mask, is_causal)
        if reason is not None:
            out = super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                  need_weights=need_weights, attn_mask=attn_mask,
                                  average_attn_weights=average_attn_weights, is_causal=is_causal)
            if warn:
                warn_fallback(f"MultiheadAttention: {reason}",
                              "torch.nn.MultiheadAttention's implementation")
            return out
        return self._fused(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _why_not_fused(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                       is_causal) -> Tuple[Optional[str], bool]:
        """(None, _) when the fused path computes this call exactly; else (reason, warn)."""
        if need_weights:
            return ("need_weights=True (the fused kernel does not materialise attention "
                    "weights; pass need_weights=False)"), True
        if self.training and self.dropout > 0.0:
            return "dropout in training mode", True
        tensors = (query, key, value)
        if not all(isinstance(t, Tensor) for t in tensors):
            return "non-tensor inputs", False
        if any(t.is_nested for t in tensors):
            return "nested tensors", True
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return "input ranks", False  # torch raises
        if query.dtype not in FLOAT_CODES:
            return f"dtype {query.dtype} (the kernel takes float32, float16 and bfloat16)", True
        if not (query.dtype == key.dtype == value.dtype) or not (
                query.device == key.device == value.device):
            return "query, key and value differ in dtype or device", True
        if query.device.type not in KERNEL_DEVICES:
            return f"tensors on {query.device.type}", True
        if self.embed_dim // self.num_heads > _MAX_HEAD_DIM:
            return f"head dim above {_MAX_HEAD_DIM}", True
        batched = query.dim() == 3
        seq, bat = (1, 0) if (batched and self.batch_first) else (0, 1)
        if (query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim
                or value.shape[-1] != self.vdim or key.shape[:-1] != value.shape[:-1]
                or (self._qkv_same_embed_dim and key.shape != value.shape)
                or (batched and query.shape[bat] != key.shape[bat])):
            return "input shapes", False  # torch raises
        L, S = query.shape[seq], key.shape[seq]
        B = query.shape[bat] if batched else 1
        if B == 0 or L == 0 or S == 0:
            return "empty inputs", False
        if is_causal and attn_mask is None:
            return "is_causal without attn_mask", False  # torch raises
        H = self.num_heads
        if not _mask_ok(attn_mask, {(L, S), (B * H, L, S)}, query):
            return "an attn_mask the kernel cannot take (shape, dtype, device or grad)", True
        if not _mask_ok(key_padding_mask, {(B, S) if batched else (S,)}, query):
            return "a key_padding_mask the kernel cannot take (shape, dtype, device or grad)", True
        if (self.bias_k is None) != (self.bias_v is None):
            return "bias_k without bias_v", False  # torch raises
        return None, False

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        """q, k, v in the inputs' own layout, as torch's in-projection computes them."""
        E = self.embed_dim
        if not self._qkv_same_embed_dim:
            bq = bk = bv = None
            if self.in_proj_bias is not None:
                bq, bk, bv = self.in_proj_bias.chunk(3)
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w, b = self.in_proj_weight, self.in_proj_bias
        if key is value:
            if query is key:  # self-attention: one GEMM
                return F.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = b.split([E, 2 * E]) if b is not None else (None, None)
            return (F.linear(query, w_q, b_q),) + F.linear(key, w_kv, b_kv).unflatten(-1, (2, E)).unbind(-2)
        bq = bk = bv = None
        if b is not None:
            bq, bk, bv = b.chunk(3)
        w_q, w_k, w_v = w.chunk(3)
        return F.linear(query, w_q, bq), F.linear(key, w_k, bk), F.linear(value, w_v, bv)

    def _fused(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        H, E = self.num_heads, self.embed_dim
        hd = E // H
        batched = query.dim() == 3
        batch_first = batched and self.batch_first
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):  # as torch warns
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=3)
        q, k, v = self._project(query, key, value)

        def heads(t: Tensor) -> Tensor:  # (B, H, N, hd) strided view of a projection
            t = t.unflatten(-1, (H, hd))
            if not batched:
                return t.transpose(0, 1).unsqueeze(0)
            return t.transpose(1, 2) if batch_first else t.permute(1, 2, 0, 3)

        q, k, v = heads(q), heads(k), heads(v)
        B, _, L, _ = q.shape
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, H, 1, hd).expand(B, H, 1, hd).to(k.dtype)], 2)
            v = torch.cat([v, self.bias_v.view(1, H, 1, hd).expand(B, H, 1, hd).to(v.dtype)], 2)
            extra += 1
        if self.add_zero_attn:
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
            extra += 1

        causal_offset = None
        if is_causal and (key_padding_mask is None or extra == 0):
            # torch's hint: attn_mask is the causal mask. torch itself drops the mask and runs
            # top-left causal SDPA over all keys when there is no key_padding_mask.
            causal_offset, attn_mask = 0, None
        am = None
        if attn_mask is not None:  # torch: bool True = masked; ours: True = visible
            am = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
            am = _pad_keys(am.view(1, 1, L, -1) if am.dim() == 2 else am.view(B, H, L, -1), extra)
        key_lengths = kpm = None
        if key_padding_mask is not None:
            kpm = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask
            kpm = _pad_keys(kpm.view(B, -1), extra)
            key_lengths = key_lengths_from_mask(kpm)
            if key_lengths is not None:
                kpm = None
            else:
                kpm = kpm.view(B, 1, 1, -1)
        if am is not None and kpm is not None:
            if am.dtype == torch.bool and kpm.dtype == torch.bool:
                mask = am & kpm
            else:
                mask = _additive(am, query.dtype) + _additive(kpm, query.dtype)
        else:
            mask = am if am is not None else kpm

        out, _ = attention_op(q, k, v, causal_offset=causal_offset, key_lengths=key_lengths,
                              attn_mask=mask)
        # out is (B, H, L, hd) laid out (B, L, H, hd)
        if not batched:
            return F.linear(out[0].transpose(0, 1).reshape(L, E), self.out_proj.weight,
                            self.out_proj.bias)
        if batch_first:
            return F.linear(out.transpose(1, 2).reshape(B, L, E), self.out_proj.weight,
                            self.out_proj.bias)
        # sequence first: one copy into (L, B, E), as torch's own path makes
        return F.linear(out.permute(2, 0, 1, 3).reshape(L, B, E), self.out_proj.weight,
                        self.out_proj.bias)
