"""Image Transformer (Parmar et al. 2018): a decoder-only pixel model on imgtx_fast's local attention.

    cfg = ImageTransformerConfig(height=16, width=16, channels=1, num_classes=10)
    model = ImageTransformer(cfg)                         # backend=None: follow set_backend
    loss = model.loss(images, labels)                     # teacher-forced NLL, nats per sub-pixel
    bpd = model.bits_per_dim(images, labels)
    images = model.sample(labels, temperature=1.0)        # KV-cache sampling, (B, C, H, W) uint8

Pixels are 256-way categoricals per channel. The image (B, C, H, W) is read as a grid of H rows
and W*C columns -- channels interleaved in raster order, as in the paper -- so a sequence has
N = H*W*C positions, each one intensity.

Attention (docs/specs/local_attention.md), on that grid:
- "local1d": masked local 1D over the raster order, block length `block`.
- "local2d": masked local 2D with query tiles `query_shape` and flanges `memory_flange`. It is
  causal in Image Transformer's generation order -- query tiles in raster order, raster order
  within a tile -- so the model generates in that order, and the input is right-shifted by one
  position *within each query tile* (the paper's per-block shift): the first pixel of every
  tile gets the learned start vector, what the tile sees of earlier tiles comes through the
  flanges.
Each block is pre-LayerNorm [local attention -> MLP]; the class label (if any) is a learned
embedding added to every position's input, with learned row and column position embeddings.

Sampling visits positions in generation order with one KV cache per layer: each step runs
every layer on the new position only, and its attention reads only the keys of its window
(decode attention: nn.LocalAttention1d / LocalAttention2d with a KVCache). `use_cache=False`
recomputes the whole masked forward at every step instead (the textbook baseline).

Backends: `backend="fast" | "reference"` runs every op inside `imgtx_fast.backend(...)`, so the
same weights run on our kernels or on the plain-PyTorch twins (dense masks); None follows
`imgtx_fast.set_backend`.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._frontend.common import int_scalar, real_scalar
from ..nn.local_attention import KVCache, LocalAttention1d, LocalAttention2d
from ._common import ModelBase

__all__ = ["ImageTransformerConfig", "ImageTransformer", "to_sequence", "from_sequence"]

_ATTENTION = ("local1d", "local2d")
_LEVELS = 256
_LN2 = math.log(2.0)


@dataclass
class ImageTransformerConfig:
    """Image size, attention pattern and network sizes (stored with the weights).

    query_shape / memory_flange are in units of the (H, W*C) grid, i.e. a tile (8, 16) of an
    RGB image covers 8 rows of 16/3 pixels' sub-pixels.
    """
    height: int = 16
    width: int = 16
    channels: int = 1
    num_classes: int = 10  # 0: unconditional
    attention: str = "local2d"
    block: int = 256  # local1d block length
    query_shape: Tuple[int, int] = (8, 16)
    memory_flange: Tuple[int, int] = (8, 16)
    dim: int = 256
    heads: int = 4
    depth: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("height", "width", "channels", "block", "dim", "heads", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ImageTransformerConfig: {name} must be a positive int, got {v!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ImageTransformerConfig: num_classes must be an int >= 0, got {self.num_classes!r}")
        if self.attention not in _ATTENTION:
            raise ValueError(f"ImageTransformerConfig: attention must be one of {_ATTENTION}, got {self.attention!r}")
        if self.dim % self.heads:
            raise ValueError(f"ImageTransformerConfig: dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"ImageTransformerConfig: mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ImageTransformerConfig: dropout must be in [0, 1), got {self.dropout!r}")
        self.query_shape = tuple(self.query_shape)  # lists after a round trip through a checkpoint
        self.memory_flange = tuple(self.memory_flange)

    @property
    def grid(self) -> Tuple[int, int]:
        """(rows, columns) of the sequence's raster: (H, W*C)."""
        return self.height, self.width * self.channels

    @property
    def num_positions(self) -> int:
        return self.height * self.width * self.channels


def to_sequence(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W*C): raster order with the channels of a pixel adjacent."""
    return images.permute(0, 2, 3, 1).reshape(images.shape[0], -1)


def from_sequence(seq: Tensor, channels: int, height: int, width: int) -> Tensor:
    """Inverse of to_sequence: (B, H*W*C) -> (B, C, H, W)."""
    return seq.view(seq.shape[0], height, width, channels).permute(0, 3, 1, 2)


class Block(nn.Module):
    """x += Attn(LN(x)); x += MLP(LN(x)). With a cache, x holds only the new positions."""

    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class ImageTransformer(ModelBase):
    """p(image | class) as a product of 256-way categoricals in generation order.

    backend: "fast", "reference" or None (follow imgtx_fast.set_backend); a runtime choice, not
    saved with the weights. save / load / state: see models._common.ModelBase.
    """

    config_class = ImageTransformerConfig
    checkpoint_format = "imgtx_fast.image_transformer/1"

    def __init__(self, config: ImageTransformerConfig, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(config, ImageTransformerConfig):
            raise TypeError(f"ImageTransformer: config must be an ImageTransformerConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.backend = backend
        E = cfg.dim
        rows, cols = cfg.grid
        self.pixel_emb = nn.Embedding(_LEVELS, E)
        self.start = nn.Parameter(torch.randn(E) * 0.02)
        self.row_emb = nn.Parameter(torch.randn(rows, E) * 0.02)
        self.col_emb = nn.Parameter(torch.randn(cols, E) * 0.02)
        self.class_emb = nn.Embedding(cfg.num_classes, E) if cfg.num_classes else None
        self.blocks = nn.ModuleList(Block(self._attention(), E, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(E)
        self.to_logits = nn.Linear(E, _LEVELS)
        order = self._generation_order()
        prev = torch.full((cfg.num_positions,), -1, dtype=torch.long)
        prev[order[1:]] = order[:-1]  # the input of a position: the pixel generated just before it
        if cfg.attention == "local2d":  # ... except at a tile's first pixel: the start vector
            qh, qw = cfg.query_shape
            tile_start = (order // cols % qh == 0) & (order % cols % qw == 0)
            prev[order[tile_start]] = -1
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("prev", prev, persistent=False)

    def _attention(self) -> nn.Module:
        cfg = self.config
        if cfg.attention == "local1d":
            return LocalAttention1d(cfg.dim, cfg.heads, block=cfg.block, causal=True)
        rows, cols = cfg.grid
        return LocalAttention2d(cfg.dim, cfg.heads, rows, cols, query_shape=cfg.query_shape,
                                memory_flange=cfg.memory_flange, causal=True)

    def _generation_order(self) -> Tensor:
        if self.config.attention == "local1d":
            return torch.arange(self.config.num_positions)
        return self.blocks[0].attn.generation_order

    # -- input checks -----------------------------------------------------------------------
    def _check_images(self, images: Tensor, op: str) -> Tensor:
        """(B, C, H, W) integer intensities in [0, 255] -> (B, N) int64 sequences."""
        cfg = self.config
        if not isinstance(images, Tensor):
            raise TypeError(f"{op}: images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype.is_floating_point or images.is_complex() or images.dtype == torch.bool:
            raise TypeError(f"{op}: images must hold integer intensities (e.g. uint8), got {images.dtype}")
        shape = (cfg.channels, cfg.height, cfg.width)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape or images.shape[0] == 0:
            raise ValueError(f"{op}: images must have shape (B, {', '.join(map(str, shape))}) with B >= 1, "
                             f"got {tuple(images.shape)}")
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi >= _LEVELS:
            raise ValueError(f"{op}: images must hold intensities in [0, 255], got values in [{lo}, {hi}]")
        return to_sequence(images.to(self.to_logits.weight.device, torch.long))

    def _check_labels(self, labels: Optional[Tensor], batch: Optional[int], op: str) -> Optional[Tensor]:
        C = self.config.num_classes
        if C == 0:
            if labels is not None:
                raise ValueError(f"{op}: labels given to an unconditional model (num_classes = 0)")
            return None
        if not isinstance(labels, Tensor):
            raise TypeError(f"{op}: labels must be a (B,) integer torch.Tensor of class labels, got "
                            f"{type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(f"{op}: labels must be a (B,) integer tensor, got {labels.dtype} of shape "
                             f"{tuple(labels.shape)}")
        if batch is not None and labels.shape[0] != batch:
            raise ValueError(f"{op}: labels has {labels.shape[0]} entries but images has batch size {batch}")
        if labels.numel() == 0:
            raise ValueError(f"{op}: labels must hold at least one label (B >= 1)")
        if int(labels.min()) < 0 or int(labels.max()) >= C:
            raise ValueError(f"{op}: labels must be in [0, {C}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return labels.to(self.to_logits.weight.device, torch.long)

    # -- network ----------------------------------------------------------------------------
    def _position(self, positions: Tensor) -> Tensor:
        cols = self.config.grid[1]
        return self.row_emb[positions // cols] + self.col_emb[positions % cols]

    def _inputs(self, seq: Tensor, positions: Tensor, labels: Optional[Tensor]) -> Tensor:
        """The right-shifted embeddings (B, n, E) at `positions` (raster indices, (n,)) given the
        pixels `seq` (B, N)."""
        prev = self.prev[positions]
        h = torch.where((prev < 0)[:, None], self.start,
                        self.pixel_emb(seq[:, prev.clamp(min=0)]))
        h = h + self._position(positions)
        if labels is not None:
            h = h + self.class_emb(labels)[:, None, :]
        return h

    def _head(self, h: Tensor) -> Tensor:
        return self.to_logits(self.norm_out(h))

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Teacher-forced logits (B, N, 256) over every position, raster order (see to_sequence)."""
        op = "ImageTransformer.forward"
        seq = self._check_images(images, op)
        labels = self._check_labels(labels, seq.shape[0], op)
        with self._backend():
            return self._logits(seq, labels)

    def _logits(self, seq: Tensor, labels: Optional[Tensor]) -> Tensor:
        h = self._inputs(seq, torch.arange(seq.shape[1], device=seq.device), labels)
        for block in self.blocks:
            h = block(h)
        return self._head(h)

    def loss(self, images: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Mean negative log-likelihood per sub-pixel, in nats (the training objective)."""
        op = "ImageTransformer.loss"
        seq = self._check_images(images, op)
        labels = self._check_labels(labels, seq.shape[0], op)
        with self._backend():
            logits = self._logits(seq, labels)
            return F.cross_entropy(logits.reshape(-1, _LEVELS), seq.reshape(-1))

    @torch.no_grad()
    def bits_per_dim(self, images: Tensor, labels: Optional[Tensor] = None, batch_size: int = 256) -> float:
        """Mean negative log2-likelihood per sub-pixel over `images` (the paper's metric)."""
        total, count = 0.0, 0
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size]
            y = None if labels is None else labels[i:i + batch_size]
            total += float(self.loss(x, y)) * x.shape[0]
            count += x.shape[0]
        return total / max(count, 1) / _LN2

    # -- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels: Optional[Tensor] = None, *, batch_size: Optional[int] = None,
               temperature: float = 1.0, generator: Optional[torch.Generator] = None,
               use_cache: bool = True, prefix: Optional[Tensor] = None, prefix_len: int = 0,
               steps: Optional[int] = None) -> Tensor:
        """Images (B, C, H, W) uint8 sampled in generation order.

        labels: (B,) class labels (conditional models); batch_size: B for unconditional ones.
        temperature: divides the logits (1: the model's distribution; -> 0: greedy).
        use_cache: True (default) runs one position per step through per-layer KV caches whose
          attention reads only the window; False recomputes the full masked forward every step.
        prefix, prefix_len: image completion -- the first prefix_len positions in generation
          order (`self.order`) are copied from `prefix` (B, C, H, W) and the rest sampled.
        steps: stop after that many sampled positions (the later ones stay 0); for timing.
        """
        op = "ImageTransformer.sample"
        cfg = self.config
        N = cfg.num_positions
        labels = self._check_labels(labels, None, op)
        if labels is not None:
            B = labels.shape[0]
            if batch_size is not None and batch_size != B:
                raise ValueError(f"{op}: batch_size ({batch_size}) disagrees with labels ({B} entries)")
        elif int_scalar(batch_size) is None or int_scalar(batch_size) <= 0:
            raise ValueError(f"{op}: an unconditional model needs batch_size, a positive int, got {batch_size!r}")
        else:
            B = int_scalar(batch_size)
        # numpy scalars count as numbers here, as in every op
        temp = real_scalar(temperature)
        if temp is None or not temp > 0 or not math.isfinite(temp):
            raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
        temperature = temp
        if int_scalar(prefix_len) is None or not 0 <= int_scalar(prefix_len) <= N:
            raise ValueError(f"{op}: prefix_len must be an int in [0, {N}], got {prefix_len!r}")
        prefix_len = int_scalar(prefix_len)
        device = self.to_logits.weight.device
        if prefix_len:
            if prefix is None:
                raise ValueError(f"{op}: prefix_len > 0 needs prefix images")
            seq = self._check_images(prefix, op).clone()
            if seq.shape[0] != B:
                raise ValueError(f"{op}: prefix has batch size {seq.shape[0]}, expected {B}")
            seq[:, self.order[prefix_len:]] = 0  # only the prefix is known
        else:
            seq = torch.zeros(B, N, dtype=torch.long, device=device)
        stop = N if steps is None else min(N, prefix_len + max(int(steps), 0))
        with self._backend():
            if use_cache:
                self._sample_cached(seq, labels, temperature, generator, prefix_len, stop)
            else:
                self._sample_recompute(seq, labels, temperature, generator, prefix_len, stop)
        return from_sequence(seq, cfg.channels, cfg.height, cfg.width).to(torch.uint8)

    def _draw(self, logits: Tensor, temperature: float, generator) -> Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    def _sample_cached(self, seq, labels, temperature, generator, start, stop) -> None:
        caches = [KVCache(max_length=self.config.num_positions) for _ in self.blocks]
        order = self.order
        if start:  # prefill the caches with the known prefix in one chunk per layer
            self._step(seq, order[:start], labels, caches)
        # the per-step input, as _inputs computes it, from tables built once: a step is then
        # a handful of small ops plus the layers
        position = self._position(order)[:, None, :]  # (N, 1, E) in generation order
        label = None if labels is None else self.class_emb(labels)[:, None, :]
        start_vec = self.start.view(1, 1, -1)
        pixel = self.pixel_emb.weight
        prev = self.prev[order].tolist()
        order_list = order.tolist()
        for g in range(start, stop):
            p = prev[g]
            h = (start_vec if p < 0 else pixel[seq[:, p]][:, None, :]) + position[g]
            if label is not None:
                h = h + label
            if h.shape[0] != seq.shape[0]:
                h = h.expand(seq.shape[0], -1, -1)
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache)
            seq[:, order_list[g]] = self._draw(self._head(h)[:, -1], temperature, generator)

    def _step(self, seq, positions, labels, caches) -> Tensor:
        h = self._inputs(seq, positions, labels)
        for block, cache in zip(self.blocks, caches):
            h = block(h, cache)
        return self._head(h)

    def _sample_recompute(self, seq, labels, temperature, generator, start, stop) -> None:
        for p in self.order[start:stop].tolist():
            logits = self._logits(seq, labels)
            seq[:, p] = self._draw(logits[:, p], temperature, generator)
