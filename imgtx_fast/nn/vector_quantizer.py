"""VectorQuantizer: a drop-in for taming-transformers' VQGAN quantizer on the fused lookup.

Same construction, state dict (`embedding.weight`), forward contract and loss as
`taming.modules.vqvae.quantize.VectorQuantizer2`; optional cosine metric, EMA codebook and
dead-code restarts as in vector-quantize-pytorch. Every forward makes exactly one call of
`imgtx_fast.codebook_lookup`, so no N x K distance or one-hot matrix is ever built.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.codebook import codebook_lookup

__all__ = ["VectorQuantizer"]


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantizer with taming's interface.

    forward(z) -> (z_q, loss, (perplexity, None, indices)):
      z: (B, C, *spatial) with C == dim (channel_last=False, taming's layout) or (..., dim).
      z_q: z's shape and layout, straight-through gradient to z.
      loss: legacy=True (taming's default, its beta bug kept so trained models behave the same):
        mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2);
        legacy=False: beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2);
        ema=True: beta * mean((sg(z_q) - z)^2) only (the codebook follows the EMA, not grads).
        Computed in float32 whatever z's dtype.
      perplexity: exp(entropy of code usage in the batch).
      None stands where taming returns the one-hot (N, K) `min_encodings`: it is deliberately
        not built (O(N K) memory); the usage counts give the same perplexity.
      indices: flat int64 (N,) code indices, taming's `min_encoding_indices`.

    metric="cosine" l2-normalises z and the codes before the lookup (z_q is then the unit code).
    ema=True: the codebook is an exponential moving average of its assigned vectors
    (buffers `cluster_size`, `embed_sum`; Laplace-smoothed as in VQ-VAE-2), updated in training
    mode. dead_code_threshold > 0: in training mode, codes used less than that (EMA usage with
    ema=True, usage in the batch otherwise) are restarted from random vectors of the batch.
    """

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25, *, metric: str = "l2",
                 ema: bool = False, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_threshold: float = 0, legacy: bool = True, channel_last: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None):
        super().__init__()
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes}, {dim}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.metric, self.ema, self.decay, self.eps = metric, ema, decay, eps
        self.dead_code_threshold = dead_code_threshold
        self.legacy, self.channel_last = legacy, channel_last
        # taming's names, for code that reads them off the quantizer
        self.n_e, self.e_dim = num_codes, dim

        self.embedding = nn.Embedding(num_codes, dim, device=device, dtype=dtype)
        self.embedding.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)  # taming's init
        if ema:
            # The EMA owns the codebook: keep optimizers (and weight decay) off it.
            self.embedding.weight.requires_grad_(False)
            # VQ-VAE-2 / vector-quantize-pytorch start: no usage yet, sums = the initial codes.
            self.register_buffer("cluster_size", torch.zeros(num_codes, device=device, dtype=dtype))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())

    def extra_repr(self) -> str:
        return (f"{self.num_codes}, {self.dim}, beta={self.beta}, metric={self.metric!r}, "
                f"ema={self.ema}, legacy={self.legacy}, channel_last={self.channel_last}, "
                f"dead_code_threshold={self.dead_code_threshold}")

    def forward(self, z: Tensor, temp=None, rescale_logits: bool = False, return_logits: bool = False):
        # taming's extra arguments exist only for interface compatibility with GumbelQuantize
        assert temp is None or temp == 1.0, "Only for interface compatible with Gumbel"
        assert not rescale_logits, "Only for interface compatible with Gumbel"
        assert not return_logits, "Only for interface compatible with Gumbel"
        if self.channel_last:
            if z.dim() < 1 or z.shape[-1] != self.dim:
                raise ValueError(f"VectorQuantizer: expected z of shape (..., {self.dim}), "
                                 f"got {tuple(z.shape)}")
            z_cl = z
        else:
            if z.dim() < 2 or z.shape[1] != self.dim:
                raise ValueError(f"VectorQuantizer: expected z of shape (B, {self.dim}, ...), "
                                 f"got {tuple(z.shape)}")
            # A strided view, not a copy: the op reads (B, H, W, C) permuted views in place.
            z_cl = z.movedim(1, -1)
        if self.metric == "cosine":
            z_cl = F.normalize(z_cl, dim=-1, eps=1e-12)

        weight = self.embedding.weight
        # Codebook detached: sqdist's gradient then reaches z only (the commitment term); the
        # codebook term comes from the cheap gather below, so each side gets its own weight.
        out = codebook_lookup(z_cl, weight.detach(), metric=self.metric, return_stats=True)
        n = out.sqdist.numel()
        commitment = out.sqdist.sum() / (n * self.dim)

        if self.ema:
            loss = self.beta * commitment
        else:
            q_c = F.embedding(out.indices, weight)
            if self.metric == "cosine":
                # normalise the gathered rows, not the table: O(N D) and weight is not saved
                q_c = F.normalize(q_c, dim=-1, eps=1e-12)
            codebook_term = (q_c.float() - z_cl.detach().float()).pow(2).mean()
            if self.legacy:
                loss = commitment + self.beta * codebook_term
            else:
                loss = self.beta * commitment + codebook_term

        p = out.counts.float() / max(n, 1)
        perplexity = torch.exp(-torch.sum(p * torch.log(p + 1e-10)))

        if self.training and n > 0:
            self._update_codebook(z_cl.detach(), out.indices, out.counts)

        z_q = out.quantized
        if not self.channel_last:
            # taming returns a contiguous (B, C, H, W) tensor; callers may .view() it
            z_q = z_q.movedim(-1, 1).contiguous()
        return z_q, loss, (perplexity, None, out.indices.reshape(-1))

    @torch.no_grad()
    def _update_codebook(self, z_cl: Tensor, indices: Tensor, counts: Tensor) -> None:
        # Writes go through `.data`, invisible to autograd's version counters, so a graph
        # built before the update (the codebook term's gather) still backpropagates; no
        # gradient depends on the values written here.
        weight = self.embedding.weight.data
        flat = z_cl.reshape(-1, self.dim).float()
        K = self.num_codes
        if self.ema:
            d = self.decay
            batch_sum = torch.zeros(K, self.dim, dtype=torch.float32, device=flat.device)
            batch_sum.index_add_(0, indices.reshape(-1), flat)
            cluster_size = self.cluster_size.float() * d + counts.float() * (1.0 - d)
            embed_sum = self.embed_sum.float() * d + batch_sum * (1.0 - d)
            # Laplace smoothing keeps unused codes from dividing by zero
            total = cluster_size.sum()
            smoothed = (cluster_size + self.eps) / (total + K * self.eps) * total
            new_weight = embed_sum / smoothed.unsqueeze(1)
            if self.metric == "cosine":
                new_weight = F.normalize(new_weight, dim=-1, eps=1e-12)
            usage = cluster_size
        else:
            usage = counts
        if self.dead_code_threshold > 0:
            dead = usage < self.dead_code_threshold
            # K draws every step instead of `if dead.any()`: no host sync, no data-dependent
            # shapes; rows of dead codes take the drawn batch vectors.
            rows = torch.randint(0, flat.shape[0], (K,), device=flat.device)
            sampled = flat[rows]
            if self.ema:
                new_weight = torch.where(dead.unsqueeze(1), sampled, new_weight)
                thr = float(self.dead_code_threshold)
                cluster_size = torch.where(dead, torch.full_like(cluster_size, thr), cluster_size)
                embed_sum = torch.where(dead.unsqueeze(1), sampled * thr, embed_sum)
            else:
                new_weight = torch.where(dead.unsqueeze(1), sampled.to(weight.dtype), weight)
        if self.ema:
            self.cluster_size.copy_(cluster_size)
            self.embed_sum.copy_(embed_sum)
        if self.ema or self.dead_code_threshold > 0:
            weight.copy_(new_weight)

    def get_codebook_entry(self, indices: Tensor, shape: Optional[Sequence[int]] = None) -> Tensor:
        """Codes for `indices`; with shape (B, H, W, C) returns (B, C, H, W) like taming
        ((B, H, W, C) itself when channel_last=True). Unit codes for metric='cosine'."""
        z_q = self.embedding(indices)
        if self.metric == "cosine":
            z_q = F.normalize(z_q, dim=-1, eps=1e-12)
        if shape is not None:
            z_q = z_q.view(shape)
            if not self.channel_last:
                z_q = z_q.movedim(-1, 1).contiguous()
        return z_q

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A taming checkpoint has only embedding.weight: start the EMA from it (no usage yet,
        # sums = the loaded codes) rather than failing a strict load.
        key = prefix + "embedding.weight"
        if self.ema and key in state_dict:
            w = state_dict[key]
            if prefix + "cluster_size" not in state_dict:
                state_dict[prefix + "cluster_size"] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            if prefix + "embed_sum" not in state_dict:
                state_dict[prefix + "embed_sum"] = w.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
