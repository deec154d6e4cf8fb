"""torch.nn modules built on the fused ops."""
from .vector_quantizer import VectorQuantizer

__all__ = ["VectorQuantizer"]
