"""Image Transformer local attention layers (1D and 2D) with a KV cache for sampling.

Why: Image Transformer attends within a local window (docs/specs/local_attention.md), so
each position sees a few hundred keys however large the image. These layers are the
projections around one call of `imgtx_fast.attention(pattern=...)`, which visits only the key
tiles of the window, never a dense (N, N) mask.

Sampling generates one position (or a chunk) at a time: `forward(x, cache)` stores the new
keys/values in a `KVCache` and attends from the new positions only; step-by-step (or chunked)
outputs equal those of one full-sequence forward.
- 1D: positions come in raster order; the pattern places the Nq new queries at the last Nq of
  the Nk cached keys.
- 2D: positions come in Image Transformer's generation order -- query tiles in raster order of
  tiles, pixels in raster order within a tile (`LocalAttention2d.generation_order`). Masked
  local 2D is causal in that order only: a pixel sees the flange left of its tile on all the
  tile's rows, i.e. raster positions after its own. The cache holds keys at their raster
  positions; each new query attends (bottom-right causal) to its tile's memory (top and left
  flanges, inside the image) followed by its tile's pixels generated so far -- exactly the keys
  the pattern shows it.

Inputs are (B, N, embed_dim) in raster order. The layers do not shift their input: Image
Transformer's model right-shifts the image (within each query tile, for 2D) before attention.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .._frontend.common import int_scalar
from ..ops.fused_attention import attention
from ..patterns import Local1d, Local2d

__all__ = ["KVCache", "LocalAttention1d", "LocalAttention2d"]


class KVCache:
    """Keys and values (B, heads, length, head_dim) an attention layer has seen; one per layer.

    max_length: preallocate that many positions on the first append (no copy per step; a
    longer sequence is an error); None: start with the first chunk's size and double when full.
    `length` is the number of positions stored; `reset()` empties the cache for a new sample,
    which may then have another batch size, dtype or device (the buffers are reused when they
    fit, reallocated when not).
    1D layers `append` in sequence order; 2D layers `reserve` height*width raster slots, attend
    through the current query tile's `window` and `store` each finished tile at its raster slots.

    Inference only, like Hugging Face's caches: appends write into preallocated buffers in
    place, which autograd cannot differentiate through. A cached layer call runs under grad
    mode too, but backward through its output raises a clear error (instead of autograd's
    in-place one); sample under torch.no_grad() or torch.inference_mode(), and train with one
    full-sequence forward without a cache.
    """

    def __init__(self, max_length: Optional[int] = None):
        if max_length is not None and (int_scalar(max_length) is None or int_scalar(max_length) <= 0):
            raise ValueError(f"KVCache: max_length must be a positive int or None, got {max_length!r}")
        self.max_length = None if max_length is None else int_scalar(max_length)  # numpy ints too
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.length = 0
        # 2D layers: (tile, keys, values) of the query tile being generated -- its memory
        # (flanges) gathered once, then its own pixels appended -- so a step reads the window
        # as one contiguous prefix instead of gathering it from raster slots every time
        self._window: Optional[Tuple[int, Tensor, Tensor]] = None

    def __repr__(self) -> str:
        capacity = 0 if self.k is None else self.k.shape[2]
        return f"KVCache(length={self.length}, capacity={capacity}, max_length={self.max_length})"

    def reset(self) -> None:
        self.length = 0
        self._window = None

    def _check(self, k: Tensor, v: Tensor) -> None:
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"KVCache: k and v must be (B, heads, n, head_dim) with the same "
                             f"(B, heads, n), got {tuple(k.shape)} and {tuple(v.shape)}")
        end = self.length + k.shape[2]
        if self.max_length is not None and end > self.max_length:
            raise ValueError(f"KVCache: {end} positions exceed max_length={self.max_length}")
        if self.k is not None and not self._fits(k, v):
            if self.length == 0:  # empty (new or reset): take the new kind of keys
                self.k = self.v = None
                return
            raise ValueError(f"KVCache: new keys {tuple(k.shape)} {k.dtype} on {k.device} do "
                             f"not match the cache's {tuple(self.k.shape)} {self.k.dtype} on "
                             f"{self.k.device}; call reset() or use a new cache")

    def _fits(self, k: Tensor, v: Tensor) -> bool:
        """Whether k, v (B, heads, n, head_dim) have the stored keys' batch, heads, head dims,
        dtype and device."""
        return (k.shape[:2] == self.k.shape[:2] and k.shape[3] == self.k.shape[3]
                and v.shape[3] == self.v.shape[3] and k.dtype == self.k.dtype
                and k.device == self.k.device)

    def reserve(self, k: Tensor, v: Tensor, size: int) -> None:
        """Check that n = k.shape[2] more positions of this kind fit, and allocate the `size`
        raster slots (zero-filled) on first use; counts nothing."""
        self._check(k, v)
        if self.max_length is not None and self.max_length < size:
            raise ValueError(f"KVCache: this layer needs {size} slots, max_length={self.max_length}")
        if self.k is None or self.k.shape[2] != size:
            if self.length:
                raise ValueError(f"KVCache: holds {self.length} positions of another layer kind")
            self.k = k.new_zeros(k.shape[:2] + (size, k.shape[3]))
            self.v = v.new_zeros(v.shape[:2] + (size, v.shape[3]))

    def store(self, k: Tensor, v: Tensor, index: Tensor) -> None:
        """Write k, v at raster slots `index` of the reserved buffer (counts nothing)."""
        self.k[:, :, index] = k
        self.v[:, :, index] = v

    def window(self, tile: int, memory: Tensor, capacity: int) -> Tuple[Tensor, Tensor]:
        """Buffers (B, heads, capacity, head_dim) for query tile `tile`: slots [0, len(memory))
        hold the cached keys/values at raster slots `memory`, gathered when the tile changes;
        the caller writes the tile's own pixels after them."""
        if self._window is None or self._window[0] != tile:
            old = self._window
            if old is None or old[1].shape[2] < capacity:
                kw = self.k.new_empty(self.k.shape[:2] + (capacity, self.k.shape[3]))
                vw = self.v.new_empty(self.v.shape[:2] + (capacity, self.v.shape[3]))
            else:
                kw, vw = old[1], old[2]
            m = memory.numel()
            if m:
                kw[:, :, :m].copy_(self.k.index_select(2, memory))
                vw[:, :, :m].copy_(self.v.index_select(2, memory))
            self._window = (tile, kw, vw)
        return self._window[1], self._window[2]

    def append(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store k, v (B, heads, n, head_dim) after the cached positions; return views of all
        cached keys and values, (B, heads, length, head_dim)."""
        self._check(k, v)
        end = self.length + k.shape[2]
        capacity = 0 if self.k is None else self.k.shape[2]
        if end > capacity:
            new = self.max_length if self.max_length is not None else max(end, 2 * capacity)
            grown_k = k.new_empty(k.shape[:2] + (new, k.shape[3]))
            grown_v = v.new_empty(v.shape[:2] + (new, v.shape[3]))
            if self.length:
                grown_k[:, :, :self.length] = self.k[:, :, :self.length]
                grown_v[:, :, :self.length] = self.v[:, :, :self.length]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class _NoBackwardThroughCache(torch.autograd.Function):
    """The identity, whose backward raises: a KVCache's buffers are written in place after the
    attention read them, so autograd could only fail there with an opaque in-place error. The
    only path from a cached call's output back to the cache runs through this node, so its
    error comes first."""

    @staticmethod
    def forward(ctx, out: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError("KVCache is inference-only: its buffers are written in place, so "
                           "autograd cannot run backward through cached attention. Sample under "
                           "torch.no_grad() or torch.inference_mode(); to train, call the layer "
                           "on the whole sequence without a cache")


class _LocalAttention(nn.Module):
    """qkv projection -> imgtx_fast.attention(pattern=self.pattern) -> output projection."""

    pattern = None  # set by the subclasses

    def __init__(self, embed_dim: int, num_heads: int, bias: bool, device, dtype):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"{type(self).__name__}: embed_dim ({embed_dim}) must be a positive "
                             f"multiple of num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        factory = dict(device=device, dtype=dtype)
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """x (B, n, embed_dim) -> (B, n, embed_dim).

        Without a cache, x is the whole sequence. With one (causal patterns only), x holds the
        next n positions: their keys/values are appended to the cache, and they attend to every
        cached position their pattern shows them.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{type(self).__name__}: x must be (B, n, {self.embed_dim}), got "
                             f"{tuple(x.shape)}")
        B, n, E = x.shape
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, n, hd) views
        if cache is None:
            out = attention(q, k, v, pattern=self.pattern)  # laid out (B, n, H, hd)
        elif not self.pattern.causal:
            raise ValueError(f"{type(self).__name__}: a KV cache needs a causal pattern")
        else:
            out = self._decode(q, k, v, cache)
            if out.requires_grad:
                out = _NoBackwardThroughCache.apply(out)
        return self.out_proj(out.transpose(1, 2).reshape(B, n, E))

    def _decode(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, pattern={self.pattern}, "
                f"bias={self.qkv_proj.bias is not None}")


class LocalAttention1d(_LocalAttention):
    """Multi-head Image Transformer local 1D attention (imgtx_fast.Local1d).

    causal=True: position i sees positions floor(i / block) * block - block .. i.
    causal=False: block b sees [b * block - filter_width, (b + 1) * block + filter_width).
    """

    def __init__(self, embed_dim: int, num_heads: int, block: int = 256, causal: bool = True,
                 filter_width: int = 0, bias: bool = True, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.pattern = Local1d(block=block, causal=causal, filter_width=filter_width)

    def _decode(self, q, k, v, cache):
        n = q.shape[2]
        self.pattern.check(n, cache.length + n)  # before the cache changes
        k, v = cache.append(k, v)
        return attention(q, k, v, pattern=self.pattern)


class LocalAttention2d(_LocalAttention):
    """Multi-head Image Transformer local 2D attention (imgtx_fast.Local2d) on a height x width
    image: query tiles of query_shape, memory flange memory_flange.

    forward(x) takes the image in raster order; forward(x, cache) takes the next positions in
    generation order (`generation_order`: x_raster[:, generation_order] is the sequence to
    feed), see the module docstring.
    """

    def __init__(self, embed_dim: int, num_heads: int, height: int, width: int,
                 query_shape=(8, 16), memory_flange=(8, 16), causal: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(embed_dim, num_heads, bias, device, dtype)
        self.pattern = Local2d(height, width, query_shape, memory_flange, causal)
        self._plans: Dict[torch.device, "_TilePlan"] = {}

    @property
    def generation_order(self) -> Tensor:
        """(height * width,) raster position of each generation step (tiles in raster order,
        raster order within a tile)."""
        return self._plan(torch.device("cpu")).order.clone()

    def _plan(self, device) -> "_TilePlan":
        plan = self._plans.get(device)
        if plan is None:
            plan = self._plans[device] = _TilePlan(self.pattern, device)
        return plan

    def _decode(self, q, k, v, cache):
        n, size = q.shape[2], self.pattern.height * self.pattern.width
        start = cache.length
        if start + n > size:
            raise ValueError(f"LocalAttention2d: {start + n} positions do not fit a "
                             f"{self.pattern.height}x{self.pattern.width} image")
        plan = self._plan(q.device)
        cache.reserve(k, v, size)
        outs, g = [], start
        while g < start + n:  # one fused call per tile the chunk touches
            tile, within = plan.tile_of[g]
            pixels = plan.pixels[tile]
            take = min(start + n - g, len(pixels) - within)
            m = plan.memory[tile].numel()
            kw, vw = cache.window(tile, plan.memory[tile], plan.capacity)
            end = m + within + take
            kw[:, :, m + within:end] = k[:, :, g - start:g - start + take]
            vw[:, :, m + within:end] = v[:, :, g - start:g - start + take]
            outs.append(attention(q[:, :, g - start:g - start + take], kw[:, :, :end], vw[:, :, :end],
                                  causal=True))
            if within + take == len(pixels):  # tile complete: later tiles read it as their flanges
                cache.store(kw[:, :, m:end], vw[:, :, m:end], pixels)
            g += take
        cache.length += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


class _TilePlan:
    """Raster indices for 2D decoding: the generation order, and per query tile its memory (top
    and left flanges inside the image) and its pixels in generation order."""

    def __init__(self, pattern: Local2d, device):
        H, W = pattern.height, pattern.width
        (qh, qw), (fh, fw) = pattern.query_shape, pattern.memory_flange
        order: List[int] = []
        self.memory: List[Tensor] = []
        self.pixels: List[Tensor] = []
        self.tile_of: List[Tuple[int, int]] = []
        for r0 in range(0, H, qh):
            for c0 in range(0, W, qw):
                rows, cols = range(r0, min(r0 + qh, H)), range(c0, min(c0 + qw, W))
                pixels = [r * W + c for r in rows for c in cols]
                top = [r * W + c for r in range(max(r0 - fh, 0), r0)
                       for c in range(max(c0 - fw, 0), min(c0 + qw + fw, W))]
                left = [r * W + c for r in rows for c in range(max(c0 - fw, 0), c0)]
                tile = len(self.pixels)
                self.tile_of.extend((tile, i) for i in range(len(pixels)))
                order.extend(pixels)
                self.memory.append(torch.tensor(top + left, dtype=torch.long, device=device))
                self.pixels.append(torch.tensor(pixels, dtype=torch.long, device=device))
        self.order = torch.tensor(order, dtype=torch.long, device=device)
        self.capacity = max(len(m) + len(p) for m, p in zip(self.memory, self.pixels))
