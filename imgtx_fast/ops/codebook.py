"""torch.ops.imgtx.codebook_lookup: fused nearest-code search (VQ) with its training outputs.

One pass gives the index, the quantized vector, |z - q|^2 per row (the commitment term) and
per-code usage counts; no N x K distance matrix is ever formed. Semantics: see
csrc/include/imgtx/codebook.h (exact float64 argmin, lowest index on ties).
"""
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from .. import _C
from .._backend import get_backend
from .._dtypes import float_code
from .._frontend import codebook as _array_codebook
from .._frontend.codebook import _METRICS, _OP, check_metric_and_shapes
from ..reference import codebook as _reference
from ._launch import cuda_module, cuda_stream, device_guard, eager_fast_path, num_threads, two_level_rows


class CodebookLookup(NamedTuple):
    """The torch twin of the front ends' CodebookLookup (_frontend/codebook.py): same fields."""
    indices: Tensor    # int64, z.shape[:-1]
    quantized: Tensor  # z.shape, z.dtype (straight-through gradient to z)
    sqdist: Tensor     # float32, z.shape[:-1]: |z - quantized|^2 per vector
    counts: Tensor     # int64, (K,): how many vectors chose each code


assert CodebookLookup._fields == _array_codebook.CodebookLookup._fields


def _check(z: Tensor, codebook: Tensor, metric: str, kernel_device: bool = True) -> None:
    """Every argument the kernels read: the public function's, the raw op's and its fake impl's
    check (kernel_device=False there: meta tensors have shapes, no data). Strides are free: z's
    leading dims are viewed as two levels or copied (two_level_rows), the codebook's taken as
    they are."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{_OP}: z must be a torch.Tensor, got {type(z).__name__}")
    if not isinstance(codebook, Tensor):
        raise TypeError(f"{_OP}: codebook must be a torch.Tensor, got {type(codebook).__name__}")
    float_code(z, "z", _OP)
    float_code(codebook, "codebook", _OP)
    for name, t in (("z", z), ("codebook", codebook)):
        if t.layout != torch.strided:  # sparse/mkldnn tensors have no strided data pointer
            raise TypeError(f"{_OP}: {name} must be a dense (strided) tensor, got {t.layout}")
    check_metric_and_shapes(metric, z.shape, codebook.shape)
    if z.device != codebook.device:
        raise ValueError(f"{_OP}: z and codebook must be on the same device; z is on {z.device}, codebook on {codebook.device}")
    if kernel_device and z.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{_OP}: z and codebook must be on a cpu or cuda device, got {z.device}")


@torch.library.custom_op("imgtx::codebook_lookup", mutates_args=())
def _codebook_lookup_op(z: Tensor, codebook: Tensor, metric: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (quantized, sqdist, indices, counts): floating outputs first, the order torch's
    opcheck harness needs to sum outputs for its autograd checks."""
    _check(z, codebook, metric)
    return _lookup(z, codebook, metric)


def _lookup(z: Tensor, codebook: Tensor, metric: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's implementation, arguments already checked."""
    lead, (K, D) = z.shape[:-1], codebook.shape
    indices = torch.empty(lead, dtype=torch.int64, device=z.device)
    quantized = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    sqdist = torch.empty(lead, dtype=torch.float32, device=z.device)
    counts = torch.zeros(K, dtype=torch.int64, device=z.device)
    if indices.numel() == 0:
        return quantized, sqdist, indices, counts
    zv, batch, rows, s_batch, s_row = two_level_rows(z)
    args = (zv.data_ptr(), float_code(z, "z", _OP), batch, rows, D, s_batch, s_row, zv.stride(-1),
            codebook.data_ptr(), float_code(codebook, "codebook", _OP), K,
            codebook.stride(0), codebook.stride(1), _METRICS[metric],
            indices.data_ptr(), quantized.data_ptr(), sqdist.data_ptr(), counts.data_ptr())
    cuda = cuda_module(z)
    if cuda is not None:
        with device_guard(z):
            size = cuda.codebook_lookup_cuda_workspace_size(batch, rows, D, K)
            workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=z.device)
            cuda.codebook_lookup_cuda(*args, workspace.data_ptr(), cuda_stream(z))
    else:
        _C.codebook_lookup_cpu(*args, num_threads())
    return quantized, sqdist, indices, counts


@_codebook_lookup_op.register_fake
def _(z, codebook, metric):
    _check(z, codebook, metric, kernel_device=False)
    lead = z.shape[:-1]
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty(lead, dtype=torch.float32), z.new_empty(lead, dtype=torch.int64),
            z.new_empty(codebook.shape[0], dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    z, codebook, metric = inputs
    quantized, _, indices, _ = output
    ctx.metric = metric
    # Save the codebook only when its gradient is wanted, so an in-place codebook update under
    # no_grad (EMA, dead-code restarts) between forward and backward stays legal.
    ctx.save_for_backward(z, codebook if ctx.needs_input_grad[1] else None, indices, quantized)


def _backward(ctx, grad_quantized, grad_sqdist, grad_indices, grad_counts):
    """quantized: straight-through to z. sqdist = |z - c_idx|^2 with the argmin held fixed:
    d/dz = 2 (z - q), d/dc_idx = -2 (z - q) (through the normalisation for cosine)."""
    z, codebook, indices, quantized = ctx.saved_tensors
    grad_z = grad_cb = None
    if grad_sqdist is not None:
        diff = 2.0 * (z.float() - quantized.float()) * grad_sqdist.float().unsqueeze(-1)
    if ctx.needs_input_grad[0]:
        grad_z = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
        if grad_quantized is not None:
            grad_z = grad_z + grad_quantized.float()
        if grad_sqdist is not None:
            grad_z = grad_z + diff
        grad_z = grad_z.to(z.dtype)
    if ctx.needs_input_grad[1]:
        D = codebook.shape[1]  # saved whenever this gradient is needed
        g = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        if grad_sqdist is not None:
            g = g.index_add(0, indices.reshape(-1), -diff.reshape(-1, D))
        if ctx.metric == "cosine":  # d(c / max(|c|, eps)) = (I - c^ c^T) / |c| above eps
            c = codebook.float()
            norm = c.norm(dim=1, keepdim=True)
            unit = c / norm.clamp_min(1e-12)
            radial = torch.where(norm > 1e-12, unit * (unit * g).sum(1, keepdim=True), 0.0)
            g = (g - radial) / norm.clamp_min(1e-12)
        grad_cb = g.to(codebook.dtype)
    return grad_z, grad_cb, None


_codebook_lookup_op.register_autograd(_backward, setup_context=_setup_context)


def codebook_lookup(z: Tensor, codebook: Tensor, *, metric: str = "l2", return_stats: bool = False):
    """Nearest code for every vector of z (..., D) in codebook (K, D).

    Returns (indices, quantized); with return_stats=True a CodebookLookup named tuple that also
    holds sqdist (|z - quantized|^2 per vector, the commitment term) and counts (usage per
    code), from the same pass. metric='cosine' compares directions and returns unit codes.
    quantized passes gradients straight through to z; sqdist is differentiable in z and in
    the codebook. Uses the plain-PyTorch reference when imgtx_fast.set_backend('reference').
    """
    # Meta tensors (deferred init, shape inference) take the op, whose meta kernel is the fake
    # impl: the right shapes and dtypes, no data read.
    meta = isinstance(z, Tensor) and z.device.type == "meta"
    _check(z, codebook, metric, kernel_device=not meta)  # before the dispatcher: our messages
    if get_backend() == "reference" and not meta:
        out = CodebookLookup(*_reference.codebook_lookup_differentiable(z, codebook, metric))
    else:
        run = _lookup if eager_fast_path(z, codebook) else torch.ops.imgtx.codebook_lookup
        quantized, sqdist, indices, counts = run(z, codebook, metric)
        out = CodebookLookup(indices, quantized, sqdist, counts)
    return out if return_stats else (out.indices, out.quantized)
