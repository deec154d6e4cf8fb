"""Framework-free glue between array objects (numpy, cupy) and the compiled core's integer
arguments: dtype codes, element strides and the two-level row view. No torch import here: the
numpy and cupy front ends must load without it. Works on anything with numpy's array attributes
(shape, strides in bytes, dtype, itemsize), which cupy.ndarray has too.
"""
from typing import Optional, Sequence, Tuple

import numpy as np

# csrc/include/imgtx/dtype.h, keyed by dtype (a dict lookup: dtype.name costs microseconds).
# bfloat16 is not a numpy dtype; ml_dtypes' bfloat16 (what JAX hands to numpy) is matched by
# name, so no ml_dtypes import is needed.
_FLOAT_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}


def float_code(a, name: str, op: str) -> int:
    """The DType code of a floating array; TypeError naming the argument otherwise (the torch
    ops' message, _dtypes.float_code, with numpy's dtype names)."""
    code = _FLOAT_CODES.get(a.dtype)
    if code is not None:
        return code
    if a.dtype.name == "bfloat16" and a.dtype.itemsize == 2:
        return 2
    raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {a.dtype}")


def is_integer(a) -> bool:
    """numpy kinds 'i'/'u' (bool is kind 'b', floats 'f', complex 'c')."""
    return a.dtype.kind in "iu"


def element_strides(a) -> Optional[Tuple[int, ...]]:
    """Strides in elements, as the kernels take them, or None when the view cannot be passed as
    is: a byte stride that is not a whole number of elements, or a negative stride (torch has
    none, so the kernels were never run on one; such views are copied)."""
    item = a.itemsize
    out = []
    for s in a.strides:
        if s < 0 or s % item:
            return None
        out.append(s // item)
    return tuple(out)


def two_level_rows(shape: Sequence[int], strides: Sequence[int]):
    """View the leading dims of an (..., D) array as (batch, rows) with one stride each.

    Returns (batch, rows, stride_batch, stride_row), or None when the leading dims do not
    collapse to two levels (the caller then copies). Strides in elements; the torch ops'
    ops/_launch.two_level_rows calls this with a tensor's shape and stride(). Contiguous
    inputs, column slices of fused projections and (B, C, H, W) transposed to (B, H, W, C) all
    pass without a copy.
    """
    dims = [(s, st) for s, st in zip(shape[:-1], strides[:-1]) if s != 1]
    merged = []
    for size, stride in reversed(dims):  # innermost first
        if merged and merged[-1][1] * merged[-1][0] == stride:
            merged[-1] = (merged[-1][0] * size, merged[-1][1])
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        return None
    merged += [(1, 0)] * (2 - len(merged))
    (rows, stride_row), (batch, stride_batch) = merged
    return batch, rows, stride_batch, stride_row
