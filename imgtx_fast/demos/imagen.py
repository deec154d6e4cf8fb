"""The Imagen-style demo: text-to-image on the built-in digits, a two-stage cascade.

    python -m imgtx_fast demo --model imagen            # load the shipped checkpoint, sample, report
    python -m imgtx_fast demo --model imagen --train    # retrain (scripts/train_imagen_demo.py)

Four models make up the checkpoint: a frozen tiny random T5 encoder (transformers' T5EncoderModel
with a word-level tokenizer over the prompt templates: no sentencepiece files are needed
offline), the base denoiser (8x8 digits, conditioned on prompts such as "a digit seven"), the
2x super-resolution denoiser (8x8 -> 16x16, conditioned on the noise-augmented upsampled base
output and the same prompt) and the demo's CNN classifier (imgtx_fast.demos.common.Classifier, trained
on the real 16x16 digits), which turns quality into a number: the fraction of the cascade's
samples for "a digit <d>" that it labels d.

The report times the whole cascade on the fast backend (our attention kernels) and on the
reference backend (plain PyTorch), same weights, same generator seed: the two backends' floats
differ in the last bits, so their samples are close but not identical.
"""
import dataclasses
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..models._common import half_state, load_state
from ..models.imagen import ImagenConfig, ImagenDenoiser, ImagenPipeline
from ..models.text_encoder import TextEncoder, WordTokenizer
from ..training import fit
from .common import Classifier, format_table, load_data, save_grid, shipped_checkpoint, train_classifier

__all__ = ["ImagenDemoConfig", "ImagenDemoModels", "DIGIT_WORDS", "TEMPLATES", "prompt", "train_denoiser",
           "train_models", "save_checkpoint", "load_checkpoint", "default_checkpoint", "evaluate",
           "format_report", "add_arguments", "run", "main"]

_FORMAT = "imgtx_fast.imagen_demo/1"
CHECKPOINT_NAME = "imagen_demo.pt"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("a digit {}", "the number {}", "a handwritten {}", "an image of the digit {}")


def prompt(label: int, template: int = 0) -> str:
    return TEMPLATES[template].format(DIGIT_WORDS[label])


def default_checkpoint() -> str:
    """The checkpoint shipped in the package (written by scripts/train_imagen_demo.py)."""
    return shipped_checkpoint(CHECKPOINT_NAME)


@dataclass
class ImagenDemoConfig:
    """Sizes and training lengths (stored in the checkpoint). Tuned for ~10 minutes of training
    on a 2-core CPU: both stages see 64 tokens (8x8 pixels, patch 1; 16x16 pixels, patch 2)."""
    seed: int = 0
    low_size: int = 8
    high_size: int = 16
    # frozen text encoder (tiny random T5)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 8
    # diffusion
    num_timesteps: int = 1000
    beta_schedule: str = "cosine"
    prediction: str = "v"
    cond_drop_prob: float = 0.1
    # base stage
    base_dim: int = 64
    base_depth: int = 3
    base_heads: int = 4
    base_steps: int = 1500
    base_batch: int = 64
    base_lr: float = 1e-3
    # super-resolution stage
    sr_dim: int = 64
    sr_depth: int = 2
    sr_heads: int = 4
    sr_patch: int = 2
    sr_max_aug: float = 0.3
    sr_steps: int = 2000
    sr_batch: int = 64
    sr_lr: float = 1e-3
    # classifier (the judge)
    classifier_width: int = 16
    classifier_steps: int = 300
    classifier_batch: int = 128
    classifier_lr: float = 3e-3

    def __post_init__(self):
        for name in ("base_steps", "sr_steps", "classifier_steps", "base_batch", "sr_batch", "classifier_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ImagenDemoConfig: {name} must be a positive int, got {v!r}")
        if self.high_size != 2 * self.low_size:
            raise ValueError(f"ImagenDemoConfig: high_size ({self.high_size}) must be 2 x low_size ({self.low_size})")

    def base_config(self) -> ImagenConfig:
        return ImagenConfig(image_size=self.low_size, patch_size=1, dim=self.base_dim, depth=self.base_depth,
                            heads=self.base_heads, text_dim=self.text_dim, num_timesteps=self.num_timesteps,
                            beta_schedule=self.beta_schedule, prediction=self.prediction,
                            cond_drop_prob=self.cond_drop_prob)

    def sr_config(self) -> ImagenConfig:
        return ImagenConfig(image_size=self.high_size, patch_size=self.sr_patch, low_res_size=self.low_size,
                            dim=self.sr_dim, depth=self.sr_depth, heads=self.sr_heads, text_dim=self.text_dim,
                            num_timesteps=self.num_timesteps, beta_schedule=self.beta_schedule,
                            prediction=self.prediction, cond_drop_prob=self.cond_drop_prob,
                            max_aug_level=self.sr_max_aug)


@dataclass
class ImagenDemoModels:
    config: ImagenDemoConfig
    pipeline: ImagenPipeline
    classifier: Classifier
    info: Dict[str, object] = field(default_factory=dict)


def all_prompts() -> List[str]:
    return [prompt(d, k) for d in range(10) for k in range(len(TEMPLATES))]


def _text_table(encoder: TextEncoder) -> Tuple[Tensor, Tensor]:
    """Embeddings of every (digit, template) prompt: (10, templates, L, d) and lengths (10, templates).
    The encoder is frozen, so training looks prompts up here instead of re-encoding them."""
    emb, lengths = encoder(all_prompts())
    n = len(TEMPLATES)
    return emb.view(10, n, *emb.shape[1:]), lengths.view(10, n)


def train_denoiser(model: ImagenDenoiser, images: Tensor, labels: Tensor, text_table: Tuple[Tensor, Tensor],
                   steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                   low_res: Optional[Tensor] = None, progress: bool = True, desc: str = "denoiser") -> List[float]:
    """AdamW, warmup + cosine decay, gradient clipping at 1; each image is paired with a random
    template of its digit's prompt. low_res: the SR stage's low-resolution images (aligned with
    `images`). Returns the loss per step; the model is left in eval mode."""
    emb, lengths = text_table

    def batch_loss(g):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        tpl = torch.randint(0, emb.shape[1], (batch_size,), generator=g)
        y = labels[idx]
        return model.training_loss(images[idx], emb[y, tpl], lengths[y, tpl],
                                   low_res=None if low_res is None else low_res[idx], generator=g)

    return fit(model, batch_loss, steps, lr=lr, seed=seed, desc=desc, progress=progress)


def _digits(cfg: ImagenDemoConfig):
    """(low-res train images, high-res train images, labels, high-res test images, test labels)."""
    from .. import datasets

    lo, y = datasets.digits(cfg.low_size, "train", seed=0)
    hi, y2 = datasets.digits(cfg.high_size, "train", seed=0)
    assert torch.equal(y, y2)
    _, _, xte, yte, _, _ = load_data(None, cfg.high_size, seed=0)
    return lo, hi, y, xte, yte


def train_models(cfg: ImagenDemoConfig, progress: bool = True, log=print) -> ImagenDemoModels:
    """Text encoder (random, frozen), base stage, SR stage and classifier, each from its own seed."""
    info: Dict[str, object] = {}
    lo, hi, y, _, _ = _digits(cfg)
    t0 = time.perf_counter()
    encoder = TextEncoder.random(WordTokenizer.from_texts(all_prompts()), d_model=cfg.text_dim,
                                 num_layers=cfg.text_layers, num_heads=cfg.text_heads,
                                 max_length=cfg.max_length, seed=cfg.seed)
    table = _text_table(encoder)
    torch.manual_seed(cfg.seed + 1)
    base = ImagenDenoiser(cfg.base_config())
    log(f"[1/3] base stage {cfg.low_size}x{cfg.low_size}: {_count(base):,} parameters, {cfg.base_steps} steps "
        f"(text encoder: frozen random T5, {_count(encoder):,} parameters)")
    info["base_loss"] = _tail(train_denoiser(base, lo, y, table, cfg.base_steps, cfg.base_batch, cfg.base_lr,
                                             cfg.seed + 1, progress=progress, desc="base"))
    info["base_train_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    torch.manual_seed(cfg.seed + 2)
    sr = ImagenDenoiser(cfg.sr_config())
    log(f"[2/3] super-resolution stage {cfg.low_size} -> {cfg.high_size}: {_count(sr):,} parameters, "
        f"{cfg.sr_steps} steps")
    info["sr_loss"] = _tail(train_denoiser(sr, hi, y, table, cfg.sr_steps, cfg.sr_batch, cfg.sr_lr, cfg.seed + 2,
                                           low_res=lo, progress=progress, desc="super-resolution"))
    info["sr_train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    torch.manual_seed(cfg.seed + 3)
    classifier = Classifier(10, 1, cfg.classifier_width)
    log(f"[3/3] classifier (the quality judge): {_count(classifier):,} parameters, {cfg.classifier_steps} steps")
    train_classifier(classifier, hi, y, steps=cfg.classifier_steps, batch_size=cfg.classifier_batch,
                     lr=cfg.classifier_lr, seed=cfg.seed + 3, progress=progress)
    info["classifier_train_s"] = time.perf_counter() - t2
    info["train_s"] = time.perf_counter() - t0
    return ImagenDemoModels(cfg, ImagenPipeline(encoder, base, sr).eval(), classifier.eval(), info)


def _count(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _tail(losses: Sequence[float], n: int = 50) -> float:
    tail = list(losses)[-n:]
    return float(sum(tail) / len(tail))


# ------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(models: ImagenDemoModels, path: str, half: bool = True) -> None:
    """One file (plain values: loaded with weights_only=True); half: float16 denoiser/classifier
    weights (the frozen text encoder stays float32: it is tiny and its features feed both stages)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    p = models.pipeline
    info = {k: v for k, v in models.info.items() if isinstance(v, (int, float, str, bool))}
    torch.save({"format": _FORMAT, "config": asdict(models.config), "info": info,
                "text_encoder": p.text_encoder.state(), "base": p.base.state(half), "sr": p.sr.state(half),
                "classifier": {"config": dict(models.classifier.config),
                               "state_dict": half_state(models.classifier, half)}}, path)


def load_checkpoint(path: str, map_location="cpu") -> ImagenDemoModels:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file: {path!r}")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise ValueError(f"checkpoint: {path!r} is not an imgtx_fast Imagen demo checkpoint ({_FORMAT})")
    pipe = ImagenPipeline.from_state({"text_encoder": blob["text_encoder"], "base": blob["base"], "sr": blob["sr"]})
    classifier = Classifier(**blob["classifier"]["config"])
    load_state(classifier, blob["classifier"]["state_dict"])
    return ImagenDemoModels(ImagenDemoConfig(**blob["config"]), pipe.eval(), classifier.eval(),
                            dict(blob.get("info", {})))


# ------------------------------------------------------------------------------------ evaluation

def _sample(models: ImagenDemoModels, labels: Tensor, backend: str, seed: int, **kw) -> Tuple[Dict[str, Tensor], Dict[str, float]]:
    """The cascade for "a digit <label>" prompts on `backend`: images and seconds per stage."""
    pipe = models.pipeline
    previous = pipe.backend
    pipe.backend = backend
    g = torch.Generator().manual_seed(seed)
    prompts = [prompt(int(d)) for d in labels]
    try:
        t0 = time.perf_counter()
        text, lengths = pipe.text_encoder(prompts)
        t1 = time.perf_counter()
        common = dict(sampler=kw["sampler"], generator=g)
        base = pipe.base.sample(text, lengths, kw["num_steps"], kw["guidance"], **common)
        t2 = time.perf_counter()
        sr = pipe.sr.sample(text, lengths, kw["num_steps"], kw["guidance"], low_res=base,
                            aug_level=kw["aug_level"], **common)
        t3 = time.perf_counter()
    finally:
        pipe.backend = previous
    return {"base": base, "sr": sr}, {"text": t1 - t0, "base": t2 - t1, "sr": t3 - t2}


@torch.no_grad()
def evaluate(models: ImagenDemoModels, *, out: Optional[str] = None, per_class: int = 8, eval_per_class: int = 10,
             num_steps: int = 64, guidance: float = 3.0, aug_level: float = 0.1, sampler: str = "ddpm",
             timing_batch: int = 10, seed: int = 0, reference: bool = True) -> Dict[str, object]:
    """The demo's numbers: classifier accuracy of cascade samples against the prompted digit
    (eval_per_class per digit, fast backend; the first per_class per digit make the grid), the
    classifier on the real test digits, and fast-vs-reference time of the cascade on
    `timing_batch` prompts (digits in turn), same weights and seed."""
    cfg = models.config
    _, _, _, xte, yte = _digits(cfg)
    eval_per_class = max(eval_per_class, per_class)
    kw = dict(num_steps=num_steps, guidance=guidance, aug_level=aug_level, sampler=sampler)
    res: Dict[str, object] = dict(kw, threads=torch.get_num_threads())
    clf = models.classifier
    res["classifier_test_acc"] = float((clf.predict(xte) == yte).float().mean())
    labels = torch.arange(10).repeat_interleave(eval_per_class)
    imgs, secs = _sample(models, labels, "fast", seed, **kw)
    pred = clf.predict(imgs["sr"])
    res["samples"] = len(labels)
    res["sample_acc"] = float((pred == labels).float().mean())
    res["sample_acc_per_class"] = [float((pred[labels == c] == c).float().mean()) for c in range(10)]
    up = torch.nn.functional.interpolate(imgs["base"], size=(cfg.high_size,) * 2, mode="bilinear",
                                         align_corners=False)
    res["base_sample_acc"] = float((clf.predict(up) == labels).float().mean())
    res["eval_s"] = sum(secs.values())
    if out is not None:
        pick = torch.cat([torch.arange(c * eval_per_class, c * eval_per_class + per_class) for c in range(10)])
        res["grid_path"] = os.path.join(out, "imagen_samples.png")
        res["grid_size"] = save_grid(imgs["sr"][pick], 10, res["grid_path"])
        res["base_grid_path"] = os.path.join(out, "imagen_base_samples.png")
        save_grid(imgs["base"][pick], 10, res["base_grid_path"], scale=8)
    tb = torch.arange(timing_batch) % 10
    _sample(models, tb[:1], "fast", seed, **dict(kw, num_steps=1))  # warm-up
    res["timing_batch"] = timing_batch
    fast_imgs, res["fast_s"] = _sample(models, tb, "fast", seed, **kw)
    if reference:
        _sample(models, tb[:1], "reference", seed, **dict(kw, num_steps=1))
        ref_imgs, res["reference_s"] = _sample(models, tb, "reference", seed, **kw)
        f, r = res["fast_s"], res["reference_s"]
        res["speedup"] = (r["base"] + r["sr"]) / (f["base"] + f["sr"])
        res["backend_max_abs_diff"] = float((fast_imgs["sr"] - ref_imgs["sr"]).abs().max())
        res["reference_sample_acc"] = float((clf.predict(ref_imgs["sr"]) == tb).float().mean())
    return res


def format_report(res: Dict[str, object], models: Optional[ImagenDemoModels] = None) -> str:
    rows = []
    if models is not None:
        c = models.config
        rows.append(("model", f"frozen random T5 ({c.text_dim} wide, {c.text_layers} layers, {c.max_length} tokens) "
                              f"-> base {c.low_size}x{c.low_size} (dim {c.base_dim} x {c.base_depth}) -> SR "
                              f"{c.high_size}x{c.high_size} (dim {c.sr_dim} x {c.sr_depth}, patch {c.sr_patch}); "
                              f"{c.prediction}-prediction, {c.beta_schedule} schedule, T={c.num_timesteps}"))
    rows.append(("sampling", f"{res['num_steps']} {res['sampler']} steps per stage, guidance {res['guidance']}, "
                             f"dynamic thresholding, SR aug level {res['aug_level']}, {res['threads']} threads"))
    B = res["timing_batch"]
    f = res["fast_s"]
    rows.append(("cascade time, fast", f"{f['base'] + f['sr']:.2f} s for {B} prompts (base {f['base']:.2f} s, "
                                       f"SR {f['sr']:.2f} s; text encoder {f['text'] * 1e3:.1f} ms)"))
    if "reference_s" in res:
        r = res["reference_s"]
        rows.append(("cascade time, reference", f"{r['base'] + r['sr']:.2f} s (base {r['base']:.2f} s, SR "
                                                f"{r['sr']:.2f} s; same weights and seed)"))
        rows.append(("speed-up", f"{res['speedup']:.2f}x"))
        rows.append(("fast vs reference samples", f"max |diff| {res['backend_max_abs_diff']:.2e}; reference "
                                                  f"accuracy {res['reference_sample_acc'] * 100:.0f}% of {B}"))
    else:
        rows.append(("cascade time, reference", "skipped"))
    rows.append(("classifier accuracy", f"{res['classifier_test_acc'] * 100:.1f}% on the real 16x16 test digits"))
    rows.append(("sample accuracy", f"{res['sample_acc'] * 100:.1f}% of {res['samples']} cascade samples for "
                                    f"\"a digit <d>\" labelled d (base stage alone, upsampled: "
                                    f"{res['base_sample_acc'] * 100:.1f}%)"))
    rows.append(("  per digit", " ".join(f"{a * 100:.0f}" for a in res["sample_acc_per_class"])))
    if "grid_path" in res:
        w, h = res["grid_size"]
        rows.append(("sample grid", f"{res['grid_path']} ({w}x{h} px, one row per digit 0-9; base stage: "
                                    f"{res['base_grid_path']})"))
    return format_table(rows)


# ------------------------------------------------------------------------------------ command

def add_arguments(parser) -> None:
    parser.add_argument("--out", default="imgtx_fast_demo", help="folder for the PNG grids (default ./imgtx_fast_demo)")
    parser.add_argument("--train", action="store_true", help="train the models from scratch instead of loading the checkpoint")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint to load (default: the shipped one); with --train, where to save "
                             "(default: OUT/imagen_demo.pt)")
    parser.add_argument("--steps", type=int, default=64, help="sampling steps per stage (of T=1000)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--aug-level", type=float, default=0.1, help="noise augmentation of the SR stage's input")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm")
    parser.add_argument("--per-class", type=int, default=8, help="samples per digit in the grid")
    parser.add_argument("--eval-per-class", type=int, default=10, help="samples per digit the classifier labels")
    parser.add_argument("--timing-batch", type=int, default=10, help="prompts timed on both backends")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-backend timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=None, help="base-stage training steps (--train)")
    parser.add_argument("--sr-steps", type=int, default=None, help="SR-stage training steps (--train)")
    parser.add_argument("--classifier-steps", type=int, default=None, help="classifier training steps (--train)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: small models on a shared CPU; 0 keeps torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args, base: Optional[ImagenDemoConfig] = None) -> ImagenDemoConfig:
    over = {"seed": args.seed}
    for name in ("base_steps", "sr_steps", "classifier_steps"):
        v = getattr(args, name, None)
        if v is not None:
            over[name] = v
    return dataclasses.replace(base or ImagenDemoConfig(), **over)


def run(args, config: Optional[ImagenDemoConfig] = None, log=print) -> Dict[str, object]:
    """Load (or train) the models, sample, write the grids, print the table; returns the numbers
    (plus "models": the ImagenDemoModels)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or default_checkpoint()
    train = args.train
    models = None
    if not train:
        if os.path.isfile(ckpt):
            models = load_checkpoint(ckpt)
            log(f"loaded {ckpt} ({os.path.getsize(ckpt) / 1e6:.2f} MB, trained in "
                f"{float(models.info.get('train_s', float('nan'))):.0f} s by scripts/train_imagen_demo.py)")
        else:
            log(f"no checkpoint at {ckpt}: training from scratch (about ten minutes)")
            train = True
    if models is None:
        cfg = config_from_args(args, config)
        models = train_models(cfg, progress=not args.quiet, log=log)
        log(f"trained in {models.info['train_s']:.0f} s")
        save_to = args.checkpoint or os.path.join(args.out, CHECKPOINT_NAME)
        save_checkpoint(models, save_to)
        log(f"saved the models to {save_to} ({os.path.getsize(save_to) / 1e6:.2f} MB)")
    t = time.perf_counter()
    res = evaluate(models, out=args.out, per_class=args.per_class, eval_per_class=args.eval_per_class,
                   num_steps=args.steps, guidance=args.guidance, aug_level=args.aug_level, sampler=args.sampler,
                   timing_batch=args.timing_batch, seed=args.seed, reference=not args.no_reference)
    res["report_s"] = time.perf_counter() - t
    log(format_report(res, models))
    res["models"] = models
    return res


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m imgtx_fast demo --model imagen",
                                     description="Imagen-style text-to-image cascade on the built-in digits")
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0
