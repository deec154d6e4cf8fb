"""torch.library definitions of the compiled ops (namespace `imgtx`)."""
from . import diffusion
from .fused_attention import attention, attention_op
from .codebook import CodebookLookup, codebook_lookup

__all__ = ["attention", "attention_op", "CodebookLookup", "codebook_lookup"]
