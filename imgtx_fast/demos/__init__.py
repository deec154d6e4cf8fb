"""`imgtx-fast demo`: one module per model family, each with its shipped checkpoint.

    imgtx-fast demo                               # VQ-VAE + VQ-Diffusion on digits (vq_diffusion)
    imgtx-fast demo --model image-transformer     # Image Transformer, local 2D attention
    imgtx-fast demo --model imagen                # Imagen-style text-to-image diffusion
    imgtx-fast demo --kernels                     # each kernel family against plain PyTorch

Each model module offers add_arguments(parser), run(args) and main(argv); `common` holds what
they share (the classifier that scores samples, the data split, the PNG grid, the report table).
"""
import argparse
import importlib

MODELS = {"vq-diffusion": "vq_diffusion", "image-transformer": "image_transformer", "imagen": "imagen"}


def main(argv=None) -> int:
    """`demo [--model NAME] [...]`: a model demo (default vq-diffusion), each with its own
    options (`demo --model NAME --help`); `demo --kernels`: the kernel demos."""
    pick = argparse.ArgumentParser(add_help=False)
    pick.add_argument("--model", choices=sorted(MODELS), default="vq-diffusion")
    pick.add_argument("--kernels", action="store_true")
    known, rest = pick.parse_known_args(argv)
    if known.kernels:
        from . import kernels

        kernels.run()
        return 0
    module = importlib.import_module(f"{__name__}.{MODELS[known.model]}")
    parser = argparse.ArgumentParser(
        prog=f"imgtx-fast demo --model {known.model}",
        description="Sample a grid with a shipped model, time the fast against the reference backend, "
                    "measure quality. Models: " + ", ".join(sorted(MODELS)) + "; --kernels runs "
                    "the kernel demos instead.")
    module.add_arguments(parser)
    module.run(parser.parse_args(rest))
    return 0
