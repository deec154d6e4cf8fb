"""attention for the framework-free front ends: ops/fused_attention.py's checks (attention,
attention_op, _check) and its forward kernel call, on arrays. The kernels' argument encoding
(pattern_args, NO_MASK, mask_arg) and the shape checks (check_shapes) live here only: the
torch op imports them."""
import math
from typing import List

import numpy as np

from .. import _C
from ..patterns import MAX_FIELD, Local1d, Local2d
from .arrays import element_strides, float_code
from .common import check_real, dense_last, same_device, strided

_OP = "attention"
_MAX_HEAD_DIM = 256
_NO_CAUSAL = _C.ATTN_NO_CAUSAL
LSE_EMPTY = float(np.finfo(np.float32).min)  # reference.attention.LSE_EMPTY: a query sees no key

# The kernels' pattern list [kind, block, filter_width, causal, height, width, qh, qw, fh, fw]
# and mask kinds (csrc/bindings/attention.cpp), for this module and ops/fused_attention.py.
_DENSE, _LOCAL1D, _LOCAL2D = 0, 1, 2
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2


def pattern_args(pattern) -> List[int]:
    if pattern is None:
        return [_DENSE, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    if isinstance(pattern, Local1d):
        return [_LOCAL1D, pattern.block, pattern.filter_width, int(pattern.causal), 0, 0, 0, 0, 0, 0]
    if isinstance(pattern, Local2d):
        (qh, qw), (fh, fw) = pattern.query_shape, pattern.memory_flange
        # A query tile wider (taller) than the image is the whole width (height): the same
        # pattern, and the kernels' in-tile positions (r - r0) * qw + (c - c0) then stay below
        # height * width instead of overflowing their 32 bits.
        qh, qw = min(qh, pattern.height), min(qw, pattern.width)
        return [_LOCAL2D, 0, 0, int(pattern.causal), pattern.height, pattern.width, qh, qw, fh, fw]
    raise TypeError(f"{_OP}: pattern must be Local1d, Local2d or None, got {type(pattern).__name__}")


def pattern_from_args(args: List[int], op: str = _OP):
    """The Local1d / Local2d / None that the kernels' pattern list encodes (pattern_args'
    inverse). The raw ops take the list: building the pattern checks every field of it."""
    if len(args) != 10:
        raise ValueError(f"{op}: pattern must be the kernels' list of 10 ints (pattern_args), "
                         f"got {len(args)} entries")
    kind, causal = args[0], args[3]
    if causal not in (0, 1):
        raise ValueError(f"{op}: pattern[3] (causal) must be 0 or 1, got {causal}")
    if kind == _DENSE:
        return None
    try:
        if kind == _LOCAL1D:
            return Local1d(block=args[1], causal=bool(causal), filter_width=args[2])
        if kind == _LOCAL2D:
            return Local2d(args[4], args[5], (args[6], args[7]), (args[8], args[9]), bool(causal))
    except (TypeError, ValueError) as e:  # the field's own message, with the op and argument
        raise type(e)(f"{op}: pattern {list(args)}: {e}") from None
    raise ValueError(f"{op}: pattern[0] (kind) must be {_DENSE} (dense), {_LOCAL1D} (Local1d) or "
                     f"{_LOCAL2D} (Local2d), got {kind}")


def kernel_causal_offset(offset: int) -> int:
    """causal_offset as the kernels take it: query i sees keys j <= i + offset. Past +-2^31 every
    offset means the same (all keys, or none, as i and j are below 2^31), so it is clamped there
    and i + offset never overflows their int64 arithmetic. _NO_CAUSAL passes through."""
    if offset == _NO_CAUSAL:
        return offset
    return max(-MAX_FIELD - 1, min(offset, MAX_FIELD + 1))


NO_MASK = (0, _MASK_NONE, 0, 0, 0, 0, 0)  # the kernels' attn_mask argument without a mask


def mask_arg(ptr: int, dtype_code, strides) -> tuple:
    """The kernels' attn_mask argument (ptr, kind, dtype code, its 4 strides in elements):
    dtype_code None for a bool mask (True = visible), else the additive float mask's code."""
    if dtype_code is None:
        return (ptr, _MASK_BOOL, 0) + tuple(strides)
    return (ptr, _MASK_ADD, dtype_code) + tuple(strides)


def check_shapes(q_shape, k_shape, v_shape, pattern) -> None:
    """The checks of q (B, H, Nq, D), k/v (B, Hkv, Nk, D[v]) shapes against each other and
    against the pattern, on shapes (tuples or torch.Size): the torch op's and the front ends'."""
    B, H, Nq, D = q_shape
    if k_shape[0] != B or v_shape[0] != B:
        raise ValueError(f"{_OP}: batch sizes differ: q {B}, k {k_shape[0]}, v {v_shape[0]}")
    if k_shape[1] != v_shape[1] or k_shape[2] != v_shape[2]:
        raise ValueError(f"{_OP}: k and v must have the same (B, heads, N), got {tuple(k_shape)} "
                         f"and {tuple(v_shape)}")
    Hkv = k_shape[1]
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{_OP}: k/v heads ({Hkv}) must divide q heads ({H}) (GQA/MQA)")
    if k_shape[3] != D:
        raise ValueError(f"{_OP}: q and k head dims differ: {D} and {k_shape[3]}")
    for name, d in (("q/k", D), ("v", v_shape[3])):
        if not 1 <= d <= _MAX_HEAD_DIM:
            raise ValueError(f"{_OP}: {name} head dim must be in [1, {_MAX_HEAD_DIM}], got {d}")
    for name, n in (("q", Nq), ("k", k_shape[2])):
        if n > MAX_FIELD:
            raise ValueError(f"{_OP}: {name} sequence length must be < 2^31, got {n}")
    if pattern is not None:
        if not isinstance(pattern, (Local1d, Local2d)):
            raise TypeError(f"{_OP}: pattern must be Local1d, Local2d or None, got {type(pattern).__name__}")
        pattern.check(Nq, k_shape[2])


def _check(rt, q, k, v, key_lengths, attn_mask, pattern, scale):
    arrays = {}
    for name, t in (("q", q), ("k", k), ("v", v)):
        t = arrays[name] = rt.array(t, name, _OP)
        float_code(t, name, _OP)
        if t.ndim != 4:
            raise ValueError(f"{_OP}: {name} must be 4-D (B, heads, N, D), got shape {tuple(t.shape)}")
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{_OP}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = same_device(rt, _OP, q=q, k=k, v=v)
    check_shapes(q.shape, k.shape, v.shape, pattern)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if key_lengths is not None:
        key_lengths = rt.array(key_lengths, "key_lengths", _OP)
        if key_lengths.dtype.kind != "i" or key_lengths.dtype.itemsize not in (4, 8):
            raise TypeError(f"{_OP}: key_lengths must be an int32/int64 array of shape ({B},)")
        if tuple(key_lengths.shape) != (B,):
            raise ValueError(f"{_OP}: key_lengths must have shape ({B},), got {tuple(key_lengths.shape)}")
        if rt.device(key_lengths) != device:
            raise ValueError(f"{_OP}: key_lengths is on {rt.device(key_lengths)}, q on {device}")
        # Values are data: the torch op reads them on the CPU only (a GPU read would sync).
        if rt.host and key_lengths.size and (int(key_lengths.min()) < 0 or int(key_lengths.max()) > Nk):
            raise ValueError(f"{_OP}: key_lengths must be in [0, {Nk}], got values in "
                             f"[{int(key_lengths.min())}, {int(key_lengths.max())}]")
    if attn_mask is not None:
        attn_mask = rt.array(attn_mask, "attn_mask", _OP)
        if attn_mask.dtype != np.bool_:
            float_code(attn_mask, "attn_mask", _OP)
        try:
            ok = (attn_mask.ndim <= 4
                  and np.broadcast_shapes(attn_mask.shape, (B, H, Nq, Nk)) == (B, H, Nq, Nk))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{_OP}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to (B, H, Nq, Nk) = {(B, H, Nq, Nk)}")
        if rt.device(attn_mask) != device:
            raise ValueError(f"{_OP}: attn_mask is on {rt.device(attn_mask)}, q on {device}")
    check_real(scale, "scale", _OP, optional=True)
    return q, k, v, key_lengths, attn_mask, device


def _tensor_arg(rt, a, st, name):
    return (rt.ptr(a), float_code(a, name, _OP), st[0], st[1], st[2])


def _mask_view(rt, mask, shape):
    """attn_mask expanded to (B, H, Nq, Nk) by stride-0 views (no copy). The caller keeps the
    view alive until the kernel has run: it may be the only owner of a copied mask."""
    if mask is None:
        return None
    mask, _ = strided(rt, mask)
    return rt.xp.broadcast_to(mask, shape)


def _mask_arg(rt, mask):
    if mask is None:
        return NO_MASK
    code = None if mask.dtype == np.bool_ else float_code(mask, "attn_mask", _OP)
    return mask_arg(rt.ptr(mask), code, element_strides(mask))


def attention(rt, q, k, v, causal, key_lengths, attn_mask, pattern, scale, return_lse):
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {type(causal).__name__}")
    if causal and pattern is not None:
        raise ValueError(f"{_OP}: a pattern carries its own causality; pass causal=False with it")
    q, k, v, key_lengths, attn_mask, device = _check(rt, q, k, v, key_lengths, attn_mask, pattern, scale)
    xp = rt.xp
    B, H, Nq, D = q.shape
    Hkv, Nk, Dv = v.shape[1], v.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    offset = Nk - Nq if causal else _NO_CAUSAL
    with rt.on_device(device):
        # (B, N, H, D) memory like the torch op's output: what an output projection wants.
        out = xp.empty((B, Nq, H, Dv), dtype=q.dtype).transpose(0, 2, 1, 3)
        lse = xp.empty((B, H, Nq), dtype=xp.float32)
        if out.size == 0:
            lse.fill(LSE_EMPTY)
            return (out, lse) if return_lse else out
        if key_lengths is not None:
            key_lengths = xp.ascontiguousarray(key_lengths, dtype=xp.int64)
        (q, qs), (k, ks), (v, vs) = dense_last(rt, q), dense_last(rt, k), dense_last(rt, v)
        ost = element_strides(out)
        mask = _mask_view(rt, attn_mask, (B, H, Nq, Nk))
        args = ((B, H, Hkv, Nq, Nk, D, Dv), _tensor_arg(rt, q, qs, "q"), _tensor_arg(rt, k, ks, "k"),
                _tensor_arg(rt, v, vs, "v"), (rt.ptr(out), ost[0], ost[1], ost[2]), rt.ptr(lse),
                scale, int(offset), _mask_arg(rt, mask),
                rt.ptr(key_lengths) if key_lengths is not None else 0, pattern_args(pattern))
        rt.attention_forward(args)
    return (out, lse) if return_lse else out
