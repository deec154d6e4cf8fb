"""End to end on the CPU, fp32: Image Transformer sampling and training, the fast backend against
the very same weights on the reference backend, in the same run, interleaved round-robin.

  model   config (random weights)                                 sampling          train step
  demo    the demo's network: 16x16x1, local 2D q(4,8) f(4,8),     batch 10, 256     batch 32
          dim 128, depth 4, heads 4, 10 classes                    steps
  32x32   32x32x1, local 2D q(8,16) f(8,16) (the paper's           batch 4, 1024     batch 8
          setting), dim 256, depth 4, heads 8, 10 classes          steps

Sampling (`model.sample(labels)`, one position per step in generation order):
- fast + KV cache: our decode attention reads only the window of each step;
- reference + KV cache: the same model code and caches, the plain-PyTorch attention twin;
- reference, recompute: the textbook loop, the full masked forward over the image at every step
  (dense (N, N) mask); all steps cost the same, so `recompute_steps` of them are timed and the
  total is scaled to N (the table says "from k steps").
Targets (32x32): fast >= 10x reference recompute, >= 3x reference + KV cache. The training
step (teacher-forced loss forward + backward) has no bar; it is reported.

Correctness guards (asserted): the two backends' logits and gradients agree, cached and
recomputed sampling draw the same images for one seed (checked on a few steps).

Modes (conftest.py): full = the table above; quick (IMGTX_BENCH_QUICK=1) = 32x32 sampling of 256
steps of each; smoke (--benchmark-disable) = a tiny 8x8 model, a few steps, each call once.
"""
from dataclasses import dataclass

import pytest
import torch

from imgtx_fast.models.image_transformer import ImageTransformer, ImageTransformerConfig
from test_end_to_end import assert_backends_agree, interleave, time_training_step

SAMPLE_BARS = {"reference recompute": 10.0, "reference + KV cache": 3.0}


@dataclass(frozen=True)
class Model:
    name: str
    config: dict
    sample_batch: int
    sample_steps: int      # positions sampled per timed call (N in full mode)
    recompute_steps: int   # steps of the recompute loop actually timed
    train_batch: int

    def cfg(self) -> ImageTransformerConfig:
        return ImageTransformerConfig(**self.config)

    @property
    def shape(self) -> str:
        c = self.cfg()
        return (f"{c.height}x{c.width}x{c.channels} {c.attention} q{c.query_shape} f{c.memory_flange} "
                f"dim={c.dim} depth={c.depth}")


DEMO = dict(height=16, width=16, channels=1, num_classes=10, attention="local2d", query_shape=(4, 8),
            memory_flange=(4, 8), dim=128, heads=4, depth=4)
PAPER = dict(height=32, width=32, channels=1, num_classes=10, attention="local2d", query_shape=(8, 16),
             memory_flange=(8, 16), dim=256, heads=8, depth=4)
TINY = dict(height=8, width=8, channels=1, num_classes=10, attention="local2d", query_shape=(4, 4),
            memory_flange=(2, 4), dim=32, heads=2, depth=2)


def models(mode: str):
    if mode == "smoke":
        return [Model("demo", TINY, 2, 8, 2, 2), Model("32x32", TINY, 2, 8, 2, 2)]
    if mode == "quick":
        return [Model("demo", DEMO, 10, 256, 4, 32), Model("32x32", PAPER, 4, 256, 4, 8)]
    return [Model("demo", DEMO, 10, 256, 8, 32), Model("32x32", PAPER, 4, 1024, 8, 8)]


MODEL_IDS = ("demo", "32x32")


def model_by_name(mode, name) -> Model:
    return next(m for m in models(mode) if m.name == name)


def build(m: Model, seed: int = 0) -> ImageTransformer:
    torch.manual_seed(seed)
    return ImageTransformer(m.cfg()).eval()


def batch(m: Model, B: int, seed: int = 1):
    cfg = m.cfg()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (B, cfg.channels, cfg.height, cfg.width), generator=g).to(torch.uint8)
    return x, torch.arange(B) % cfg.num_classes


def check_backends_agree(model: ImageTransformer, m: Model):
    x, y = batch(m, 2)
    assert_backends_agree(model, lambda: model.loss(x, y), f"Image Transformer {m.name}")


def _record(bench_results, m, case, peer, fast_s, peer_s, bar=None, note=""):
    bench_results.models[("Image Transformer " + m.name, case, peer)] = dict(
        shape=m.shape, fast_s=fast_s, peer_s=peer_s, ratio=peer_s / fast_s, bar=bar, note=note)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_sampling(benchmark, bench_settings, bench_results, name):
    m = model_by_name(bench_settings.mode, name)
    benchmark.group = f"image transformer sampling {name}"
    model = build(m)
    check_backends_agree(model, m)
    _, labels = batch(m, m.sample_batch)
    N = m.cfg().num_positions
    steps = min(m.sample_steps, N)

    def sampler(be, use_cache, k, rows=m.sample_batch):
        def run():
            model.backend = be
            return model.sample(labels[:rows], generator=torch.Generator().manual_seed(0),
                                use_cache=use_cache, steps=k)
        return run

    # the two loops draw the same pixels (same logits up to rounding, same generator)
    k = min(4, steps)
    assert torch.equal(sampler("fast", True, k)(), sampler("reference", False, k)())

    def run_all():
        for be in ("fast", "reference"):
            sampler(be, True, 2, 1)()
        return interleave({"fast": sampler("fast", True, steps),
                           "reference + KV cache": sampler("reference", True, steps),
                           "reference recompute": sampler("reference", False, m.recompute_steps)},
                          bench_settings)

    medians, outs, rounds = benchmark.pedantic(run_all, rounds=1, iterations=1, warmup_rounds=0)
    assert outs["fast"].shape[0] == m.sample_batch
    scale = steps / m.recompute_steps
    medians["reference recompute"] *= scale  # every recompute step runs the same full forward
    what = f"sample B={m.sample_batch}, {steps} steps"
    for peer, bar in SAMPLE_BARS.items():
        note = f"{what}; rounds {rounds}" + (f"; recompute timed on {m.recompute_steps} steps, scaled"
                                             if peer == "reference recompute" else "")
        _record(bench_results, m, "sampling", peer, medians["fast"], medians[peer],
                bar if name == "32x32" else None, note)
    benchmark.extra_info.update(shape=m.shape, batch=m.sample_batch, steps=steps, rounds=rounds,
                                s={k: round(v, 4) for k, v in medians.items()})


@pytest.mark.parametrize("name", MODEL_IDS)
def test_training_step(benchmark, bench_settings, bench_results, name):
    m = model_by_name(bench_settings.mode, name)
    benchmark.group = f"image transformer training step {name}"
    model = build(m).train()
    x, y = batch(m, m.train_batch)

    medians, losses, rounds = time_training_step(benchmark, bench_settings, model, m.train_batch,
                                                 lambda n: model.loss(x[:n], y[:n]))
    assert abs(losses["fast"] - losses["reference"]) < 1e-3 * abs(losses["reference"])
    _record(bench_results, m, "train step", "reference", medians["fast"], medians["reference"],
            note=f"loss fwd+bwd, batch {m.train_batch}; rounds {rounds}")
    benchmark.extra_info.update(shape=m.shape, batch=m.train_batch, rounds=rounds,
                                ms={k: round(v * 1e3, 2) for k, v in medians.items()})
