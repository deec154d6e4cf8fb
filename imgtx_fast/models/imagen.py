"""An Imagen-style text-to-image model (Saharia et al. 2022) on imgtx_fast's fused attention.

    enc = TextEncoder.random(WordTokenizer.from_texts(prompts), d_model=64)   # frozen T5 encoder
    base = ImagenDenoiser(ImagenConfig(image_size=8, text_dim=enc.dim))
    sr = ImagenDenoiser(ImagenConfig(image_size=16, low_res_size=8, patch_size=2, text_dim=enc.dim))
    text, lengths = enc(prompts)
    loss = base.training_loss(x0_8, text, lengths)            # + sr.training_loss(x0_16, ..., low_res=x0_8)
    pipe = ImagenPipeline(enc, base, sr)
    out = pipe(prompts, num_steps=64, guidance_scale=3.0)   # {"base": (B,C,8,8), "sr": (B,C,16,16)}

Denoiser (a DiT-shaped transformer, as the VQ-Diffusion model of this package): the image x_t
(B, C, S, S) is cut into p x p patches -> tokens of width `dim` + learned positions; `depth`
blocks of [AdaLN -> self-attention, AdaLN -> cross-attention to the text, AdaLN -> MLP]
(vq_diffusion.Block, reused) whose AdaLN scale/shift come from a conditioning vector = MLP of
(sinusoidal t + pooled text [+ sinusoidal augmentation level]) (Imagen adds the pooled text
embedding to the timestep embedding); LayerNorm + a zero-initialised linear map back to patches.
Cross-attention keys are the projected T5 token embeddings; prompt lengths go to
imgtx_fast.attention as key_lengths, so padded text tokens are never read (not even their keys).

Diffusion: continuous Gaussian DDPM with T steps, "cosine" (Nichol & Dhariwal) or "linear"
betas, the network predicts eps or v (Salimans & Ho). Sampling: DDPM ancestral or DDIM
(eta = 0) over `num_steps` evenly spaced timesteps (respaced posteriors, exact for the jump),
classifier-free guidance out = u + w (c - u) (w = 1: conditional only; the conditional and the
null branch run as one batch of 2B rows), and Imagen's dynamic thresholding of x0_hat.

Super-resolution (the cascade): a denoiser with low_res_size > 0 also takes the low-resolution
image, upsampled bilinearly to image_size and *noise-augmented* (Imagen: z = sqrt(g(a)) x +
sqrt(1 - g(a)) eps, a ~ U[0, max_aug_level] in training, a fixed level at sampling), stacked
with x_t on the channel axis; the augmentation level a is a second conditioning input.

Backends: backend="fast" | "reference" runs forward, training_loss and sample inside
imgtx_fast.backend(...): the same weights on our kernels or on plain-PyTorch twins (the text
encoder is transformers' and the same on both); None follows imgtx_fast.set_backend.
"""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._frontend.common import int_scalar, real_scalar
from ._common import ModelBase
from .text_encoder import TextEncoder, WordTokenizer
from .vq_diffusion import Block, sampling_timesteps, timestep_embedding

__all__ = ["ImagenConfig", "ImagenDenoiser", "ImagenPipeline", "GaussianSchedule", "TextEncoder",
           "WordTokenizer", "dynamic_threshold", "noise_augment", "aug_alpha_bar"]

_FORMAT = "imgtx_fast.imagen/1"
_PIPE_FORMAT = "imgtx_fast.imagen_pipeline/1"
_SCHEDULES = ("cosine", "linear")
_PREDICTIONS = ("eps", "v")
_SAMPLERS = ("ddpm", "ddim")
_THRESHOLDS = ("dynamic", "static", "none")
_AUG_SCALE = 1000.0  # an augmentation level a in [0, 1] is embedded like timestep a * 1000


def _int(v, name, op, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{op}: {name} must be an int >= {lo}, got {v!r}")
    return v


def _number(v, name, op) -> float:
    r = real_scalar(v)  # numpy scalars and 0-d arrays too
    if r is None or not math.isfinite(r):
        raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")
    return r


# ----------------------------------------------------------------------------- config

@dataclass
class ImagenConfig:
    """Everything needed to rebuild a denoiser (saved with the weights).

    image_size, channels: the images this stage generates (B, channels, S, S).
    patch_size: p x p pixels per token (N = (S / p)^2 tokens).
    text_dim: width of the text encoder's embeddings (T5's d_model).
    low_res_size: 0 for a base stage; the side of the low-resolution conditioning image of a
        super-resolution stage (upsampled to image_size inside).
    num_timesteps, beta_schedule ("cosine" | "linear"), prediction ("eps" | "v").
    cond_drop_prob: training-time probability of the null text condition (for guidance).
    max_aug_level: SR training draws the augmentation level a ~ U[0, max_aug_level].
    """
    image_size: int = 8
    channels: int = 1
    patch_size: int = 1
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    text_dim: int = 64
    low_res_size: int = 0
    num_timesteps: int = 1000
    beta_schedule: str = "cosine"
    prediction: str = "eps"
    cond_drop_prob: float = 0.1
    max_aug_level: float = 0.5

    def __post_init__(self):
        op = "ImagenConfig"
        for name in ("image_size", "channels", "patch_size", "dim", "depth", "heads", "text_dim",
                     "num_timesteps"):
            _int(getattr(self, name), name, op)
        _int(self.low_res_size, "low_res_size", op, lo=0)
        if self.image_size % self.patch_size:
            raise ValueError(f"{op}: image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.low_res_size > self.image_size:
            raise ValueError(f"{op}: low_res_size ({self.low_res_size}) must be <= image_size ({self.image_size})")
        if self.dim % self.heads:
            raise ValueError(f"{op}: dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.dim // self.heads > 256:
            raise ValueError(f"{op}: dim / heads must be <= 256 (the attention kernel's head dim limit)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"{op}: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.beta_schedule not in _SCHEDULES:
            raise ValueError(f"{op}: beta_schedule must be one of {_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction not in _PREDICTIONS:
            raise ValueError(f"{op}: prediction must be one of {_PREDICTIONS}, got {self.prediction!r}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"{op}: cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not 0.0 <= self.max_aug_level <= 1.0:
            raise ValueError(f"{op}: max_aug_level must be in [0, 1], got {self.max_aug_level}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2

    @property
    def is_super_resolution(self) -> bool:
        return self.low_res_size > 0


# ----------------------------------------------------------------------------- diffusion math

class GaussianSchedule:
    """DDPM's tables in float64: betas, alphas, alpha_bar (abar) for t = 0..T-1.

    cosine: abar(t) = f(t+1) / f(0), f(u) = cos((u/T + s) / (1 + s) * pi/2)^2, s = 0.008, betas
    clipped to 0.999 (Nichol & Dhariwal). linear: betas from 1e-4 to 0.02, scaled by 1000/T
    (Ho et al.; the scale keeps abar(T-1) near 0 for any T)."""

    def __init__(self, num_timesteps: int, kind: str = "cosine"):
        T = _int(num_timesteps, "num_timesteps", "GaussianSchedule")
        if kind not in _SCHEDULES:
            raise ValueError(f"GaussianSchedule: kind must be one of {_SCHEDULES}, got {kind!r}")
        if kind == "linear":
            scale = 1000.0 / T
            betas = torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), T, dtype=torch.float64)
        else:
            s = 0.008
            u = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.T, self.kind = T, kind
        self.betas = betas
        self.alphas = 1 - betas
        self.abar = torch.cumprod(self.alphas, 0)
        self._abar_from_minus_one = torch.cat([torch.ones(1, dtype=torch.float64), self.abar])

    def abar_at(self, t: Tensor) -> Tensor:
        """abar(t) for integer t, with abar(-1) = 1 (the clean image, what the last jump hits)."""
        return self._abar_from_minus_one[t.long().cpu() + 1]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (t: (B,) ints)."""
        a = self.abar_at(t).to(x0.device, x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction: str) -> Tensor:
        """What the network regresses: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        if prediction == "eps":
            return noise
        a = self.abar_at(t).to(x0.device, x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict_x0(self, x_t: Tensor, out: Tensor, t: Tensor, prediction: str) -> Tensor:
        """x0_hat from the network output: (x_t - sqrt(1-abar) eps) / sqrt(abar), or for v
        sqrt(abar) x_t - sqrt(1-abar) v."""
        a = self.abar_at(t).to(x_t.device, x_t.dtype).view(-1, *[1] * (x_t.dim() - 1))
        if prediction == "eps":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * out

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and variance of q(x_s | x_t, x0) for s < t (s = -1: x0 itself, variance 0).

        With a = abar_t / abar_s the jump's alpha and b = 1 - a its beta (s = t - 1 gives DDPM's
        one-step posterior): mean = sqrt(abar_s) b / (1 - abar_t) x0 + sqrt(a) (1 - abar_s) /
        (1 - abar_t) x_t, variance = b (1 - abar_s) / (1 - abar_t)."""
        at, as_ = self.abar_at(t), self.abar_at(s)
        a = at / as_
        b = 1 - a
        c0 = as_.sqrt() * b / (1 - at)
        ct = a.sqrt() * (1 - as_) / (1 - at)
        var = b * (1 - as_) / (1 - at)
        shape = (-1, *[1] * (x0.dim() - 1))
        cast = lambda v: v.to(x0.device, x0.dtype).view(shape)  # noqa: E731
        return cast(c0) * x0 + cast(ct) * x_t, cast(var)


def aug_alpha_bar(level: Tensor) -> Tensor:
    """The signal fraction g(a) of noise augmentation at level a in [0, 1]: the continuous cosine
    schedule g(a) = cos((a + s)/(1 + s) pi/2)^2 / cos(s/(1 + s) pi/2)^2, g(0) = 1 (no noise)."""
    s = 0.008
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return (f(level.double()) / f(torch.zeros((), dtype=torch.float64))).clamp(0.0, 1.0)


def noise_augment(x: Tensor, level: Tensor, noise: Tensor) -> Tensor:
    """Imagen's noise-conditioning augmentation: sqrt(g(a)) x + sqrt(1 - g(a)) noise, per row."""
    g = aug_alpha_bar(level).to(x.device, x.dtype).view(-1, *[1] * (x.dim() - 1))
    return g.sqrt() * x + (1 - g).sqrt() * noise


def dynamic_threshold(x0: Tensor, percentile: float = 0.995) -> Tensor:
    """Imagen's dynamic thresholding: per sample s = max(quantile_p(|x0|), 1); clip x0 to
    [-s, s] and divide by s (so saturated pixels are pushed inward instead of clipping hard)."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic_threshold: percentile must be in (0, 1], got {percentile}")
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *[1] * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


# ----------------------------------------------------------------------------- network

class ImagenDenoiser(ModelBase):
    """The denoiser of one cascade stage: (x_t, t, text[, low_res, aug_level]) -> eps or v.

    backend: "fast", "reference" or None (follow imgtx_fast.set_backend); a runtime choice, not
    saved with the weights (assign `model.backend` to switch). save / load / state /
    from_state: see models._common.ModelBase."""

    config_class = ImagenConfig
    checkpoint_format = _FORMAT

    def __init__(self, config: ImagenConfig, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, ImagenConfig):
            raise TypeError(f"ImagenDenoiser: config must be an ImagenConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.backend = backend
        self.schedule = GaussianSchedule(cfg.num_timesteps, cfg.beta_schedule)
        E, p = cfg.dim, cfg.patch_size
        in_ch = cfg.channels * (2 if cfg.is_super_resolution else 1)  # SR: x_t and the low-res image
        self.patch_in = nn.Linear(in_ch * p * p, E)
        self.pos_emb = nn.Parameter(torch.randn(cfg.num_tokens, E) * 0.02)
        self.time_in = nn.Linear(E, E)
        self.pool_proj = nn.Linear(E, E)  # pooled text -> added to the timestep embedding
        if cfg.is_super_resolution:
            self.aug_in = nn.Linear(E, E)
        self.cond_mlp = nn.Sequential(nn.SiLU(), nn.Linear(E, E), nn.SiLU())
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, E))
        # the null condition of classifier-free guidance: one learned context token and a learned
        # pooled vector (Imagen: the empty prompt; a learned one does the same job here)
        self.null_context = nn.Parameter(torch.randn(1, E) * 0.02)
        self.null_pooled = nn.Parameter(torch.zeros(E))
        self.blocks = nn.ModuleList(Block(E, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(E)
        self.patch_out = nn.Linear(E, cfg.channels * p * p)
        nn.init.zeros_(self.patch_out.weight)  # start as "predict 0": stable early training
        nn.init.zeros_(self.patch_out.bias)

    @property
    def _device(self):
        return self.patch_out.weight.device

    # -- input checks -----------------------------------------------------------------------
    def _image(self, x, name: str, op: str, size: Optional[int] = None) -> Tensor:
        cfg = self.config
        S = cfg.image_size if size is None else size
        if not isinstance(x, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (cfg.channels, S, S) or x.shape[0] == 0:
            raise ValueError(f"{op}: {name} must have shape (B, {cfg.channels}, {S}, {S}) with B >= 1, "
                             f"got {tuple(x.shape)}")
        return x.to(self._device, self.patch_out.weight.dtype)

    def _text(self, text, lengths, batch: Optional[int], op: str) -> Tuple[Tensor, Tensor]:
        """(text (B, L, text_dim), lengths (B,) int64) on the model's device."""
        cfg = self.config
        if not isinstance(text, Tensor):
            raise TypeError(f"{op}: text must be a torch.Tensor of embeddings, got {type(text).__name__}")
        if not text.dtype.is_floating_point or text.dim() != 3 or text.shape[2] != cfg.text_dim:
            raise ValueError(f"{op}: text must be float embeddings (B, L, {cfg.text_dim}), got "
                             f"{text.dtype} of shape {tuple(text.shape)}")
        B, L = text.shape[:2]
        if L == 0 or B == 0:
            raise ValueError(f"{op}: text must hold B >= 1 prompts of L >= 1 tokens, got {tuple(text.shape)}")
        if batch is not None and B != batch:
            raise ValueError(f"{op}: text holds {B} prompts but the images have batch size {batch}")
        if lengths is None:
            lengths = torch.full((B,), L, dtype=torch.int64)
        if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{op}: text_lengths must be an int32/int64 tensor of shape ({B},)")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"{op}: text_lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if int(lengths.min()) < 1 or int(lengths.max()) > L:
            raise ValueError(f"{op}: text_lengths must be in [1, {L}], got values in "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")
        return text.to(self._device, self.patch_out.weight.dtype), lengths.to(self._device, torch.int64)

    def _timesteps(self, t, B: int, op: str) -> Tensor:
        T = self.config.num_timesteps
        if not isinstance(t, Tensor) and int_scalar(t) is not None:
            t = torch.full((B,), int_scalar(t), dtype=torch.int64)
        if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{op}: t must be an int or a (B,) integer tensor, got {t!r:.60}")
        if t.dim() == 0:
            t = t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"{op}: t must have shape ({B},), got {tuple(t.shape)}")
        if int(t.min()) < 0 or int(t.max()) >= T:
            raise ValueError(f"{op}: t must be in [0, {T}), got values in [{int(t.min())}, {int(t.max())}]")
        return t.to(self._device, torch.int64)

    def _low_res(self, low_res, aug_level, B: int, op: str, upsampled: bool):
        """SR stages: (low_res, aug level (B,) float) checked; base stages: both must be None."""
        cfg = self.config
        if not cfg.is_super_resolution:
            if low_res is not None or aug_level is not None:
                raise ValueError(f"{op}: low_res/aug_level are only for super-resolution stages "
                                 f"(config.low_res_size > 0)")
            return None, None
        if low_res is None:
            raise ValueError(f"{op}: this super-resolution stage needs low_res "
                             f"(B, {cfg.channels}, {cfg.low_res_size}, {cfg.low_res_size})")
        size = cfg.image_size if upsampled else cfg.low_res_size
        low_res = self._image(low_res, "low_res", op, size)
        if low_res.shape[0] != B:
            raise ValueError(f"{op}: low_res has batch size {low_res.shape[0]} but the batch is {B}")
        if aug_level is None:
            aug_level = 0.0
        if not isinstance(aug_level, Tensor) and real_scalar(aug_level) is not None:
            aug_level = torch.full((B,), real_scalar(aug_level))
        if not isinstance(aug_level, Tensor) or not aug_level.dtype.is_floating_point or aug_level.shape != (B,):
            raise ValueError(f"{op}: aug_level must be a number or a (B,) float tensor in [0, 1]")
        if not bool(((aug_level >= 0) & (aug_level <= 1)).all()):
            raise ValueError(f"{op}: aug_level must be in [0, 1], got {aug_level.min().item():.3g}.."
                             f"{aug_level.max().item():.3g}")
        return low_res, aug_level.to(self._device, torch.float32)

    def upsample(self, low_res: Tensor) -> Tensor:
        """Low-res (B, C, s, s) -> (B, C, S, S), bilinear (align_corners=False, as the digits)."""
        S = self.config.image_size
        return F.interpolate(low_res, size=(S, S), mode="bilinear", align_corners=False)

    def augment(self, low_res: Tensor, aug_level: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """The SR conditioning image: upsampled low-res, noise-augmented at aug_level (B,)."""
        up = self.upsample(low_res)
        noise = _randn(up.shape, generator, up)
        return noise_augment(up, aug_level, noise)

    # -- network ----------------------------------------------------------------------------
    def _patchify(self, x: Tensor) -> Tensor:
        B, C, S, _ = x.shape
        p, g = self.config.patch_size, self.config.grid
        return x.view(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)

    def _unpatchify(self, h: Tensor) -> Tensor:
        B = h.shape[0]
        C, p, g = self.config.channels, self.config.patch_size, self.config.grid
        return h.view(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, g * p, g * p)

    def _context(self, text: Tensor, lengths: Tensor, drop: Optional[Tensor]):
        """(context (B, L, dim), key_lengths (B,), pooled (B, dim)); rows in `drop` get the null
        condition: the null token at key 0 with length 1 (so conditional and null rows share one
        batched attention call) and the null pooled vector."""
        ctx = self.text_proj(text)
        B, L, E = ctx.shape
        valid = torch.arange(L, device=ctx.device)[None, :] < lengths[:, None]
        # mean of the real tokens; where(), not a product with the mask: padding may hold anything
        pooled = torch.where(valid[..., None], ctx, 0.0).sum(1) / lengths.to(ctx.dtype)[:, None]
        if drop is None:
            return ctx, lengths, pooled
        null = F.pad(self.null_context, (0, 0, 0, L - 1)).unsqueeze(0)  # (1, L, E)
        ctx = torch.where(drop.view(B, 1, 1), null, ctx)
        pooled = torch.where(drop.view(B, 1), self.null_pooled.expand(B, E), pooled)
        return ctx, torch.where(drop, torch.ones_like(lengths), lengths), pooled

    def _net(self, x_t: Tensor, t: Tensor, text: Tensor, lengths: Tensor, cond_image: Optional[Tensor],
             aug_level: Optional[Tensor], drop: Optional[Tensor]) -> Tensor:
        cfg = self.config
        x = x_t if cond_image is None else torch.cat([x_t, cond_image], dim=1)
        h = self.patch_in(self._patchify(x)) + self.pos_emb
        context, key_lengths, pooled = self._context(text, lengths, drop)
        c = self.time_in(timestep_embedding(t, cfg.dim).to(h.dtype)) + self.pool_proj(pooled)
        if cfg.is_super_resolution:
            c = c + self.aug_in(timestep_embedding(aug_level * _AUG_SCALE, cfg.dim).to(h.dtype))
        temb = self.cond_mlp(c)
        for block in self.blocks:
            h = block(h, temb, context, key_lengths)
        return self._unpatchify(self.patch_out(self.norm_out(h)))

    def forward(self, x_t: Tensor, t: Union[int, Tensor], text: Tensor, text_lengths: Optional[Tensor] = None,
                *, low_res: Optional[Tensor] = None, aug_level=None,
                drop_cond: Optional[Tensor] = None) -> Tensor:
        """The network output (eps or v, per config.prediction), shaped like x_t.

        x_t: (B, C, S, S) float; t: int or (B,) ints in [0, T); text: (B, L, text_dim) embeddings
        with text_lengths (B,) in [1, L] (None: no padding); SR stages: low_res is the
        conditioning image already upsampled to (B, C, S, S) and augmented (see augment()) and
        aug_level its level (number or (B,) in [0, 1]); drop_cond: (B,) bool rows that use the
        null condition."""
        op = "ImagenDenoiser.forward"
        x_t = self._image(x_t, "x_t", op)
        B = x_t.shape[0]
        t = self._timesteps(t, B, op)
        text, lengths = self._text(text, text_lengths, B, op)
        low_res, aug_level = self._low_res(low_res, aug_level, B, op, upsampled=True)
        if drop_cond is not None:
            if not isinstance(drop_cond, Tensor) or drop_cond.dtype != torch.bool or drop_cond.shape != (B,):
                raise ValueError(f"{op}: drop_cond must be a bool tensor of shape ({B},)")
            drop_cond = drop_cond.to(self._device)
        with self._backend():
            return self._net(x_t, t, text, lengths, low_res, aug_level, drop_cond)

    @torch.no_grad()
    def guided_output(self, x_t: Tensor, t: Union[int, Tensor], text: Tensor,
                      text_lengths: Optional[Tensor] = None, guidance_scale: float = 1.0, *,
                      low_res: Optional[Tensor] = None, aug_level=None) -> Tensor:
        """Classifier-free guidance: u + w (c - u), c the conditional and u the null-condition
        output (one batched call of 2B rows). w = 1 is c (one call of B rows), w = 0 is u."""
        op = "ImagenDenoiser.guided_output"
        w = self._guidance(guidance_scale, op)
        x_t = self._image(x_t, "x_t", op)
        B = x_t.shape[0]
        t = self._timesteps(t, B, op)
        text, lengths = self._text(text, text_lengths, B, op)
        low_res, aug_level = self._low_res(low_res, aug_level, B, op, upsampled=True)
        with self._backend():
            return self._guided(x_t, t, text, lengths, low_res, aug_level, w)

    def _guided(self, x_t, t, text, lengths, cond_image, aug_level, w: float) -> Tensor:
        if w == 1.0:
            return self._net(x_t, t, text, lengths, cond_image, aug_level, None)
        B = x_t.shape[0]
        two = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
        drop = torch.arange(2 * B, device=x_t.device) >= B  # rows [B, 2B): the null condition
        out = self._net(two(x_t), two(t), two(text), two(lengths), two(cond_image), two(aug_level), drop)
        c, u = out[:B], out[B:]
        return u + w * (c - u)

    @staticmethod
    def _guidance(w, op) -> float:
        w = _number(w, "guidance_scale", op)
        if w < 0:
            raise ValueError(f"{op}: guidance_scale must be >= 0, got {w}")
        return w

    # -- training ---------------------------------------------------------------------------
    def training_loss(self, x0: Tensor, text: Tensor, text_lengths: Optional[Tensor] = None, *,
                      low_res: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                      network=None) -> Tensor:
        """Mean squared error of the eps / v prediction at t ~ U{0..T-1} (simple DDPM loss).

        x0: (B, C, S, S) images in [-1, 1]. SR stages: low_res (B, C, s, s) the low-resolution
        images; the conditioning is upsample(low_res) noise-augmented at a ~ U[0, max_aug_level].
        Each row's text is replaced by the null condition with probability cond_drop_prob.
        generator: drives t, the noise, the dropout and the augmentation (reproducible steps).
        network: the callable that runs forward (e.g. a DistributedDataParallel wrapper)."""
        op = "ImagenDenoiser.training_loss"
        cfg = self.config
        x0 = self._image(x0, "x0", op)
        B = x0.shape[0]
        text, lengths = self._text(text, text_lengths, B, op)
        low_res, _ = self._low_res(low_res, None, B, op, upsampled=False)
        t = torch.randint(0, cfg.num_timesteps, (B,), generator=generator,
                          device=_gdev(generator)).to(self._device)
        noise = _randn(x0.shape, generator, x0)
        drop = (torch.rand(B, generator=generator, device=_gdev(generator)) < cfg.cond_drop_prob).to(self._device)
        cond_image = aug = None
        if cfg.is_super_resolution:
            aug = (torch.rand(B, generator=generator, device=_gdev(generator)) * cfg.max_aug_level).to(self._device)
            cond_image = self.augment(low_res, aug, generator)
        x_t = self.schedule.q_sample(x0, t, noise)
        target = self.schedule.target(x0, noise, t, cfg.prediction)
        with self._backend():
            out = (self if network is None else network)(x_t, t, text, lengths, low_res=cond_image,
                                                          aug_level=aug, drop_cond=drop)
        return F.mse_loss(out, target)

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, text: Tensor, text_lengths: Optional[Tensor] = None, num_steps: int = 64,
               guidance_scale: float = 1.0, *, sampler: str = "ddpm", thresholding: str = "dynamic",
               percentile: float = 0.995, low_res: Optional[Tensor] = None, aug_level: float = 0.0,
               generator: Optional[torch.Generator] = None, noise: Optional[Tensor] = None) -> Tensor:
        """Images (B, C, S, S) in [-1, 1] from pure noise, `num_steps` network calls.

        num_steps: evenly spaced timesteps from T-1 down to 0 (respaced exactly: each jump t -> s
        uses q(x_s | x_t, x0_hat)); sampler: "ddpm" (ancestral) or "ddim" (eta = 0, deterministic
        given the start noise); guidance_scale w >= 0 (1: none); thresholding of x0_hat:
        "dynamic" (Imagen, percentile p), "static" (clip to [-1, 1]) or "none".
        SR stages: low_res (B, C, s, s), upsampled and augmented once at aug_level (the cascade's
        fixed level; 0 = clean). noise: the start x_T (default: drawn from generator)."""
        op = "ImagenDenoiser.sample"
        cfg = self.config
        text, lengths = self._text(text, text_lengths, None, op)
        B = text.shape[0]
        T = cfg.num_timesteps
        if int_scalar(num_steps) is None or not 1 <= int_scalar(num_steps) <= T:
            raise ValueError(f"{op}: num_steps must be an int in [1, {T}], got {num_steps!r}")
        num_steps = int_scalar(num_steps)
        w = self._guidance(guidance_scale, op)
        if sampler not in _SAMPLERS:
            raise ValueError(f"{op}: sampler must be one of {_SAMPLERS}, got {sampler!r}")
        if thresholding not in _THRESHOLDS:
            raise ValueError(f"{op}: thresholding must be one of {_THRESHOLDS}, got {thresholding!r}")
        p = _number(percentile, "percentile", op)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"{op}: percentile must be in (0, 1], got {p}")
        a = _number(aug_level, "aug_level", op)
        low_res, aug = self._low_res(low_res, a if cfg.is_super_resolution else None, B, op, upsampled=False)
        if not cfg.is_super_resolution and a != 0.0:
            raise ValueError(f"{op}: aug_level is only for super-resolution stages")
        shape = (B, cfg.channels, cfg.image_size, cfg.image_size)
        if noise is None:
            x = _randn(shape, generator, self.patch_out.weight)
        else:
            x = self._image(noise, "noise", op)
            if x.shape[0] != B:
                raise ValueError(f"{op}: noise has batch size {x.shape[0]} but text holds {B} prompts")
        cond_image = None if low_res is None else self.augment(low_res, aug, generator)
        steps = sampling_timesteps(T, num_steps)
        sched = self.schedule
        with self._backend():
            for i, t in enumerate(steps):
                s = steps[i + 1] if i + 1 < len(steps) else -1
                tt = torch.full((B,), t, dtype=torch.int64, device=x.device)
                ss = torch.full((B,), s, dtype=torch.int64, device=x.device)
                out = self._guided(x, tt, text, lengths, cond_image, aug, w)
                x0 = sched.predict_x0(x, out, tt, cfg.prediction)
                if thresholding == "dynamic":
                    x0 = dynamic_threshold(x0, p)
                elif thresholding == "static":
                    x0 = x0.clamp(-1.0, 1.0)
                if s < 0:
                    x = x0
                elif sampler == "ddim":  # x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps(x0)
                    at = sched.abar_at(tt).to(x.device, x.dtype).view(-1, 1, 1, 1)
                    as_ = sched.abar_at(ss).to(x.device, x.dtype).view(-1, 1, 1, 1)
                    eps = (x - at.sqrt() * x0) / (1 - at).sqrt()
                    x = as_.sqrt() * x0 + (1 - as_).sqrt() * eps
                else:
                    mean, var = sched.posterior(x0, x, tt, ss)
                    x = mean + var.sqrt() * _randn(x.shape, generator, x)
        return x.clamp(-1.0, 1.0)


def _gdev(generator: Optional[torch.Generator]):
    return generator.device if generator is not None else "cpu"


def _randn(shape, generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), moved to `like`'s."""
    return torch.randn(shape, generator=generator, device=_gdev(generator)).to(like.device, like.dtype)


# ----------------------------------------------------------------------------- cascade

class ImagenPipeline(nn.Module):
    """The cascade: prompts -> frozen text encoder -> base samples -> (optional) 2x SR samples.

    The SR stage is conditioned on the base stage's output, upsampled and noise-augmented at
    a fixed `sr_aug_level` (Imagen conditions on an augmented low-res image so that the SR
    stage tolerates the base stage's artifacts)."""

    def __init__(self, text_encoder: TextEncoder, base: ImagenDenoiser, sr: Optional[ImagenDenoiser] = None):
        super().__init__()
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"ImagenPipeline: text_encoder must be a TextEncoder, got {type(text_encoder).__name__}")
        if not isinstance(base, ImagenDenoiser) or base.config.is_super_resolution:
            raise TypeError("ImagenPipeline: base must be an ImagenDenoiser with low_res_size = 0")
        if base.config.text_dim != text_encoder.dim:
            raise ValueError(f"ImagenPipeline: base.text_dim ({base.config.text_dim}) != the text "
                             f"encoder's width ({text_encoder.dim})")
        if sr is not None:
            if not isinstance(sr, ImagenDenoiser) or not sr.config.is_super_resolution:
                raise TypeError("ImagenPipeline: sr must be an ImagenDenoiser with low_res_size > 0")
            if (sr.config.low_res_size, sr.config.channels) != (base.config.image_size, base.config.channels):
                raise ValueError(f"ImagenPipeline: sr.low_res_size/channels ({sr.config.low_res_size}, "
                                 f"{sr.config.channels}) must match the base stage's image_size/channels "
                                 f"({base.config.image_size}, {base.config.channels})")
            if sr.config.text_dim != text_encoder.dim:
                raise ValueError(f"ImagenPipeline: sr.text_dim ({sr.config.text_dim}) != the text "
                                 f"encoder's width ({text_encoder.dim})")
        self.text_encoder, self.base, self.sr = text_encoder, base, sr

    @property
    def backend(self) -> Optional[str]:
        return self.base.backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        for m in (self.base, self.sr):
            if m is not None:
                m.backend = name

    @torch.no_grad()
    def forward(self, prompts: Sequence[str], num_steps: int = 64, guidance_scale: float = 3.0, *,
                sr_num_steps: Optional[int] = None, sr_guidance_scale: Optional[float] = None,
                sr_aug_level: float = 0.1, sampler: str = "ddpm", thresholding: str = "dynamic",
                percentile: float = 0.995, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """{"base": (B, C, s, s), "sr": (B, C, S, S) if there is an SR stage} in [-1, 1].
        sr_num_steps / sr_guidance_scale default to num_steps / guidance_scale."""
        text, lengths = self.text_encoder(prompts)
        common = dict(sampler=sampler, thresholding=thresholding, percentile=percentile, generator=generator)
        out = {"base": self.base.sample(text, lengths, num_steps, guidance_scale, **common)}
        if self.sr is not None:
            out["sr"] = self.sr.sample(text, lengths, sr_num_steps or num_steps,
                                       guidance_scale if sr_guidance_scale is None else sr_guidance_scale,
                                       low_res=out["base"], aug_level=sr_aug_level, **common)
        return out

    def save(self, path, half: bool = False) -> None:
        """One file: the text encoder (a WordTokenizer one: T5 config, weights, vocabulary) and
        the stages. half: float32 denoiser weights stored as float16."""
        torch.save({"format": _PIPE_FORMAT, "text_encoder": self.text_encoder.state(),
                    "base": self.base.state(half), "sr": None if self.sr is None else self.sr.state(half)}, path)

    @classmethod
    def load(cls, path, map_location="cpu", backend: Optional[str] = None) -> "ImagenPipeline":
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != _PIPE_FORMAT:
            raise ValueError(f"ImagenPipeline.load: {path} is not a {_PIPE_FORMAT} checkpoint")
        return cls.from_state(blob, backend)

    @classmethod
    def from_state(cls, blob: dict, backend: Optional[str] = None) -> "ImagenPipeline":
        sr = None if blob.get("sr") is None else ImagenDenoiser.from_state(blob["sr"], backend)
        return cls(TextEncoder.from_state(blob["text_encoder"]),
                   ImagenDenoiser.from_state(blob["base"], backend), sr)
