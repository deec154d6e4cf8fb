"""The end-to-end demo: a class-conditional VQ-VAE + VQ-Diffusion model on the built-in digits.

    python -m imgtx_fast demo                    # load the shipped checkpoint, sample, report
    python -m imgtx_fast demo --train            # retrain the three models from scratch
    python -m imgtx_fast demo --data PATH        # train on a folder of images (class = subfolder)

Three models make up a demo checkpoint: the VQ-VAE tokenizer (16x16 images -> 4x4 tokens by
default), the VQ-Diffusion transformer over those tokens, conditioned on the class, and a tiny
CNN classifier trained on the real images, which labels the generated samples so that quality
is a number (accuracy against the requested classes) rather than an impression.

The report compares sampling on the fast backend (our kernels) with the reference backend
(plain PyTorch), same weights, same generator seed; the two backends draw their random numbers
from different streams (Philox in the kernels, torch.multinomial in the reference), so their
samples differ individually but come from the same distribution.

Everything here is deterministic for a given seed on a given machine and thread count (float
reductions in a different order can change the last bits, and sampling amplifies that).
"""
import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..diffusion import TimestepSampler
from ..models.vq_diffusion import VQDiffusionConfig, VQDiffusionTransformer
from ..models._common import half_state, load_state
from ..models.vqvae import VQVAE, VQVAEConfig, train_vqvae
from ..training import fit, progress_bar
from .common import Classifier, format_table, load_data, save_grid, shipped_checkpoint, train_classifier

__all__ = ["DemoConfig", "DemoModels", "train_diffusion", "train_models", "save_checkpoint",
           "load_checkpoint", "default_checkpoint", "evaluate", "format_report", "run", "main"]

_FORMAT = "imgtx_fast.demo/1"
CHECKPOINT_NAME = "digits_demo.pt"


def default_checkpoint() -> str:
    """The checkpoint shipped in the package (written by scripts/train_demo.py)."""
    return shipped_checkpoint(CHECKPOINT_NAME)


# ------------------------------------------------------------------------------------ config

@dataclass
class DemoConfig:
    """Sizes and training lengths of the three demo models (stored in the checkpoint).

    The defaults are tuned for the built-in digits on a 2-core CPU: 16x16 images, a 4x
    downsampling VQ-VAE (4x4 = 16 tokens per image), a 4-block transformer of width 96.
    """
    image_size: int = 16
    channels: int = 1
    seed: int = 0
    # tokenizer
    vq_channels: int = 16
    vq_channel_mult: Tuple[int, ...] = (1, 2, 2)
    vq_embed_dim: int = 32
    vq_num_codes: int = 128
    vq_steps: int = 600
    vq_batch: int = 64
    vq_lr: float = 2e-3
    # diffusion transformer
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_timesteps: int = 100
    cond_drop_prob: float = 0.1
    diffusion_steps: int = 800
    diffusion_batch: int = 64
    diffusion_lr: float = 1e-3
    # classifier
    classifier_width: int = 16
    classifier_steps: int = 300
    classifier_batch: int = 128
    classifier_lr: float = 3e-3

    def __post_init__(self):
        self.vq_channel_mult = tuple(int(m) for m in self.vq_channel_mult)
        for name in ("image_size", "vq_steps", "diffusion_steps", "classifier_steps", "vq_batch",
                     "diffusion_batch", "classifier_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DemoConfig: {name} must be a positive int, got {v!r}")
        f = 2 ** (len(self.vq_channel_mult) - 1)
        if self.image_size % f:
            raise ValueError(f"DemoConfig: image_size ({self.image_size}) must be a multiple of the "
                             f"VQ-VAE's downsampling factor {f}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vq_channel_mult"] = list(self.vq_channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DemoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DemoConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    def vqvae_config(self) -> VQVAEConfig:
        return VQVAEConfig(in_channels=self.channels, channels=self.vq_channels,
                           channel_mult=self.vq_channel_mult, embed_dim=self.vq_embed_dim,
                           num_codes=self.vq_num_codes, norm_groups=min(8, self.vq_channels))

    def diffusion_config(self, num_classes: int) -> VQDiffusionConfig:
        side = self.image_size // 2 ** (len(self.vq_channel_mult) - 1)
        return VQDiffusionConfig(num_codes=self.vq_num_codes, height=side, width=side, dim=self.dim,
                                 depth=self.depth, heads=self.heads, mlp_ratio=self.mlp_ratio,
                                 condition="class", num_classes=num_classes,
                                 num_timesteps=self.num_timesteps,
                                 cond_drop_prob=self.cond_drop_prob)


def train_diffusion(model: VQDiffusionTransformer, tokens: Tensor, labels: Tensor, steps: int = 1500,
                    batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> List[float]:
    """VQ-Diffusion's loss with the importance sampler, AdamW, warmup + cosine decay, gradient
    clipping at 1; returns the loss per step. The model is left in eval mode."""
    sampler = TimestepSampler(model.config.num_timesteps)

    def batch_loss(g):
        idx = torch.randint(0, len(tokens), (batch_size,), generator=g)
        return model.training_loss(tokens[idx], labels[idx], sampler, generator=g)

    return fit(model, batch_loss, steps, lr=lr, seed=seed, desc="diffusion", progress=progress)


# ------------------------------------------------------------------------------------ models

@dataclass
class DemoModels:
    """The three models of a demo checkpoint and what they were trained on."""
    config: DemoConfig
    vqvae: VQVAE
    diffusion: VQDiffusionTransformer
    classifier: Classifier
    classes: List[str]
    info: Dict[str, object] = field(default_factory=dict)  # training times, data set, metrics

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def train_models(cfg: DemoConfig, train_images: Tensor, train_labels: Tensor,
                 classes: Sequence[str], progress: bool = True, log=print) -> DemoModels:
    """Train tokenizer, diffusion transformer and classifier with cfg.seed (each model is
    initialised from its own seed, so changing one stage does not perturb the others)."""
    info: Dict[str, object] = {}
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    vqvae = VQVAE(cfg.vqvae_config())
    log(f"[1/3] VQ-VAE tokenizer: {sum(p.numel() for p in vqvae.parameters()):,} parameters, "
        f"{cfg.vq_steps} steps, {tuple(train_images.shape[-2:])} -> "
        f"{cfg.image_size // vqvae.config.downsample_factor}x"
        f"{cfg.image_size // vqvae.config.downsample_factor} tokens of {cfg.vq_num_codes} codes")
    train_vqvae(vqvae, train_images, steps=cfg.vq_steps, batch_size=cfg.vq_batch, lr=cfg.vq_lr,
                progress=progress, log_every=max(1, cfg.vq_steps // 10), seed=cfg.seed)
    info["vqvae_train_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    tokens = torch.cat([vqvae.encode(train_images[i:i + 512]) for i in range(0, len(train_images), 512)])
    torch.manual_seed(cfg.seed + 1)
    diffusion = VQDiffusionTransformer(cfg.diffusion_config(len(classes)))
    log(f"[2/3] VQ-Diffusion transformer: {sum(p.numel() for p in diffusion.parameters()):,} "
        f"parameters, {cfg.diffusion_steps} steps")
    train_diffusion(diffusion, tokens, train_labels, steps=cfg.diffusion_steps,
                    batch_size=cfg.diffusion_batch, lr=cfg.diffusion_lr, seed=cfg.seed + 1,
                    progress=progress)
    info["diffusion_train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    torch.manual_seed(cfg.seed + 2)
    classifier = Classifier(len(classes), cfg.channels, cfg.classifier_width)
    log(f"[3/3] classifier (the quality judge): {sum(p.numel() for p in classifier.parameters()):,} "
        f"parameters, {cfg.classifier_steps} steps")
    train_classifier(classifier, train_images, train_labels, steps=cfg.classifier_steps,
                     batch_size=cfg.classifier_batch, lr=cfg.classifier_lr, seed=cfg.seed + 2,
                     progress=progress)
    info["classifier_train_s"] = time.perf_counter() - t2
    info["train_s"] = time.perf_counter() - t0
    return DemoModels(cfg, vqvae, diffusion.eval(), classifier.eval(), list(classes), info)


def save_checkpoint(models: DemoModels, path: str, half: bool = True) -> None:
    """One file for the three models, their configs, the class names and `info` (plain values
    only, so load_checkpoint can use weights_only=True). half: store weights as float16."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = {k: v for k, v in models.info.items() if isinstance(v, (int, float, str, bool))}
    blob = {
        "format": _FORMAT,
        "config": models.config.to_dict(),
        "classes": list(models.classes),
        "info": info,
        "vqvae": {"config": models.vqvae.config.to_dict(), "state_dict": half_state(models.vqvae, half)},
        "diffusion": {"config": asdict(models.diffusion.config),
                      "state_dict": half_state(models.diffusion, half)},
        "classifier": {"config": dict(models.classifier.config),
                       "state_dict": half_state(models.classifier, half)},
    }
    torch.save(blob, path)


def load_checkpoint(path: str, map_location="cpu") -> DemoModels:
    """The models save_checkpoint wrote, in eval mode, float32."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file: {path!r}")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"checkpoint: {path!r} is not an imgtx_fast demo checkpoint ({_FORMAT})")
    cfg = DemoConfig.from_dict(blob["config"])
    vqvae = VQVAE(VQVAEConfig.from_dict(blob["vqvae"]["config"]))
    load_state(vqvae, blob["vqvae"]["state_dict"])
    diffusion = VQDiffusionTransformer(VQDiffusionConfig(**blob["diffusion"]["config"]))
    load_state(diffusion, blob["diffusion"]["state_dict"])
    classifier = Classifier(**blob["classifier"]["config"])
    load_state(classifier, blob["classifier"]["state_dict"])
    return DemoModels(cfg, vqvae.eval(), diffusion.eval(), classifier.eval(),
                      list(blob["classes"]), dict(blob.get("info", {})))


# ------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def _sample_images(models: DemoModels, labels: Tensor, num_steps: int, guidance: float,
                   truncation: Optional[float], seed: int, backend: str, chunk: int = 256,
                   bar=None) -> Tuple[Tensor, float]:
    """Decoded samples for `labels` on `backend` and the seconds the diffusion sampling took
    (token sampling only, the decoder is timed apart: it is the same on both backends)."""
    d = models.diffusion
    previous = d.backend
    d.backend = backend
    g = torch.Generator().manual_seed(seed)
    tokens, seconds = [], 0.0
    try:
        for i in range(0, len(labels), chunk):
            t = time.perf_counter()
            tokens.append(d.sample(labels[i:i + chunk], num_steps=num_steps, guidance_scale=guidance,
                                   truncation_rate=truncation, generator=g))
            seconds += time.perf_counter() - t
            if bar is not None:
                bar.update(len(labels[i:i + chunk]))
    finally:
        d.backend = previous
    tokens = torch.cat(tokens)
    images = torch.cat([models.vqvae.decode_tokens(tokens[i:i + 512]) for i in range(0, len(tokens), 512)])
    return images.clamp(-1, 1), seconds


@torch.no_grad()
def evaluate(models: DemoModels, test_images: Tensor, test_labels: Tensor, *, out: Optional[str] = None,
             per_class: int = 8, eval_per_class: int = 30, num_steps: int = 50,
             guidance: float = 3.0, truncation: Optional[float] = 0.9, timing_batch: int = 20,
             seed: int = 0, progress: bool = True, reference: bool = True) -> Dict[str, object]:
    """Every number of the demo's report (a dict; format_report prints it).

    Samples eval_per_class images of every class on the fast backend (the first per_class of
    each class make the PNG grid, classes as rows), labels them with the classifier; times the
    same model on the fast and the reference backend on `timing_batch` images (classes in turn),
    same generator seed; measures the tokenizer on the test images.
    """
    C = models.num_classes
    eval_per_class = max(eval_per_class, per_class)
    res: Dict[str, object] = {"classes": C, "num_steps": num_steps, "guidance": guidance,
                              "truncation": truncation, "threads": torch.get_num_threads()}
    vq = models.vqvae
    K = vq.config.num_codes
    # tokenizer
    recon, toks = [], []
    for i in range(0, len(test_images), 512):
        x = test_images[i:i + 512]
        tk = vq.encode(x)
        toks.append(tk.flatten())
        recon.append(vq.decode_tokens(tk).clamp(-1, 1))
    recon, toks = torch.cat(recon), torch.cat(toks)
    res["recon_l1"] = float((recon - test_images).abs().mean())
    res["recon_mse"] = float(((recon - test_images) ** 2).mean())
    counts = torch.bincount(toks, minlength=K).double()
    p = counts / counts.sum()
    res["codes_used"] = int((counts > 0).sum())
    res["num_codes"] = K
    res["perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    res["classifier_test_acc"] = float((models.classifier.predict(test_images) == test_labels).float().mean())
    res["classifier_recon_acc"] = float((models.classifier.predict(recon) == test_labels).float().mean())

    # samples on the fast backend: class c, sample j at row c, column j
    labels = torch.arange(C).repeat_interleave(eval_per_class)
    bar = progress_bar(len(labels), "sampling (fast)", progress, unit="img")
    images, fast_all_s = _sample_images(models, labels, num_steps, guidance, truncation, seed, "fast", bar=bar)
    if bar is not None:
        bar.close()
    pred = models.classifier.predict(images)
    res["samples"] = len(labels)
    res["sample_acc"] = float((pred == labels).float().mean())
    res["sample_acc_per_class"] = [float((pred[labels == c] == c).float().mean()) for c in range(C)]
    res["grid_sampling_s_per_image"] = fast_all_s / len(labels)
    pick = torch.cat([torch.arange(c * eval_per_class, c * eval_per_class + per_class) for c in range(C)])
    if out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "samples.png")
        res["grid_size"] = save_grid(images[pick], C, path)
        res["grid_path"] = path
        rpath = os.path.join(out, "reconstructions.png")
        n = min(len(test_images), per_class * 2)
        save_grid(torch.cat([test_images[:n], recon[:n]]), 2, rpath)
        res["recon_path"] = rpath

    # fast vs reference, same batch, same weights, same seed
    tb = torch.arange(timing_batch) % C
    _sample_images(models, tb[:min(2, timing_batch)], min(num_steps, 2), guidance, truncation, seed, "fast")  # warm-up
    _, fast_s = _sample_images(models, tb, num_steps, guidance, truncation, seed, "fast")
    res["timing_batch"] = timing_batch
    res["fast_s_per_image"] = fast_s / timing_batch
    if reference:
        bar = progress_bar(timing_batch, "sampling (reference)", progress, unit="img")
        ref_images, ref_s = _sample_images(models, tb, num_steps, guidance, truncation, seed, "reference", bar=bar)
        if bar is not None:
            bar.close()
        res["reference_s_per_image"] = ref_s / timing_batch
        res["speedup"] = ref_s / fast_s
        res["reference_sample_acc"] = float((models.classifier.predict(ref_images) == tb).float().mean())
    return res


def format_report(res: Dict[str, object], models: Optional[DemoModels] = None) -> str:
    """The demo's table as text: one `name | value` row per measurement."""
    rows = []
    if models is not None:
        cfg = models.config
        side = cfg.image_size // 2 ** (len(cfg.vq_channel_mult) - 1)
        rows.append(("model", f"VQ-VAE {cfg.image_size}x{cfg.image_size} -> {side}x{side} tokens, "
                              f"K={cfg.vq_num_codes}; transformer dim {cfg.dim} x {cfg.depth} blocks; "
                              f"{res['classes']} classes"))
    rows.append(("sampling", f"{res['num_steps']} steps, guidance {res['guidance']}, truncation "
                             f"{res['truncation']}, {res['threads']} threads"))
    rows.append(("time per image, fast", f"{res['fast_s_per_image'] * 1e3:.2f} ms  "
                                         f"(batch {res['timing_batch']})"))
    if "reference_s_per_image" in res:
        rows.append(("time per image, reference", f"{res['reference_s_per_image'] * 1e3:.2f} ms  "
                                                  f"(batch {res['timing_batch']}, same weights and seed)"))
        rows.append(("speed-up", f"{res['speedup']:.2f}x"))
    else:
        rows.append(("time per image, reference", "skipped"))
        rows.append(("speed-up", "-"))
    rows.append(("time per image, grid batch", f"{res['grid_sampling_s_per_image'] * 1e3:.2f} ms  "
                                               f"(fast, batch {res['samples']})"))
    rows.append(("reconstruction error", f"L1 {res['recon_l1']:.4f}, MSE {res['recon_mse']:.4f} "
                                         "(test images, pixels in [-1, 1])"))
    rows.append(("codebook usage", f"{res['codes_used']}/{res['num_codes']} codes used, perplexity "
                                   f"{res['perplexity']:.1f} (test images)"))
    rows.append(("classifier accuracy", f"{res['classifier_test_acc'] * 100:.1f}% real test images, "
                                        f"{res['classifier_recon_acc'] * 100:.1f}% their reconstructions"))
    target = " (target >= 80%)" if res["classes"] > 1 else " (one class: trivially 100%)"
    rows.append(("sample accuracy", f"{res['sample_acc'] * 100:.1f}% of {res['samples']} generated "
                                    f"samples labelled as the requested class{target}"))
    if "reference_sample_acc" in res:
        rows.append(("sample accuracy, reference", f"{res['reference_sample_acc'] * 100:.1f}% of "
                                                   f"{res['timing_batch']} (timing batch)"))
    per = res.get("sample_acc_per_class")
    if per and len(per) <= 20:
        rows.append(("  per class", " ".join(f"{a * 100:.0f}" for a in per)))
    if "grid_path" in res:
        w, h = res["grid_size"]
        rows.append(("sample grid", f"{res['grid_path']} ({w}x{h} px, one row per class)"))
        rows.append(("reconstructions", f"{res['recon_path']} (top: test images, bottom: decoded tokens)"))
    return format_table(rows)


# ------------------------------------------------------------------------------------ command

def add_arguments(parser) -> None:
    parser.add_argument("--out", default="imgtx_fast_demo", help="folder for the PNG grids (default ./imgtx_fast_demo)")
    parser.add_argument("--train", action="store_true", help="train the models from scratch instead of loading the checkpoint")
    parser.add_argument("--data", default=None, help="folder of images (class = subfolder) to train on; implies --train")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to load (default: the one shipped in the package); with --train, "
                             "where to save the trained models (default: OUT/demo.pt)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (skip-step jumps over the 100 timesteps)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--truncation", type=float, default=0.9, help="truncation rate (1 = none)")
    parser.add_argument("--per-class", type=int, default=8, help="samples per class in the grid")
    parser.add_argument("--eval-per-class", type=int, default=30, help="samples per class the classifier labels")
    parser.add_argument("--timing-batch", type=int, default=20, help="batch timed on both backends")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-backend timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=None, help="training image size (default 16)")
    parser.add_argument("--vq-steps", type=int, default=None, help="VQ-VAE training steps (--train)")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="transformer training steps (--train)")
    parser.add_argument("--classifier-steps", type=int, default=None, help="classifier training steps (--train)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and imgtx_fast threads (default 1: the demo's models are small, and "
                             "on a busy 2-core machine a second thread's synchronisation costs up to 20x "
                             "in training; 0 keeps torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def default_config() -> DemoConfig:
    """The configuration `demo --train` starts from (the shipped checkpoint's)."""
    return DemoConfig()


def config_from_args(args, base: Optional[DemoConfig] = None) -> DemoConfig:
    cfg = base or default_config()
    over = {"seed": args.seed}
    for name, key in (("image_size", "image_size"), ("vq_steps", "vq_steps"),
                      ("diffusion_steps", "diffusion_steps"), ("classifier_steps", "classifier_steps")):
        v = getattr(args, name)
        if v is not None:
            over[key] = v
    return dataclasses.replace(cfg, **over)


def run(args, config: Optional[DemoConfig] = None, log=print) -> Tuple[DemoModels, Dict[str, object]]:
    """The demo: get the models (load or train), evaluate, write the grids, print the table."""
    progress = not args.quiet
    if args.threads:
        torch.set_num_threads(args.threads)
    train = args.train or args.data is not None
    ckpt = args.checkpoint or default_checkpoint()
    models = None
    if not train:
        if os.path.isfile(ckpt):
            models = load_checkpoint(ckpt)
            log(f"loaded {ckpt} ({os.path.getsize(ckpt) / 1e6:.2f} MB, trained in "
                f"{float(models.info.get('train_s', float('nan'))):.0f} s by scripts/train_demo.py)")
        else:
            log(f"no checkpoint at {ckpt}: training from scratch (a few minutes)")
            train = True
    if models is not None:
        cfg = models.config
        xtr, ytr, xte, yte, classes, desc = load_data(None, cfg.image_size, seed=0)
    else:
        cfg = config_from_args(args, config)
        xtr, ytr, xte, yte, classes, desc = load_data(args.data, cfg.image_size, seed=cfg.seed)
        log(f"data: {desc}: {len(xtr)} train / {len(xte)} test images, {len(classes)} classes, "
            f"{cfg.image_size}x{cfg.image_size}")
        models = train_models(cfg, xtr, ytr, classes, progress=progress, log=log)
        log(f"trained in {models.info['train_s']:.0f} s")
        save_to = args.checkpoint or os.path.join(args.out, "demo.pt")
        models.info["data"] = desc
        save_checkpoint(models, save_to)
        log(f"saved the models to {save_to} ({os.path.getsize(save_to) / 1e6:.2f} MB)")
    res = evaluate(models, xte, yte, out=args.out, per_class=args.per_class,
                   eval_per_class=args.eval_per_class, num_steps=args.steps, guidance=args.guidance,
                   truncation=None if args.truncation >= 1 else args.truncation,
                   timing_batch=args.timing_batch, seed=args.seed, progress=progress,
                   reference=not args.no_reference)
    log(format_report(res, models))
    return models, res


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imgtx_fast demo")
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
