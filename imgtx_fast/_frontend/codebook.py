"""codebook_lookup for the framework-free front ends: ops/codebook.py's checks and kernel call.
The metric and shape checks (check_metric_and_shapes) live here only: the torch op imports them."""
from typing import Any, NamedTuple

from .arrays import element_strides, float_code, two_level_rows
from .common import same_device, strided

_METRICS = {"l2": 0, "cosine": 1}
_INT32_MAX = 2**31 - 1
_OP = "codebook_lookup"


class CodebookLookup(NamedTuple):
    # The same fields as ops/codebook.CodebookLookup (there typed Tensor; it asserts they agree).
    indices: Any    # int64, z.shape[:-1]
    quantized: Any  # z.shape, z.dtype
    sqdist: Any     # float32, z.shape[:-1]: |z - quantized|^2 per vector
    counts: Any     # int64, (K,): how many vectors chose each code


def check_metric_and_shapes(metric, z_shape, codebook_shape) -> None:
    """metric, codebook (K, D) and z (..., D), on shapes (tuples or torch.Size): the torch
    op's checks and the front ends'."""
    if not isinstance(metric, str) or metric not in _METRICS:
        raise ValueError(f"{_OP}: metric must be 'l2' or 'cosine', got {metric!r}")
    if len(codebook_shape) != 2:
        raise ValueError(f"{_OP}: codebook must be 2-D (K, D), got shape {tuple(codebook_shape)}")
    K, D = codebook_shape
    if K == 0:
        raise ValueError(f"{_OP}: codebook is empty (K = 0)")
    if K > _INT32_MAX:
        raise ValueError(f"{_OP}: codebook has {K} codes; at most 2^31 - 1 are supported")
    if D == 0:
        raise ValueError(f"{_OP}: codebook has D = 0")
    if len(z_shape) == 0 or z_shape[-1] != D:
        raise ValueError(
            f"{_OP}: z must have shape (..., D) with D = {D} (codebook's), got {tuple(z_shape)}")


def _check(rt, z, codebook, metric):
    z = rt.array(z, "z", _OP)
    codebook = rt.array(codebook, "codebook", _OP)
    float_code(z, "z", _OP)
    float_code(codebook, "codebook", _OP)
    check_metric_and_shapes(metric, z.shape, codebook.shape)
    return z, codebook, same_device(rt, _OP, z=z, codebook=codebook)


def codebook_lookup(rt, z, codebook, metric: str, return_stats: bool):
    z, codebook, device = _check(rt, z, codebook, metric)
    xp = rt.xp
    lead, (K, D) = z.shape[:-1], codebook.shape
    with rt.on_device(device):
        indices = xp.empty(lead, dtype=xp.int64)
        quantized = xp.empty(z.shape, dtype=z.dtype)
        sqdist = xp.empty(lead, dtype=xp.float32)
        counts = xp.zeros(K, dtype=xp.int64)
        if indices.size:
            z, zs = strided(rt, z)
            rows = two_level_rows(z.shape, zs)
            if rows is None:  # leading dims that do not collapse to two levels: the one copy
                z = xp.ascontiguousarray(z)
                zs = element_strides(z)
                rows = two_level_rows(z.shape, zs)
            batch, n, s_batch, s_row = rows
            codebook, cs = strided(rt, codebook)
            args = (rt.ptr(z), float_code(z, "z", _OP), batch, n, D, s_batch, s_row, zs[-1],
                    rt.ptr(codebook), float_code(codebook, "codebook", _OP), K, cs[0], cs[1],
                    _METRICS[metric], rt.ptr(indices), rt.ptr(quantized), rt.ptr(sqdist),
                    rt.ptr(counts))
            rt.codebook_lookup(args, (batch, n, D, K))
    out = CodebookLookup(indices, quantized, sqdist, counts)
    return out if return_stats else (out.indices, out.quantized)
