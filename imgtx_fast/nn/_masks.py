"""Turn a key-padding mask into per-batch key lengths, when that changes no result.

Why: the fused attention kernel takes `key_lengths` (keys j >= len[b] are padding) and then
skips the padded key tiles outright, while a general mask is read for every (query, key)
pair. Masks that callers build for padded batches (torch's `key_padding_mask`, diffusers'
`(1 - mask) * -10000.0` encoder bias) usually hide a suffix of the keys, the same for every
query and head, so the modules here convert them. Any other mask is passed through as it is.
"""
from typing import Optional

import torch
from torch import Tensor

# An additive bias at or below this hides a key: exp(-1000 + d) is 0 in float32 unless the key's
# logit exceeds its row's maximum by ~900. diffusers writes -10000 (-9984 in bfloat16),
# transformers the dtype's minimum, torch -inf.
MASKED_BIAS = -1000.0


def key_lengths_from_mask(mask: Tensor) -> Optional[Tensor]:
    """key_lengths (B,) int64 equivalent to `mask`, or None where there is none.

    mask: (B, ..., S), the same key mask for every middle index (heads, queries); bool with
    True = visible, or an additive float bias. It converts when each batch row shows exactly
    the keys [0, len_b): bool True there and False after; float exactly 0 there and
    <= MASKED_BIAS after. A row that hides every key converts only with -inf (bool False):
    a finite bias on every key leaves the softmax unchanged, which key_lengths 0 would not.
    Reads one bool back from the device.
    """
    if (mask.dim() < 1 or mask.shape[0] == 0 or mask.device.type == "meta"  # meta: no data
            or torch._C._are_functorch_transforms_active()):  # vmap: no single value to read
        return None
    B, S = mask.shape[0], mask.shape[-1]
    rows = mask.reshape(B, -1, S)
    if rows.shape[1] == 0:
        return None
    if mask.dtype == torch.bool:
        visible, hidden = rows, ~rows
    elif mask.is_floating_point():
        visible, hidden = rows == 0, rows <= MASKED_BIAS
    else:
        return None
    lengths = visible[:, 0, :].sum(-1)
    prefix = (torch.arange(S, device=mask.device) < lengths[:, None])[:, None, :]
    ok = (visible == prefix).all() & (hidden == ~prefix).all()
    if mask.is_floating_point():
        ok &= ~((lengths == 0)[:, None, None] & ~torch.isneginf(rows)).any()
    return lengths if bool(ok) else None
