"""A compact VQGAN-style tokenizer: conv encoder -> imgtx_fast.nn.VectorQuantizer -> conv decoder.

The layout follows taming-transformers' Encoder/Decoder (ResNet blocks with GroupNorm and SiLU,
strided-conv downsampling, nearest-upsample + conv upsampling), trimmed for small images: no
attention blocks and no GAN/perceptual loss, which a 16x16 or 32x32 CPU demo does not need.
The only non-torch op is the codebook lookup, so `backend=` switches exactly that between
our kernel and the plain-PyTorch reference while the weights stay the same.
"""
import dataclasses
import math
import time
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..nn import VectorQuantizer
from ..ops.codebook import codebook_lookup
from ..training import progress_bar
from ._common import ModelBase

__all__ = ["VQVAE", "VQVAEConfig", "train_vqvae"]

_FORMAT = "imgtx_fast.models.vqvae"  # tag in checkpoints, so load() refuses other files clearly
_RECON_LOSSES = ("l1", "l2")


@dataclasses.dataclass
class VQVAEConfig:
    """Everything needed to rebuild the model; stored in checkpoints next to the weights.

    channel_mult: width multipliers per resolution level (of `channels`); the encoder halves
      the resolution between levels, so the downsampling factor is 2 ** (len(channel_mult) - 1):
      (1, 2, 2) -> 4, i.e. 16x16 images -> 4x4 tokens, 32x32 -> 8x8.
    embed_dim / num_codes: code vector size and codebook size K.
    ema / decay / dead_code_threshold: the quantizer's EMA codebook (no codebook gradients) and
      restarts of codes whose EMA usage (vectors per batch) falls under the threshold.
      decay 0.95 rather than the usual 0.99: the demo trains for ~1000 steps, and a slower EMA
      would still be dragging the initial codes along when it ends (400 steps on digits:
      test L1 0.072 vs 0.076, perplexity 117 vs 103 of 128).
    channels=16 is the CPU default: 1000 steps on 16x16 digits take ~50 s on 2 cores.
    """
    in_channels: int = 1
    channels: int = 16
    channel_mult: Tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    norm_groups: int = 8
    embed_dim: int = 32
    num_codes: int = 128
    beta: float = 0.25
    ema: bool = True
    decay: float = 0.95
    dead_code_threshold: float = 1.0
    recon_loss: str = "l1"

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # lists come back from files
        for name in ("in_channels", "channels", "num_res_blocks", "norm_groups", "embed_dim",
                     "num_codes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, "
                             f"got {self.channel_mult!r}")
        for m in self.channel_mult:
            if (self.channels * m) % self.norm_groups:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every level's width "
                                 f"channels * channel_mult = {self.channels * m}")
        if self.recon_loss not in _RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {_RECON_LOSSES}, got {self.recon_loss!r}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)  # plain types: loadable with weights_only=True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config: unknown VQVAEConfig fields {sorted(unknown)}")
        return cls(**d)


class ResnetBlock(nn.Module):
    """taming's ResnetBlock without dropout and timestep input."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        layers: List[nn.Module] = []
        c = widths[0]
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(c, w, g))
                c = w
            if level < len(widths) - 1:
                # stride-2 conv; taming pads asymmetrically (0,1,0,1) with padding=0, which is
                # the same output size for even inputs: padding=1 keeps the kernel centred
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers.append(ResnetBlock(c, c, g))  # the "mid" block (taming also has attention here)
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        # taming's conv_out + quant_conv (1x1) folded into one conv straight to embed_dim
        self.conv_out = nn.Conv2d(c, cfg.embed_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult][::-1]
        g = cfg.norm_groups
        c = widths[0]
        self.conv_in = nn.Conv2d(cfg.embed_dim, c, 3, padding=1)
        layers: List[nn.Module] = [ResnetBlock(c, c, g)]  # mid block
        for level, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResnetBlock(c, w, g))
                c = w
            if level < len(widths) - 1:
                layers.append(Upsample(c))
        self.body = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(g, c, eps=1e-6)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class VQVAE(ModelBase):
    """Image tokenizer: images (B, C, H, W) in [-1, 1] <-> tokens (B, H/f, W/f) in [0, K).

    encode(x) -> tokens; decode_tokens(tokens) -> images (unclamped; clamp to [-1, 1] to show);
    forward(x) -> (recon, loss, stats) with loss = recon_loss (L1 or L2) + the quantizer's
    commitment loss, stats = detached scalars: recon_loss, commit_loss, perplexity (exp of the
    entropy of code use in the batch) and usage (fraction of the K codes used in the batch).
    backend: 'fast' or 'reference' runs the codebook lookup on that backend (via
    imgtx_fast.backend) whatever the process-wide setting; None follows imgtx_fast.set_backend.
    """

    def __init__(self, config: Optional[VQVAEConfig] = None, *, backend: Optional[str] = None,
                 **overrides):
        super().__init__()
        if config is None:
            config = VQVAEConfig()
        elif isinstance(config, dict):
            config = VQVAEConfig.from_dict(config)
        elif not isinstance(config, VQVAEConfig):
            raise TypeError(f"config must be a VQVAEConfig, a dict or None, got "
                            f"{type(config).__name__}")
        if overrides:  # VQVAE(channels=64) style; replace() re-runs the checks
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.backend = backend  # validated by the property setter
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(
            config.num_codes, config.embed_dim, config.beta, ema=config.ema, decay=config.decay,
            dead_code_threshold=config.dead_code_threshold, legacy=False)
        self.decoder = Decoder(config)

    def _check_images(self, x) -> None:
        cfg, f = self.config, self.config.downsample_factor
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0 or x.shape[2] % f or x.shape[3] % f or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"x: need B >= 1 and H, W positive multiples of the downsampling "
                             f"factor {f}, got {tuple(x.shape)}")

    def forward(self, x: Tensor):
        self._check_images(x)
        with self._backend():
            z = self.encoder(x)
            z_q, commit, (perplexity, _, indices) = self.quantizer(z)
        recon = self.decoder(z_q)
        if self.config.recon_loss == "l1":
            rec = F.l1_loss(recon, x)
        else:
            rec = F.mse_loss(recon, x)
        used = torch.bincount(indices, minlength=self.config.num_codes) > 0
        stats = {"recon_loss": rec.detach(), "commit_loss": commit.detach(),
                 "perplexity": perplexity.detach(), "usage": used.float().mean()}
        return recon, rec + commit, stats

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Token grid (B, H/f, W/f) int64. Uses the lookup op directly rather than the
        quantizer's forward, which in training mode would also move the EMA codebook."""
        self._check_images(x)
        q = self.quantizer
        with self._backend():
            z = self.encoder(x)
            indices, _ = codebook_lookup(z.movedim(1, -1), q.embedding.weight, metric=q.metric)
        return indices

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Images (B, C, h*f, w*f) for a token grid (B, h, w) of code indices."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 3 or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor (B, h, w), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        K = self.config.num_codes
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= K):
            raise ValueError(f"tokens must lie in [0, {K}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        B, h, w = tokens.shape
        z_q = self.quantizer.get_codebook_entry(tokens.long().reshape(-1),
                                                (B, h, w, self.config.embed_dim))
        return self.decoder(z_q)

    # ------------------------------------------------------------------ checkpoints

    def save(self, path) -> None:
        """One file: the config and the state dict (EMA buffers included), via torch.save."""
        torch.save({"format": _FORMAT, "version": 1, "config": self.config.to_dict(),
                    "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, *, backend: Optional[str] = None, map_location="cpu") -> "VQVAE":
        """Rebuild a model saved with save(), in eval mode (call .train() to fine-tune).
        Loads with weights_only=True: no pickled code runs, whoever wrote the file."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
            raise ValueError(f"path: {path!r} is not a VQVAE checkpoint written by VQVAE.save")
        model = cls(VQVAEConfig.from_dict(ckpt["config"]), backend=backend)
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()


def train_vqvae(model: VQVAE, images: Tensor, steps: int = 1000, batch_size: int = 64,
                lr: float = 2e-3, log_every: int = 100, progress: bool = True,
                seed: int = 0) -> List[float]:
    """Train `model` on `images` (N, C, H, W) in [-1, 1] with Adam; returns the loss per step.

    Batches are drawn with replacement from a generator seeded with `seed` (reproducible for a
    given seed and model init). The learning rate follows a cosine decay to 10% of `lr`, which
    lowers the final reconstruction error for the same number of steps. Every `log_every`
    steps the recon loss, perplexity and codebook usage go to the progress bar (tqdm, when
    installed) or are printed. The model is left in eval mode.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]  # the EMA codebook has none
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    losses: List[Tensor] = []
    bar = progress_bar(steps, "vqvae", progress)
    model.train()
    start = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
            x = images[idx].to(device, non_blocking=True)
            _, loss, stats = model(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())  # no per-step host sync on GPUs
            if bar is not None:
                bar.update(1)
            if log_every and (step % log_every == 0 or step == steps):
                msg = {k: f"{float(v):.4f}" for k, v in stats.items()}
                if bar is not None:
                    bar.set_postfix(msg, refresh=False)
                elif progress:
                    print(f"vqvae step {step}/{steps} ({time.perf_counter() - start:.1f}s) "
                          + " ".join(f"{k}={v}" for k, v in msg.items()), flush=True)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return torch.stack(losses).tolist()
