"""torch.nn modules built on the fused ops."""
from . import functional
from .attention import MultiheadAttention
from .local_attention import KVCache, LocalAttention1d, LocalAttention2d
from .vector_quantizer import VectorQuantizer

__all__ = ["KVCache", "LocalAttention1d", "LocalAttention2d", "MultiheadAttention",
           "VectorQuantizer", "functional"]
