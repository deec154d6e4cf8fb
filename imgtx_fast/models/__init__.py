"""Models whose hot ops run on imgtx_fast's kernels (or, with backend='reference', on their
plain-PyTorch twins with the very same weights)."""
from .vq_diffusion import VQDiffusionConfig, VQDiffusionTransformer
from .vqvae import VQVAE, VQVAEConfig, train_vqvae

__all__ = ["VQDiffusionConfig", "VQDiffusionTransformer", "VQVAE", "VQVAEConfig", "train_vqvae"]
