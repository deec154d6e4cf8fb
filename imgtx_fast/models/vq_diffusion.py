"""VQ-Diffusion's diffusion transformer on imgtx_fast's fused ops.

    cfg = VQDiffusionConfig(num_codes=512, height=8, width=8, condition="class", num_classes=10)
    model = VQDiffusionTransformer(cfg)                      # backend=None: follow set_backend
    loss = model.training_loss(x0_tokens, labels, sampler=TimestepSampler(cfg.num_timesteps))
    tokens = model.sample(labels, num_steps=25, guidance_scale=3.0, truncation_rate=0.86)

The network maps a noisy token grid x_t (K codes + MASK = K), the timestep t and a condition to
log p(x0 | x_t): (B, K, N) log-probabilities over the K codes, class axis 1 as diffusers and
imgtx_fast.diffusion expect. The tensor is a permuted view of a (B, N, K) buffer; the
diffusion kernels read that layout without a copy.

Architecture (VQ-Diffusion's "Text2ImageTransformer" shape): token embedding over K + 1 entries,
learned 2D (row + column) or 1D position embeddings, `depth` blocks of
[AdaLN -> self-attention, AdaLN -> cross-attention to the condition, AdaLN -> MLP] where AdaLN's
scale/shift come from a sinusoidal timestep embedding, then LayerNorm + Linear to K logits.
Every attention runs `imgtx_fast.attention` on strided views of one fused projection.

Conditions: class labels (an embedding table with an extra learned "null" class, index
num_classes) or text-encoder token embeddings (B, L, text_dim) with `cond_lengths` marking
padding (passed to the kernel as key_lengths, so padded keys are never read). The
unconditional branch of classifier-free guidance uses a learned null condition (Improved
VQ-Diffusion); training drops the condition to it with probability `cond_drop_prob`.

Backends: `backend="fast" | "reference"` runs every op of forward, training_loss and sample
inside `imgtx_fast.backend(...)`, so the same weights run on our kernels or on the plain-PyTorch
twins; backend=None follows `imgtx_fast.set_backend` / an enclosing `backend()` block.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._frontend.common import int_scalar, real_scalar
from ..diffusion import MaskAndReplaceSchedule, TimestepSampler, posterior_sample, q_sample, vb_loss
from ..ops.fused_attention import attention
from ._common import ModelBase

__all__ = ["VQDiffusionConfig", "VQDiffusionTransformer", "reverse_jumps", "sampling_timesteps"]

_CONDITIONS = ("class", "text")
_POSITIONS = ("2d", "1d")


@dataclass
class VQDiffusionConfig:
    """Everything needed to rebuild the network (saved with the weights).

    num_codes (K): codebook size of the tokenizer; MASK is the extra index K.
    height, width: the token grid (N = height * width).
    condition: "class" (num_classes labels + a null class) or "text" (text_dim-wide
        text-encoder token embeddings, projected to `dim`).
    class_tokens: a class label is embedded as this many context tokens. Why more than one:
        attention over a single key has weight 1 whatever the query, so the cross-attention's
        query projection would get no gradient and be dead weight.
    position: "2d" (row + column embeddings, as VQ-Diffusion) or "1d" (one per token).
    cond_drop_prob: training-time probability of replacing the condition with the null one,
        which classifier-free guidance needs.
    aux_weight: weight of the auxiliary x0 cross-entropy in vb_loss (VQ-Diffusion: 5e-4).
    The alpha/gamma fields are the mask-and-replace schedule (MaskAndReplaceSchedule's).
    """
    num_codes: int
    height: int
    width: int
    dim: int = 256
    depth: int = 4
    heads: int = 8
    mlp_ratio: float = 4.0
    condition: str = "class"
    num_classes: int = 10
    class_tokens: int = 4
    text_dim: int = 512
    position: str = "2d"
    num_timesteps: int = 100
    cond_drop_prob: float = 0.1
    aux_weight: float = 5e-4
    alpha_cum_start: float = 0.99999
    alpha_cum_end: float = 0.000009
    gamma_cum_start: float = 0.000009
    gamma_cum_end: float = 0.99999

    def __post_init__(self):
        def positive(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VQDiffusionConfig: {name} must be an int >= 1, got {v!r}")
        for name in ("num_codes", "height", "width", "dim", "depth", "heads", "num_classes",
                     "class_tokens", "text_dim"):
            positive(name)
        if self.dim % self.heads:
            raise ValueError(f"VQDiffusionConfig: dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.dim // self.heads > 256:
            raise ValueError(f"VQDiffusionConfig: dim / heads must be <= 256 (the attention kernel's "
                             f"head dim limit), got {self.dim // self.heads}")
        if self.condition not in _CONDITIONS:
            raise ValueError(f"VQDiffusionConfig: condition must be one of {_CONDITIONS}, got {self.condition!r}")
        if self.position not in _POSITIONS:
            raise ValueError(f"VQDiffusionConfig: position must be one of {_POSITIONS}, got {self.position!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"VQDiffusionConfig: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"VQDiffusionConfig: cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not self.aux_weight >= 0:
            raise ValueError(f"VQDiffusionConfig: aux_weight must be >= 0, got {self.aux_weight}")
        self.schedule()  # validates num_timesteps and the alpha/gamma fields

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    def schedule(self) -> MaskAndReplaceSchedule:
        return MaskAndReplaceSchedule(self.num_codes, self.num_timesteps,
                                      alpha_cum_start=self.alpha_cum_start,
                                      alpha_cum_end=self.alpha_cum_end,
                                      gamma_cum_start=self.gamma_cum_start,
                                      gamma_cum_end=self.gamma_cum_end)


# ----------------------------------------------------------------------------- skip-step sampling

def sampling_timesteps(num_timesteps: int, num_steps: int) -> List[int]:
    """The descending timesteps a `num_steps`-step sampler visits: evenly spaced from T-1 (the
    all-MASK start) down to 0, so each one calls the network once. num_steps = T visits every
    timestep; num_steps = 1 jumps from T-1 straight to x0."""
    if int_scalar(num_steps) is None or not 1 <= int_scalar(num_steps) <= num_timesteps:
        raise ValueError(f"num_steps must be an int in [1, {num_timesteps}], got {num_steps!r}")
    num_steps = int_scalar(num_steps)  # numpy integers too
    if num_steps == 1:
        return [num_timesteps - 1]
    # t_i = T-1 - round(i (T-1) / (num_steps-1)) in integers: the spacing is >= 1, so they are
    # distinct, and the last one is 0
    M, last = num_steps - 1, num_timesteps - 1
    return [last - (2 * i * last + M) // (2 * M) for i in range(num_steps)]


def reverse_jumps(timesteps: Sequence[int]) -> List[Tuple[int, int]]:
    """(t, t_prev) for each network call of a sampler visiting `timesteps` (descending): each
    call jumps exactly from x_t to x_{t_prev} (posterior_sample's t_prev), the last one to x0
    (t_prev = -1)."""
    ts = [int(t) for t in timesteps]
    return list(zip(ts, ts[1:] + [-1]))


# ----------------------------------------------------------------------------- network

def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), as in DDPM/VQ-Diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class SelfAttention(nn.Module):
    """Fused-QKV self-attention: q, k, v are (B, H, N, D) strided views of one projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)  # (B, H, N, D) laid out (B, N, H, D): the reshape is free
        return self.proj(out.transpose(1, 2).reshape(B, N, E))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys/values (one fused projection) from the condition;
    key_lengths hides the padding of text conditions from the kernel."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, key_lengths: Optional[Tensor]) -> Tensor:
        B, N, E = x.shape
        H, D = self.heads, E // self.heads
        q = self.q(x).view(B, N, H, D).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, key_lengths=key_lengths)
        return self.proj(out.transpose(1, 2).reshape(B, N, E))


class Block(nn.Module):
    """x += SA(AdaLN(x)); x += CA(AdaLN(x), cond); x += MLP(AdaLN(x)); the three (scale, shift)
    pairs come from one linear map of the timestep embedding."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ada = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, key_lengths: Optional[Tensor]) -> Tensor:
        s1, b1, s2, b2, s3, b3 = self.ada(temb).unsqueeze(1).chunk(6, dim=-1)
        x = x + self.self_attn(self.norm(x) * (1 + s1) + b1)
        x = x + self.cross_attn(self.norm(x) * (1 + s2) + b2, context, key_lengths)
        return x + self.mlp(self.norm(x) * (1 + s3) + b3)


class VQDiffusionTransformer(ModelBase):
    """log p(x0 | x_t, t, cond) over K codes; training_loss and sample on imgtx_fast.diffusion.

    backend: "fast", "reference" or None (follow imgtx_fast.set_backend); a runtime choice, not
    saved with the weights (assign `model.backend` to switch). save / load / state: see
    models._common.ModelBase.
    """

    config_class = VQDiffusionConfig
    checkpoint_format = "imgtx_fast.vq_diffusion/1"

    def __init__(self, config: VQDiffusionConfig, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, VQDiffusionConfig):
            raise TypeError(f"VQDiffusionTransformer: config must be a VQDiffusionConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.backend = backend
        self.schedule = cfg.schedule()
        E = cfg.dim
        self.token_emb = nn.Embedding(cfg.num_codes + 1, E)  # + MASK
        if cfg.position == "2d":
            self.row_emb = nn.Parameter(torch.randn(cfg.height, E) * 0.02)
            self.col_emb = nn.Parameter(torch.randn(cfg.width, E) * 0.02)
        else:
            self.pos_emb = nn.Parameter(torch.randn(cfg.num_tokens, E) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, E), nn.SiLU())
        if cfg.condition == "class":
            # last row: the null class; each row holds class_tokens context tokens
            self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.class_tokens * E)
        else:
            self.text_proj = nn.Linear(cfg.text_dim, E)
            self.null_context = nn.Parameter(torch.randn(1, E) * 0.02)
        self.blocks = nn.ModuleList(Block(E, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(E)
        self.to_logits = nn.Linear(E, cfg.num_codes)

    # -- input checks -----------------------------------------------------------------------
    def _tokens(self, x: Tensor, name: str, op: str, allow_mask: bool) -> Tensor:
        """(B, h, w) or (B, N) integer tokens -> (B, N) int64."""
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype.is_floating_point or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be an integer tensor, got {x.dtype}")
        if x.dim() == 3 and tuple(x.shape[1:]) == (cfg.height, cfg.width):
            x = x.flatten(1)
        if x.dim() != 2 or x.shape[1] != cfg.num_tokens or x.shape[0] == 0:
            raise ValueError(f"{op}: {name} must have shape (B, {cfg.height}, {cfg.width}) or "
                             f"(B, {cfg.num_tokens}) with B >= 1, got {tuple(x.shape)}")
        hi = cfg.num_codes + 1 if allow_mask else cfg.num_codes
        if int(x.min()) < 0 or int(x.max()) >= hi:
            raise ValueError(f"{op}: {name} must hold values in [0, {hi}), got values in "
                             f"[{int(x.min())}, {int(x.max())}]")
        return x.long()

    def _check_cond(self, cond, cond_lengths, batch: Optional[int], op: str):
        """The condition as (cond, lengths) on the model's device; errors name the argument."""
        cfg = self.config
        if not isinstance(cond, Tensor):
            raise TypeError(f"{op}: cond must be a torch.Tensor, got {type(cond).__name__}")
        if cfg.condition == "class":
            if cond_lengths is not None:
                raise ValueError(f"{op}: cond_lengths is only for condition='text' models")
            if cond.dtype.is_floating_point or cond.is_complex() or cond.dtype == torch.bool or cond.dim() != 1:
                raise ValueError(f"{op}: cond must be a (B,) integer tensor of class labels, got "
                                 f"{cond.dtype} of shape {tuple(cond.shape)}")
            if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= cfg.num_classes):
                raise ValueError(f"{op}: cond (class labels) must be in [0, {cfg.num_classes}), got "
                                 f"values in [{int(cond.min())}, {int(cond.max())}]")
            cond = cond.long()
        else:
            if not cond.dtype.is_floating_point or cond.dim() != 3 or cond.shape[2] != cfg.text_dim:
                raise ValueError(f"{op}: cond must be float text embeddings (B, L, {cfg.text_dim}), got "
                                 f"{cond.dtype} of shape {tuple(cond.shape)}")
            if cond.shape[1] == 0:
                raise ValueError(f"{op}: cond must hold at least one text token (L >= 1)")
            if cond_lengths is not None:
                if not isinstance(cond_lengths, Tensor) or cond_lengths.dtype not in (torch.int32, torch.int64):
                    raise TypeError(f"{op}: cond_lengths must be an int32/int64 tensor of shape (B,)")
                if tuple(cond_lengths.shape) != (cond.shape[0],):
                    raise ValueError(f"{op}: cond_lengths must have shape ({cond.shape[0]},), got "
                                     f"{tuple(cond_lengths.shape)}")
                if int(cond_lengths.min()) < 1 or int(cond_lengths.max()) > cond.shape[1]:
                    raise ValueError(f"{op}: cond_lengths must be in [1, {cond.shape[1]}], got values in "
                                     f"[{int(cond_lengths.min())}, {int(cond_lengths.max())}]")
                cond_lengths = cond_lengths.to(self.to_logits.weight.device, torch.int64)
        if batch is not None and cond.shape[0] != batch:
            raise ValueError(f"{op}: cond has batch size {cond.shape[0]} but the tokens have {batch}")
        return cond.to(self.to_logits.weight.device), cond_lengths

    # -- network ----------------------------------------------------------------------------
    def _context(self, cond: Tensor, cond_lengths: Optional[Tensor], drop: Optional[Tensor]):
        """(context (B, L, dim), key_lengths or None) with the rows in `drop` replaced by the
        null condition. A dropped text row keeps its length L but sees only its first key (the
        null token), so conditional and null rows share one batched attention call."""
        if self.config.condition == "class":
            if drop is not None:
                cond = torch.where(drop, torch.full_like(cond, self.config.num_classes), cond)
            return self.class_emb(cond).view(cond.shape[0], self.config.class_tokens, -1), None
        ctx = self.text_proj(cond.to(self.text_proj.weight.dtype))
        if drop is None:
            return ctx, cond_lengths
        B, L, E = ctx.shape
        null = F.pad(self.null_context, (0, 0, 0, L - 1)).unsqueeze(0)  # (1, L, E)
        ctx = torch.where(drop.view(B, 1, 1), null, ctx)
        if cond_lengths is None:
            cond_lengths = torch.full((B,), L, dtype=torch.int64, device=ctx.device)
        return ctx, torch.where(drop, torch.ones_like(cond_lengths), cond_lengths)

    def _logp(self, x_t: Tensor, t: Tensor, cond: Tensor, cond_lengths: Optional[Tensor],
              drop: Optional[Tensor]) -> Tensor:
        cfg = self.config
        B = x_t.shape[0]
        h = self.token_emb(x_t)
        if cfg.position == "2d":
            pos = (self.row_emb[:, None, :] + self.col_emb[None, :, :]).reshape(cfg.num_tokens, -1)
        else:
            pos = self.pos_emb
        h = h + pos
        temb = self.time_mlp(timestep_embedding(t, cfg.dim).to(h.dtype))
        context, key_lengths = self._context(cond, cond_lengths, drop)
        for block in self.blocks:
            h = block(h, temb, context, key_lengths)
        logits = self.to_logits(self.norm_out(h))  # (B, N, K)
        return logits.log_softmax(-1).permute(0, 2, 1)  # (B, K, N), class-contiguous view

    def forward(self, x_t: Tensor, t: Union[int, Tensor], cond: Tensor,
                cond_lengths: Optional[Tensor] = None, drop_cond: Optional[Tensor] = None) -> Tensor:
        """log p(x0 | x_t): (B, K, N) log-probabilities, normalised over K (dim 1).

        x_t: (B, h, w) or (B, N) ints in [0, K] (K = MASK); t: int or (B,) ints in [0, T);
        cond: (B,) class labels, or (B, L, text_dim) embeddings with cond_lengths (B,) in
        [1, L] (None: no padding); drop_cond: (B,) bool, rows that use the null condition.
        """
        op = "VQDiffusionTransformer.forward"
        x_t = self._tokens(x_t, "x_t", op, allow_mask=True)
        B = x_t.shape[0]
        t = self.schedule.check_t(t, B, x_t.device, op)
        cond, cond_lengths = self._check_cond(cond, cond_lengths, B, op)
        if drop_cond is not None:
            if not isinstance(drop_cond, Tensor) or drop_cond.dtype != torch.bool or drop_cond.shape != (B,):
                raise ValueError(f"{op}: drop_cond must be a bool tensor of shape ({B},)")
            drop_cond = drop_cond.to(x_t.device)
        with self._backend():
            return self._logp(x_t, t, cond, cond_lengths, drop_cond)

    # -- training ---------------------------------------------------------------------------
    def training_loss(self, x0_tokens: Tensor, cond: Tensor, sampler: Optional[TimestepSampler] = None,
                      *, cond_lengths: Optional[Tensor] = None,
                      generator: Optional[torch.Generator] = None, network=None) -> Tensor:
        """VQ-Diffusion's loss (vb_loss) on a batch of token grids x0 (B, h, w) in [0, K).

        sampler: a TimestepSampler(T) for importance-sampled t (it is updated with this batch's
        per-sample losses); None draws t uniformly. Each row's condition is replaced by the null
        condition with probability config.cond_drop_prob (classifier-free guidance).
        generator: drives t, the forward noise and the condition dropout (reproducible steps).
        network: the callable that runs forward, e.g. a DistributedDataParallel wrapper of this
        model (DDP synchronises gradients only for calls through its own forward).
        """
        op = "VQDiffusionTransformer.training_loss"
        x0 = self._tokens(x0_tokens, "x0_tokens", op, allow_mask=False)
        B, device = x0.shape[0], x0.device
        cond, cond_lengths = self._check_cond(cond, cond_lengths, B, op)
        if sampler is not None and not isinstance(sampler, TimestepSampler):
            raise TypeError(f"{op}: sampler must be a TimestepSampler or None, got {type(sampler).__name__}")
        if sampler is not None and sampler.T != self.config.num_timesteps:
            raise ValueError(f"{op}: sampler has {sampler.T} timesteps, the model {self.config.num_timesteps}")
        gdev = generator.device if generator is not None else "cpu"
        if sampler is None:
            t = torch.randint(0, self.config.num_timesteps, (B,), generator=generator, device=gdev)
            pt = None
        else:
            t, pt = sampler.sample(B, generator=generator)
        t = t.to(device)
        drop = (torch.rand(B, generator=generator, device=gdev) < self.config.cond_drop_prob).to(device)
        with self._backend():
            x_t = q_sample(x0, t, self.schedule, generator=generator)
            logp = (self if network is None else network)(x_t, t, cond, cond_lengths, drop)
            loss, per_sample = vb_loss(logp, x0, x_t, t, self.schedule, aux_weight=self.config.aux_weight,
                                       pt=None if pt is None else pt.to(device), return_per_sample=True)
        if sampler is not None:
            sampler.update(t, per_sample)
        return loss

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, cond: Tensor, num_steps: Optional[int] = None, guidance_scale: float = 1.0,
               truncation_rate: Optional[float] = None, generator: Optional[torch.Generator] = None,
               *, cond_lengths: Optional[Tensor] = None) -> Tensor:
        """Token grids (B, h, w) int64 in [0, K), sampled from all-MASK.

        num_steps: network calls (None: every one of the T timesteps); fewer visit evenly spaced
        timesteps and take exact multi-step reverse jumps (posterior_sample's t_prev).
        guidance_scale: classifier-free guidance s (1: none); s != 1 runs the condition and the
        null condition as one batched forward of 2B rows per step.
        truncation_rate: top-r truncation of p(x0 | x_t) in [0, 1] (None: none; 0 keeps only
        the most likely class).
        generator: makes the samples reproducible.
        """
        op = "VQDiffusionTransformer.sample"
        cfg = self.config
        cond, cond_lengths = self._check_cond(cond, cond_lengths, None, op)
        B = cond.shape[0]
        if B == 0:
            raise ValueError(f"{op}: cond must hold at least one condition (B >= 1)")
        T = cfg.num_timesteps
        steps = sampling_timesteps(T, T if num_steps is None else num_steps)
        if real_scalar(guidance_scale) is None or not math.isfinite(real_scalar(guidance_scale)):
            raise ValueError(f"{op}: guidance_scale must be a finite number, got {guidance_scale!r}")
        guidance_scale = real_scalar(guidance_scale)  # numpy scalars too
        if truncation_rate is not None and not 0.0 <= float(truncation_rate) <= 1.0:
            raise ValueError(f"{op}: truncation_rate must be in [0, 1], got {truncation_rate}")
        guided = guidance_scale != 1.0
        device = self.to_logits.weight.device
        x = torch.full((B, cfg.num_tokens), cfg.num_codes, dtype=torch.int64, device=device)
        if guided:  # rows [0, B): the condition; rows [B, 2B): the null condition
            cond2 = torch.cat([cond, cond])
            lengths2 = None if cond_lengths is None else torch.cat([cond_lengths, cond_lengths])
            drop = torch.arange(2 * B, device=device) >= B
        with self._backend():
            for t, t_prev in reverse_jumps(steps):
                if guided:
                    logp = self._logp(torch.cat([x, x]), torch.full((2 * B,), t, device=device),
                                      cond2, lengths2, drop)
                    x = posterior_sample(logp[:B], x, t, self.schedule, generator, t_prev=t_prev,
                                         truncation_rate=truncation_rate,
                                         guidance_scale=float(guidance_scale),
                                         log_p_x0_uncond=logp[B:])
                else:
                    logp = self._logp(x, torch.full((B,), t, device=device), cond, cond_lengths, None)
                    x = posterior_sample(logp, x, t, self.schedule, generator, t_prev=t_prev,
                                         truncation_rate=truncation_rate)
        return x.view(B, cfg.height, cfg.width)
