"""Shared glue between torch tensors and the compiled core: threads, streams, stride views."""
import torch

from .._frontend.arrays import two_level_rows as _two_level_rows


def num_threads() -> int:
    """The CPU kernels use exactly torch's intra-op thread count, so they never oversubscribe."""
    return max(1, torch.get_num_threads())


def cuda_stream(t: torch.Tensor) -> int:
    """The current stream of t's device, read on every call (never cached: graph capture)."""
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
