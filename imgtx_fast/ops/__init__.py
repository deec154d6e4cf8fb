"""torch.library definitions of the compiled ops (namespace `imgtx`)."""
from . import diffusion
from .codebook import CodebookLookup, codebook_lookup

__all__ = ["CodebookLookup", "codebook_lookup"]
