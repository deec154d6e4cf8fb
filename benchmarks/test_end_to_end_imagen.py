"""End to end on the CPU, fp32: the Imagen-style denoiser (imgtx_fast.models.imagen) on the
"fast" backend (imgtx_fast's fused attention) against the very same weights on the "reference"
backend (plain-PyTorch attention that materialises the scores and the padding mask), in the
same run, interleaved round-robin.

  model        config                                                  sampling              train step
  imagen-demo  the demo's base stage (imgtx_fast.demos.imagen): 8x8     batch 8, 64 steps,    batch 64
               pixels, patch 1 (64 tokens), dim 64, depth 3, heads 4,  CFG 3
               text 8 tokens of width 64 (padded prompts)
  imagen       Imagen-shaped, random weights: 32x32x3 pixels, patch 1  batch 8, 64 steps,    batch 8
               (1024 image tokens), dim 256, heads 4 (head dim 64),    CFG 3 (x32 from 2
               depth 2, text 128 tokens of width 512 (T5-small's),     timed steps)
               padded prompts of lengths 8..128

Sampling: `model.sample(text, lengths, num_steps, guidance_scale=3)`: classifier-free guidance
runs the conditional and the null condition as one batch of 2B rows per step, then DDPM's
ancestral step with dynamic thresholding. The imagen-shaped reference takes ~10 s per step on
2 cores, so only `timed_steps` steps are timed (sample(num_steps=timed_steps): the same network
call and step per step on the same shapes) and the 64-step time is that per-step time x 64 (the
summary says "x32 from 2"). One training step = training_loss (forward) + backward.
Targets: reference / fast >= 2x for sampling, >= 1.5x for a training step; reported
met/MISSED in the summary (conftest's end-to-end table), never asserted.

Correctness guards (asserted, so a broken backend cannot post a time): both backends' network
outputs on the same inputs, and their loss and gradients on the same batch, agree within fp32
tolerances; samples are finite, in [-1, 1], of the right shape.

Modes (conftest.py): full = the table above; quick (IMGTX_BENCH_QUICK=1) = demo 16 steps
(x4), imagen batch 2; smoke (--benchmark-disable) = tiny configs, each call once (seconds).
"""
from dataclasses import asdict, dataclass

import pytest
import torch

from imgtx_fast.models.imagen import ImagenConfig, ImagenDenoiser

# reuse the VQ-Diffusion end-to-end benchmark's timing loop and summary recorder (same house rules)
from test_end_to_end import (BACKENDS, assert_backends_agree, interleave, record_sampling, record_training,
                             time_training_step)

SAMPLE_BAR, TRAIN_BAR = 2.0, 1.5
STEPS = 64                       # the sampling length the targets use
GUIDANCE = 3.0


def demo_config() -> ImagenConfig:
    """The demo's base stage (imgtx_fast.demos.imagen), or the same sizes written out."""
    try:
        from imgtx_fast.demos.imagen import ImagenDemoConfig
        return ImagenDemoConfig().base_config()
    except ImportError:  # pragma: no cover - the demo module is optional here
        return ImagenConfig(image_size=8, patch_size=1, dim=64, depth=3, heads=4, text_dim=64, prediction="v")


def imagen_config() -> ImagenConfig:
    return ImagenConfig(image_size=32, channels=3, patch_size=1, dim=256, depth=2, heads=4, text_dim=512)


TINY = dict(image_size=16, channels=3, patch_size=2, dim=64, depth=1, heads=4, text_dim=32)


@dataclass(frozen=True)
class Model:
    name: str
    config: dict                 # ImagenConfig fields
    text_len: int
    min_len: int                 # prompts are padded: lengths in [min_len, text_len]
    sample_batch: int
    sample_steps: int            # steps of one timed sample() call
    train_batch: int

    def cfg(self) -> ImagenConfig:
        return ImagenConfig(**self.config)

    @property
    def shape(self) -> str:
        c = self.cfg()
        return (f"{c.image_size}x{c.image_size}x{c.channels} p{c.patch_size} ({c.num_tokens} tok) "
                f"dim={c.dim} depth={c.depth} text={self.text_len}")


def models(mode: str):
    demo, imagen = asdict(demo_config()), asdict(imagen_config())
    if mode == "smoke":
        return [Model("imagen-demo", demo, 8, 3, 2, 1, 2), Model("imagen", TINY, 16, 4, 2, 1, 2)]
    if mode == "quick":
        return [Model("imagen-demo", demo, 8, 3, 8, 16, 64), Model("imagen", imagen, 128, 8, 2, 1, 2)]
    return [Model("imagen-demo", demo, 8, 3, 8, STEPS, 64), Model("imagen", imagen, 128, 8, 8, 2, 8)]


MODEL_IDS = ("imagen-demo", "imagen")


def model_by_name(mode: str, name: str) -> Model:
    return next(m for m in models(mode) if m.name == name)


def build(m: Model, seed: int = 0) -> ImagenDenoiser:
    torch.manual_seed(seed)
    model = ImagenDenoiser(m.cfg())
    # a trained network's output layer is not zero (it starts at zero): make the guards see it
    torch.nn.init.normal_(model.patch_out.weight, std=0.02)
    return model


def text(m: Model, B: int, seed: int = 1):
    """Padded text embeddings (B, L, text_dim) and lengths in [min_len, L] (the first row full)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(m.min_len, m.text_len + 1, (B,), generator=g)
    lengths[0] = m.text_len
    return torch.randn(B, m.text_len, m.cfg().text_dim, generator=g), lengths


def images(m: Model, B: int, seed: int = 2):
    c = m.cfg()
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, c.channels, c.image_size, c.image_size, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------ guards

def check_forward_agrees(model: ImagenDenoiser, m: Model):
    B = 2
    x_t = images(m, B, seed=3)
    emb, lengths = text(m, B, seed=4)
    t = torch.tensor([m.cfg().num_timesteps // 2, m.cfg().num_timesteps - 1])
    outs = {}
    with torch.no_grad():
        for be in BACKENDS:
            model.backend = be
            outs[be] = model.guided_output(x_t, t, emb, lengths, GUIDANCE)
    torch.testing.assert_close(outs["fast"], outs["reference"], atol=2e-4, rtol=2e-4,
                               msg=lambda s: f"{m.name}: guided output fast vs reference: {s}")


def check_gradients_agree(model: ImagenDenoiser, m: Model):
    x0 = images(m, 2, seed=5)
    emb, lengths = text(m, 2, seed=6)
    assert_backends_agree(model, lambda: model.training_loss(x0, emb, lengths,
                                                             generator=torch.Generator().manual_seed(7)),
                          m.name, loss_tol=1e-5)


def check_samples(x, m: Model, B: int):
    c = m.cfg()
    assert x.shape == (B, c.channels, c.image_size, c.image_size) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 1.0


# ------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", MODEL_IDS)
def test_sampling(benchmark, bench_settings, bench_results, name):
    m = model_by_name(bench_settings.mode, name)
    benchmark.group = f"end to end sampling {name}"
    model = build(m).eval()
    check_forward_agrees(model, m)
    B = m.sample_batch
    emb, lengths = text(m, B)

    def sampler(be, n, steps):
        def run():
            model.backend = be
            return model.sample(emb[:n], lengths[:n], steps, GUIDANCE,
                                generator=torch.Generator().manual_seed(0))
        return run

    def run_all():
        for be in BACKENDS:  # warm-up: one step on one row (kernels loaded, thread pools up)
            sampler(be, 1, 1)()
        return interleave({be: sampler(be, B, m.sample_steps) for be in BACKENDS}, bench_settings)

    medians, outs, rounds = benchmark.pedantic(run_all, rounds=1, iterations=1, warmup_rounds=0)
    for x in outs.values():
        check_samples(x, m, B)
    record_sampling(benchmark, bench_results, name, m.shape, B, m.sample_steps, rounds, bench_settings.mode,
                    medians, f"sample B={B} guidance={GUIDANCE:g} ddpm+dynamic thresholding",
                    bar=SAMPLE_BAR, steps=STEPS)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_training_step(benchmark, bench_settings, bench_results, name):
    m = model_by_name(bench_settings.mode, name)
    benchmark.group = f"end to end training step {name}"
    model = build(m).train()
    check_gradients_agree(model, m)
    x0 = images(m, m.train_batch)
    emb, lengths = text(m, m.train_batch)

    medians, losses, rounds = time_training_step(
        benchmark, bench_settings, model, m.train_batch,
        lambda n: model.training_loss(x0[:n], emb[:n], lengths[:n], generator=torch.Generator().manual_seed(7)))
    assert abs(losses["fast"] - losses["reference"]) <= 1e-4 * abs(losses["reference"]) + 1e-6, losses
    record_training(benchmark, bench_results, name, m.shape, m.train_batch, rounds, bench_settings.mode, medians,
                    bar=TRAIN_BAR)
