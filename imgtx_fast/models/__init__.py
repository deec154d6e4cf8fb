"""Models whose hot ops run on imgtx_fast's kernels (or, with backend='reference', on their
plain-PyTorch twins with the very same weights)."""
from .image_transformer import ImageTransformer, ImageTransformerConfig
from .imagen import GaussianSchedule, ImagenConfig, ImagenDenoiser, ImagenPipeline
from .text_encoder import TextEncoder, WordTokenizer
from .vq_diffusion import VQDiffusionConfig, VQDiffusionTransformer
from .vqvae import VQVAE, VQVAEConfig, train_vqvae

__all__ = ["GaussianSchedule", "ImageTransformer", "ImageTransformerConfig", "ImagenConfig",
           "ImagenDenoiser", "ImagenPipeline", "TextEncoder", "VQDiffusionConfig",
           "VQDiffusionTransformer", "VQVAE", "VQVAEConfig", "WordTokenizer", "train_vqvae"]
