"""Plain-PyTorch twins of every op: the test oracle and the 'reference' backend."""
from .codebook import codebook_lookup

__all__ = ["codebook_lookup"]
