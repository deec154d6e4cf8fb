"""Shared glue between torch tensors and the compiled core: threads, streams, stride views."""
import torch


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
    (B, H, W, C).
    """
    dims = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1]) if s != 1]
    merged = []
    for size, stride in reversed(dims):  # innermost first
        if merged and merged[-1][1] * merged[-1][0] == stride:
            merged[-1] = (merged[-1][0] * size, merged[-1][1])
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        t = t.contiguous()
        n = t.numel() // t.shape[-1] if t.shape[-1] else 0
        return t, 1, n, 0, t.shape[-1]
    merged += [(1, 0)] * (2 - len(merged))
    (rows, stride_row), (batch, stride_batch) = merged
    return t, batch, rows, stride_batch, stride_row
