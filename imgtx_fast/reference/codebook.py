"""Float64 reference of the codebook lookup (same semantics as csrc/include/imgtx/codebook.h)."""
import torch
import torch.nn.functional as F

# Score-matrix chunk budget: the oracle must not need an N x K buffer either.
_CHUNK_ELEMENTS = 1 << 23


def codebook_lookup(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    """Returns (indices, quantized, sqdist, counts), computed in float64.

    indices: argmin of the float64 distance (l2) or argmax of cosine similarity to the unit
    codes (cosine); exact ties go to the lowest index; codes with NaN/Inf are never picked;
    rows of z with NaN/Inf get index 0. quantized has z's dtype; sqdist = |z - quantized|^2.
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    D = codebook.shape[1]
    lead = z.shape[:-1]
    z64 = z.reshape(-1, D).double()
    c64 = codebook.double()
    code_ok = torch.isfinite(c64).all(dim=1)
    c64 = torch.where(code_ok[:, None], c64, torch.zeros_like(c64))
    if metric == "cosine":
        codes = F.normalize(c64, dim=1, eps=1e-12)
        bias = torch.zeros(c64.shape[0], dtype=torch.float64, device=z.device)
    else:
        codes = c64
        bias = (c64 * c64).sum(1)
    bias = torch.where(code_ok, bias, torch.full_like(bias, float("inf")))
    n = z64.shape[0]
    indices = torch.zeros(n, dtype=torch.int64, device=z.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, codebook.shape[0]))
    for s in range(0, n, step):
        zc = z64[s : s + step]
        score = bias - 2.0 * (zc @ codes.T) if metric == "l2" else bias - zc @ codes.T
        if metric == "l2":  # add |z|^2 so near-ties are compared at the true distance scale
            score = score + (zc * zc).sum(1, keepdim=True)
        indices[s : s + step] = score.argmin(1)
    row_ok = torch.isfinite(z64).all(dim=1)
    indices = torch.where(row_ok, indices, torch.zeros_like(indices))
    quantized = (codes[indices] if metric == "cosine" else codebook.double()[indices])
    quantized = quantized.float().to(z.dtype)  # via fp32, as the kernels round
    sqdist = ((z64 - quantized.double()) ** 2).sum(1).float()
    counts = torch.bincount(indices, minlength=codebook.shape[0])
    return indices.reshape(lead), quantized.reshape(z.shape), sqdist.reshape(lead), counts


def codebook_lookup_differentiable(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    """codebook_lookup with the op's gradients: quantized is straight-through to z; sqdist is
    |z - c_idx|^2 with the argmin held fixed (differentiable in z and in the codebook)."""
    indices, quantized, sqdist, counts = codebook_lookup(z.detach(), codebook.detach(), metric)
    if torch.is_grad_enabled() and (z.requires_grad or codebook.requires_grad):
        codes = F.normalize(codebook, dim=1, eps=1e-12) if metric == "cosine" else codebook
        live = ((z.float() - codes[indices].float()) ** 2).sum(-1)
        sqdist = sqdist + (live - live.detach())  # the kernel's value, the formula's gradient
        quantized = quantized + (z - z.detach())  # straight-through, value kept exact
    return indices, quantized, sqdist, counts
