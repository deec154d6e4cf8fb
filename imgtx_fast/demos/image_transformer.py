"""The Image Transformer demo: a class-conditional pixel model on the built-in digits.

    python -m imgtx_fast demo --model image-transformer            # shipped checkpoint
    python -m imgtx_fast demo --model image-transformer --train    # retrain (a few minutes)

A decoder-only Image Transformer (imgtx_fast.models.image_transformer) over the 256 intensities
of 16x16 digits, masked local 2D attention (query tiles 4x8, flanges 4x8). The report gives
- quality: bits/dim on the held-out digits (the paper's metric) and the share of samples that
  the VQ-Diffusion demo's classifier (shipped in digits_demo.pt, trained on real digits) labels
  as the requested class;
- speed: sampling the same batch with the same weights on the fast backend with KV caches
  (decode attention over the window), the reference backend with the same caches, and the
  reference backend recomputing the full masked forward at every step (timed on a prefix of
  the steps and scaled: every step costs the same full forward).
"""
import argparse
import math
import os
import time
from typing import Dict, Optional

import torch
from torch import Tensor

from ..models.image_transformer import ImageTransformer, ImageTransformerConfig
from ..training import fit
from .common import format_table, save_grid, shipped_checkpoint
from .vq_diffusion import default_checkpoint as vq_demo_checkpoint
from .vq_diffusion import load_checkpoint

__all__ = ["default_config", "default_checkpoint", "to_intensities", "train", "evaluate", "run", "main"]

_FORMAT = "imgtx_fast.image_transformer_demo/1"
CHECKPOINT_NAME = "image_transformer_demo.pt"


def default_checkpoint() -> str:
    """The checkpoint shipped in the package (written by scripts/train_image_transformer_demo.py)."""
    return shipped_checkpoint(CHECKPOINT_NAME)


def default_config() -> ImageTransformerConfig:
    return ImageTransformerConfig(height=16, width=16, channels=1, num_classes=10, attention="local2d",
                                  query_shape=(4, 8), memory_flange=(4, 8), dim=128, heads=4, depth=4)


def to_intensities(images: Tensor) -> Tensor:
    """[-1, 1] floats (the datasets' range) -> uint8 intensities 0..255."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def train(model: ImageTransformer, images: Tensor, labels: Tensor, steps: int, batch_size: int = 32,
          lr: float = 2e-3, seed: int = 0, progress: bool = True):
    """Teacher-forced NLL with AdamW, warmup + cosine decay, clipping at 1; eval mode after."""
    def batch_loss(g):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        return model.loss(images[idx], labels[idx])

    return fit(model, batch_loss, steps, lr=lr, seed=seed, desc="image transformer", progress=progress,
               betas=(0.9, 0.98), postfix=lambda loss: f"bpd={loss / math.log(2):.3f}")


def save(model: ImageTransformer, path: str, info: Dict[str, object]) -> None:
    """The model's checkpoint (float16 weights) plus the demo's `info` (plain values)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = model.state(half=True)
    blob["demo"] = _FORMAT
    blob["info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
    torch.save(blob, path)


def load(path: str):
    """(model in eval mode, info) from a demo checkpoint."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("demo") != _FORMAT:
        raise ValueError(f"checkpoint: {path!r} is not an Image Transformer demo checkpoint ({_FORMAT})")
    return ImageTransformer.from_state(blob).eval(), dict(blob.get("info", {}))


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def evaluate(model: ImageTransformer, test_images: Tensor, test_labels: Tensor, *, out: Optional[str],
             per_class: int = 8, temperature: float = 1.0, timing_batch: int = 10,
             recompute_steps: int = 8, seed: int = 0, reference: bool = True,
             progress: bool = True) -> Dict[str, object]:
    """Every number of the report: held-out bits/dim (both backends), samples + classifier
    accuracy, and fast-vs-reference sampling times."""
    res: Dict[str, object] = {"threads": torch.get_num_threads(), "temperature": temperature}
    C = model.config.num_classes
    model.backend = "fast"
    res["test_bpd"] = model.bits_per_dim(test_images, test_labels)
    if reference:
        model.backend = "reference"
        res["test_bpd_reference"] = model.bits_per_dim(test_images, test_labels)
        model.backend = "fast"

    labels = torch.arange(C).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    samples = torch.cat([model.sample(labels[i:i + 40], temperature=temperature, generator=g)
                         for i in range(0, len(labels), 40)])
    res["grid_s_per_image"] = (time.perf_counter() - t0) / len(labels)
    as_float = samples.float() / 127.5 - 1.0
    judge = load_checkpoint(vq_demo_checkpoint()).classifier
    pred = judge.predict(as_float)
    res["samples"] = len(labels)
    res["sample_acc"] = float((pred == labels).float().mean())
    res["classifier_test_acc"] = float((judge.predict(test_images.float() / 127.5 - 1.0) == test_labels)
                                       .float().mean())
    if out is not None:
        path = os.path.join(out, "image_transformer_samples.png")
        res["grid_size"] = save_grid(as_float, C, path)
        res["grid_path"] = path

    # speed: same batch, same weights, same seed
    tb = torch.arange(timing_batch) % C
    N = model.config.num_positions

    def sampler(backend, use_cache, steps=None):
        model.backend = backend
        return lambda: model.sample(tb, generator=torch.Generator().manual_seed(seed),
                                    use_cache=use_cache, steps=steps)

    sampler("fast", True, 4)()  # warm-up
    res["timing_batch"] = timing_batch
    res["fast_s"] = _time(sampler("fast", True))
    if reference:
        res["reference_cache_s"] = _time(sampler("reference", True))
        k = min(recompute_steps, N)
        res["reference_recompute_s"] = _time(sampler("reference", False, k)) * N / k
        res["recompute_steps_timed"] = k
    model.backend = None
    return res


def format_report(res: Dict[str, object], model: ImageTransformer, info: Dict[str, object]) -> str:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    rows = [("model", f"Image Transformer, {cfg.height}x{cfg.width}x{cfg.channels} pixels, {cfg.attention} "
                      f"q{cfg.query_shape} f{cfg.memory_flange}, dim {cfg.dim} x {cfg.depth} blocks, "
                      f"{params:,} parameters, {cfg.num_classes} classes"),
            ("trained", f"{info.get('steps', '?')} steps in {float(info.get('train_s', float('nan'))):.0f} s"),
            ("held-out bits/dim", f"{res['test_bpd']:.3f} (fast)"
             + (f", {res['test_bpd_reference']:.3f} (reference)" if "test_bpd_reference" in res else ""))]
    N = cfg.num_positions
    B = res["timing_batch"]
    rows.append(("sampling, fast + KV cache", f"{res['fast_s']:.2f} s for {B} images ({N} steps, "
                                              f"{res['threads']} threads)"))
    if "reference_cache_s" in res:
        rows.append(("sampling, reference + KV cache", f"{res['reference_cache_s']:.2f} s  -> fast is "
                                                       f"{res['reference_cache_s'] / res['fast_s']:.2f}x faster"))
        rows.append(("sampling, reference recompute", f"{res['reference_recompute_s']:.2f} s (timed "
                                                      f"{res['recompute_steps_timed']} steps, scaled) -> fast "
                                                      f"is {res['reference_recompute_s'] / res['fast_s']:.1f}x faster"))
    rows.append(("sample accuracy", f"{res['sample_acc'] * 100:.1f}% of {res['samples']} samples (temperature "
                                    f"{res['temperature']}) labelled as the requested class by the digits "
                                    f"classifier ({res['classifier_test_acc'] * 100:.1f}% on real test digits)"))
    if "grid_path" in res:
        w, h = res["grid_size"]
        rows.append(("sample grid", f"{res['grid_path']} ({w}x{h} px, one row per class)"))
    return format_table(rows)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="imgtx_fast_demo", help="folder for the PNG grid")
    parser.add_argument("--train", action="store_true", help="train from scratch instead of loading the checkpoint")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to load (default: the shipped one); with --train, where to save it "
                             "(default: OUT/image_transformer_demo.pt)")
    parser.add_argument("--train-steps", type=int, default=1200, help="training steps (--train)")
    parser.add_argument("--attention", choices=["local2d", "local1d"], default="local2d",
                        help="attention pattern of a retrained model (--train)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class in the grid")
    parser.add_argument("--timing-batch", type=int, default=10, help="batch timed on every backend")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-backend timings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and imgtx_fast threads (default 1: a sampling step is small; 0 keeps "
                             "torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args, log=print) -> Dict[str, object]:
    from .. import datasets

    if args.threads:
        torch.set_num_threads(args.threads)
    xtr, ytr = datasets.digits(16, "train", seed=0)
    xte, yte = datasets.digits(16, "test", seed=0)
    xtr, xte = to_intensities(xtr), to_intensities(xte)
    ckpt = args.checkpoint or default_checkpoint()
    if not args.train and os.path.isfile(ckpt):
        model, info = load(ckpt)
        log(f"loaded {ckpt} ({os.path.getsize(ckpt) / 1e6:.2f} MB, trained by "
            f"scripts/train_image_transformer_demo.py)")
    else:
        if not args.train:
            log(f"no checkpoint at {ckpt}: training from scratch")
        cfg = default_config()
        if args.attention == "local1d":
            cfg.attention, cfg.block = "local1d", 64
        torch.manual_seed(args.seed)
        model = ImageTransformer(cfg)
        log(f"training: {sum(p.numel() for p in model.parameters()):,} parameters, {args.train_steps} steps, "
            f"{len(xtr)} digits")
        t0 = time.perf_counter()
        train(model, xtr, ytr, args.train_steps, seed=args.seed, progress=not args.quiet)
        info = {"steps": args.train_steps, "train_s": time.perf_counter() - t0}
        save_to = args.checkpoint or os.path.join(args.out, CHECKPOINT_NAME)
        save(model, save_to, info)
        log(f"saved {save_to} ({os.path.getsize(save_to) / 1e6:.2f} MB)")
    res = evaluate(model, xte, yte, out=args.out, per_class=args.per_class, temperature=args.temperature,
                   timing_batch=args.timing_batch, seed=args.seed, reference=not args.no_reference,
                   progress=not args.quiet)
    log(format_report(res, model, info))
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgtx_fast demo --model image-transformer")
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
