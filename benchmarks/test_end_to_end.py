"""End to end on the CPU, fp32: the VQ-Diffusion transformer on the "fast" backend (imgtx_fast's
kernels) against the very same weights on the "reference" backend (plain-PyTorch twins of every
op), in the same run, interleaved round-robin.

  model   config                                                    sampling             train step
  demo    the demo's network (imgtx_fast.demos.vq_diffusion): K=128     batch 16, 100 steps  batch 64
          codes, 4x4 tokens, dim 96, depth 4, heads 4, class labels
  ithq    ITHQ-shaped, random weights: K=4096 codes, 32x32 tokens,   batch 16, 100 steps  batch 4
          dim 512, heads 16, depth 2 (ITHQ: 36), text condition of
          77 tokens (width 512) padded, lengths 7..77

Sampling: `model.sample(cond, num_steps, guidance_scale, truncation_rate)` (classifier-free
guidance: every step runs 2B rows, then the fused guided step). Full mode times all 100 steps of
both models, nothing extrapolated: at B=16 the ITHQ-shaped run takes about 80 minutes on 2 cores
(about 6 s a step on the fast backend, 40 s on the reference). Quick mode times `timed_steps`
steps of the ITHQ-shaped model (sample(num_steps=timed_steps): the same network call and step
per step, on the same shapes) and scales the per-step time to 100 (the summary says "x100 from
N"). Targets: reference / fast >= 3x for sampling; >= 2x for one
training step (training_loss forward + backward) and a lower peak RSS (one training step, each
backend in a fresh process, MiB above the RSS before the step). Targets are reported met/MISSED in
the summary, never asserted.

Correctness guards (asserted, so a broken backend cannot post a time): the samples are token
grids of codes (no MASK left); the two backends' log p(x0 | x_t) on the same inputs, and their
loss and gradients on the same noisy batch, agree within fp32 tolerances.

Modes (conftest.py): full = the table above; quick (IMGTX_BENCH_QUICK=1) = demo 25 steps, ITHQ
batch 4; smoke (--benchmark-disable) = tiny configs and batches, each call once (< 20 s).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import pytest
import torch

import imgtx_fast
from imgtx_fast.diffusion import vb_loss
from imgtx_fast.models.vq_diffusion import VQDiffusionConfig, VQDiffusionTransformer
from rss_probe import PROC_STATUS_HELPERS

MiB = 2.0 ** 20
BACKENDS = ("fast", "reference")
SAMPLE_BAR, TRAIN_BAR = 3.0, 2.0
STEPS = 100                      # the sampling length the targets use


def demo_config() -> VQDiffusionConfig:
    """The demo's diffusion network (imgtx_fast.demos.vq_diffusion), or the same sizes written out."""
    try:
        from imgtx_fast.demos.vq_diffusion import DemoConfig
        return DemoConfig().diffusion_config(10)
    except ImportError:  # pragma: no cover - the demo module is optional here
        return VQDiffusionConfig(num_codes=128, height=4, width=4, dim=96, depth=4, heads=4,
                                 condition="class", num_classes=10)


def ithq_config(depth: int = 2) -> VQDiffusionConfig:
    return VQDiffusionConfig(num_codes=4096, height=32, width=32, dim=512, depth=depth, heads=16,
                             condition="text", text_dim=512)


TINY_ITHQ = dict(num_codes=64, height=8, width=8, dim=64, depth=1, heads=4, condition="text", text_dim=32)


@dataclass(frozen=True)
class Model:
    name: str
    config: dict                 # VQDiffusionConfig fields
    text_len: int                # condition tokens (text models)
    sample_batch: int
    sample_steps: int            # steps of one timed sample() call
    guidance: float
    truncation: Optional[float]
    train_batch: int

    def cfg(self) -> VQDiffusionConfig:
        return VQDiffusionConfig(**self.config)

    @property
    def shape(self) -> str:
        c = self.config
        return f"K={c['num_codes']} {c['height']}x{c['width']} dim={c['dim']} depth={c['depth']}"


def models(mode: str):
    demo, ithq = asdict(demo_config()), asdict(ithq_config())
    if mode == "smoke":
        return [Model("demo", demo, 0, 2, 1, 3.0, 0.9, 4),
                Model("ithq", asdict(VQDiffusionConfig(**TINY_ITHQ)), 8, 2, 1, 5.0, 0.86, 2)]
    if mode == "quick":
        return [Model("demo", demo, 0, 16, 25, 3.0, 0.9, 64), Model("ithq", ithq, 77, 4, 1, 5.0, 0.86, 2)]
    return [Model("demo", demo, 0, 16, STEPS, 3.0, 0.9, 64), Model("ithq", ithq, 77, 16, STEPS, 5.0, 0.86, 4)]


MODEL_IDS = ("demo", "ithq")


def model_by_name(mode: str, name: str) -> Model:
    return next(m for m in models(mode) if m.name == name)


def build(m: Model, seed: int = 0) -> VQDiffusionTransformer:
    torch.manual_seed(seed)
    return VQDiffusionTransformer(m.cfg())


def conditions(m: Model, B: int, seed: int = 1):
    """(cond, cond_lengths): class labels, or padded text embeddings with lengths in [7, L]."""
    g = torch.Generator().manual_seed(seed)
    cfg = m.cfg()
    if cfg.condition == "class":
        return torch.arange(B) % cfg.num_classes, None
    L = m.text_len
    lengths = torch.randint(min(7, L), L + 1, (B,), generator=g)
    lengths[0] = L
    return torch.randn(B, L, cfg.text_dim, generator=g), lengths


def train_batch(m: Model, B: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    cfg = m.cfg()
    x0 = torch.randint(0, cfg.num_codes, (B, cfg.num_tokens), generator=g)
    return (x0, *conditions(m, B, seed))


# ------------------------------------------------------------------------------------ timing

def interleave(fns, settings):
    """Median seconds per name of calls timed round-robin, the last outputs, and the rounds.

    Callers warm each implementation up on a small input first. Smoke: one call each, timed for
    the table only. Otherwise the session's rounds, or 1 round when a call of the first round
    took longer than max_call_s (the ITHQ-shaped reference calls take minutes)."""
    times = {n: [] for n in fns}
    outs = {}
    rounds, r = 1, 0
    while r < rounds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
        if r == 0 and settings.timing and max(ts[0] for ts in times.values()) <= settings.max_call_s:
            rounds = settings.rounds
        r += 1
    return {n: statistics.median(ts) for n, ts in times.items()}, outs, rounds


def _record(bench_results, key, **fields):
    bench_results.end_to_end.setdefault(key, {}).update(fields)


# ------------------------------------------------------------------------------------ guards

def check_forward_agrees(model: VQDiffusionTransformer, m: Model):
    """log p(x0 | x_t) of both backends on the same (partly masked) tokens, t and condition."""
    cfg = m.cfg()
    B = 2
    g = torch.Generator().manual_seed(3)
    x_t = torch.randint(0, cfg.num_codes, (B, cfg.num_tokens), generator=g)
    x_t[torch.rand(B, cfg.num_tokens, generator=g) < 0.5] = cfg.num_codes
    cond, lengths = conditions(m, B, seed=4)
    t = torch.tensor([cfg.num_timesteps // 2, cfg.num_timesteps - 1])
    outs = {}
    with torch.no_grad():
        for be in BACKENDS:
            model.backend = be
            outs[be] = model(x_t, t, cond, lengths)
    torch.testing.assert_close(outs["fast"], outs["reference"], atol=2e-4, rtol=2e-4,
                               msg=lambda s: f"{m.name}: log p(x0|x_t) fast vs reference: {s}")


def check_samples(tokens, m: Model, B: int):
    cfg = m.cfg()
    assert tokens.shape == (B, cfg.height, cfg.width) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < cfg.num_codes, "MASK or out-of-range codes left"


def check_gradients_agree(model: VQDiffusionTransformer, m: Model):
    """Loss and gradients of both backends on one fixed noisy batch (same x_t, t, dropout)."""
    cfg = m.cfg()
    x0, cond, lengths = train_batch(m, 2, seed=5)
    g = torch.Generator().manual_seed(6)
    x_t = torch.where(torch.rand(x0.shape, generator=g) < 0.6, cfg.num_codes, x0)
    t = torch.tensor([cfg.num_timesteps // 3, cfg.num_timesteps - 2])
    drop = torch.tensor([False, True])

    def loss():
        with imgtx_fast.backend(model.backend):
            logp = model(x_t, t, cond, lengths, drop)
            return vb_loss(logp, x0, x_t, t, model.schedule, aux_weight=cfg.aux_weight)

    assert_backends_agree(model, loss, m.name)


def assert_backends_agree(model, loss_fn, label: str, loss_tol: float = 1e-4):
    """loss_fn() (model.backend set to each backend in turn) and the parameter gradients of its
    backward agree between the fast and the reference backend within fp32 tolerances."""
    res = {}
    for be in BACKENDS:
        model.zero_grad(set_to_none=True)
        model.backend = be
        loss = loss_fn()
        loss.backward()
        res[be] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    (lf, gf), (lr, gr) = res["fast"], res["reference"]
    torch.testing.assert_close(lf, lr.to(lf.dtype), atol=loss_tol, rtol=1e-4, msg=lambda s: f"{label}: loss: {s}")
    assert gf.keys() == gr.keys() and len(gf) > 0
    for name in gf:
        scale = float(gr[name].abs().max()) + 1e-12
        err = float((gf[name] - gr[name]).abs().max())
        assert err <= 1e-3 * scale + 1e-6, f"{label}: grad {name}: max error {err:.3g} (scale {scale:.3g})"


def time_training_step(benchmark, settings, model, batch: int, loss):
    """Median seconds of one training step (loss(batch) forward + backward) per backend, timed
    round-robin after a one-row warm-up of each; returns (medians, last losses, rounds) and
    checks that the losses are finite."""
    def stepper(be, n):
        def run():
            model.backend = be
            model.zero_grad(set_to_none=True)
            value = loss(n)
            value.backward()
            return value.detach().item()
        return run

    def run_all():
        for be in BACKENDS:
            stepper(be, 1)()
        return interleave({be: stepper(be, batch) for be in BACKENDS}, settings)

    medians, losses, rounds = benchmark.pedantic(run_all, rounds=1, iterations=1, warmup_rounds=0)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    return medians, losses, rounds


def record_sampling(benchmark, bench_results, name, shape, batch, timed_steps, rounds, mode, medians,
                    what, bar=None, steps=None):
    """One sampling row of the end-to-end summary (and the benchmark's extra_info): medians are
    seconds of `timed_steps` steps per backend, scaled to `steps`."""
    bar = SAMPLE_BAR if bar is None else bar
    steps = STEPS if steps is None else steps
    per_step = {be: t / timed_steps for be, t in medians.items()}
    ratio = medians["reference"] / medians["fast"]
    _record(bench_results, ("sampling", name), shape=shape, batch=batch, steps=steps, timed_steps=timed_steps,
            rounds=rounds, mode=mode, s_total={be: v * steps for be, v in per_step.items()}, ratio=ratio,
            bar=bar, what=what)
    benchmark.extra_info.update(shape=shape, batch=batch, timed_steps=timed_steps, rounds=rounds,
                                s_per_step={be: round(v, 4) for be, v in per_step.items()},
                                ratio=round(ratio, 3), bar=bar, met=ratio >= bar)


def record_training(benchmark, bench_results, name, shape, batch, rounds, mode, medians, bar=None):
    """One training-step row of the end-to-end summary (and the benchmark's extra_info)."""
    bar = TRAIN_BAR if bar is None else bar
    ratio = medians["reference"] / medians["fast"]
    _record(bench_results, ("train", name), shape=shape, batch=batch, rounds=rounds, mode=mode,
            ms={be: v * 1e3 for be, v in medians.items()}, ratio=ratio, bar=bar)
    benchmark.extra_info.update(shape=shape, batch=batch, rounds=rounds,
                                ms={be: round(v * 1e3, 2) for be, v in medians.items()},
                                ratio=round(ratio, 3), bar=bar, met=ratio >= bar)


# ------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("name", MODEL_IDS)
def test_sampling(benchmark, bench_settings, bench_results, name):
    m = model_by_name(bench_settings.mode, name)
    benchmark.group = f"end to end sampling {name}"
    model = build(m).eval()
    check_forward_agrees(model, m)
    B = m.sample_batch
    cond, lengths = conditions(m, B)

    def sampler(be, c, ls, steps):
        def run():
            model.backend = be
            return model.sample(c, num_steps=steps, guidance_scale=m.guidance, truncation_rate=m.truncation,
                                generator=torch.Generator().manual_seed(0), cond_lengths=ls)
        return run

    def run_all():
        for be in BACKENDS:  # warm-up: one step on one row (kernels loaded, thread pools up)
            sampler(be, cond[:1], None if lengths is None else lengths[:1], 1)()
        return interleave({be: sampler(be, cond, lengths, m.sample_steps) for be in BACKENDS}, bench_settings)

    medians, outs, rounds = benchmark.pedantic(run_all, rounds=1, iterations=1, warmup_rounds=0)
    for tokens in outs.values():
        check_samples(tokens, m, B)
    record_sampling(benchmark, bench_results, name, m.shape, B, m.sample_steps, rounds, bench_settings.mode,
                    medians, f"sample B={B} guidance={m.guidance:g} trunc={m.truncation}")


@pytest.mark.parametrize("name", MODEL_IDS)
def test_training_step(benchmark, bench_settings, bench_results, name):
    m = model_by_name(bench_settings.mode, name)
    benchmark.group = f"end to end training step {name}"
    model = build(m).train()
    check_gradients_agree(model, m)
    x0, cond, lengths = train_batch(m, m.train_batch)

    def loss(n):
        return model.training_loss(x0[:n], cond[:n], cond_lengths=None if lengths is None else lengths[:n],
                                   generator=torch.Generator().manual_seed(7))

    medians, losses, rounds = time_training_step(benchmark, bench_settings, model, m.train_batch, loss)
    record_training(benchmark, bench_results, name, m.shape, m.train_batch, rounds, bench_settings.mode, medians)


_MEMORY_SCRIPT = r"""
import importlib.util, json, sys, torch
path, name, mode, be, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(threads)
sys.path.insert(0, path.rsplit("/", 1)[0])  # the module imports its neighbour rss_probe
spec = importlib.util.spec_from_file_location("e2e_bench", path)
e2e = importlib.util.module_from_spec(spec)
spec.loader.exec_module(e2e)
""" + PROC_STATUS_HELPERS + r"""
m = e2e.model_by_name(mode, name)
model = e2e.build(m).train()
model.backend = be
x0, cond, lengths = e2e.train_batch(m, m.train_batch)

def step(n):
    model.zero_grad(set_to_none=False)  # the gradient buffers stay allocated: not counted
    loss = model.training_loss(x0[:n], cond[:n], cond_lengths=None if lengths is None else lengths[:n],
                               generator=torch.Generator().manual_seed(7))
    loss.backward()
    return float(loss)

step(1)  # warm-up: kernels loaded, thread pool up, gradient buffers allocated
rss0 = status("VmRSS")
reset = reset_hwm()
loss = step(m.train_batch)
hwm = status("VmHWM")
print(json.dumps({"extra_bytes": max(0, hwm - rss0), "hwm_reset": reset, "loss": loss}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("name", MODEL_IDS)
def test_training_peak_memory(benchmark, bench_settings, bench_results, name):
    """Peak RSS above the pre-step level of one training step (forward + backward), each backend
    in a fresh process. Reported against the bar (fast < reference), not asserted."""
    if bench_settings.mode == "smoke" and name == "demo":
        pytest.skip("smoke mode probes the ITHQ-shaped config only (two fresh processes, < 20 s)")
    m = model_by_name(bench_settings.mode, name)
    benchmark.group = "end to end memory (time = probe processes)"
    threads = bench_settings.threads

    def probe(be):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, os.path.abspath(__file__), name, bench_settings.mode,
             be, str(threads)], capture_output=True, text=True, timeout=1200, cwd=tempfile.gettempdir(),
            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        assert proc.returncode == 0, f"memory probe {name}/{be} failed:\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    probes = benchmark.pedantic(lambda: {be: probe(be) for be in BACKENDS}, rounds=1, iterations=1,
                                warmup_rounds=0)
    for be, p in probes.items():
        assert p["loss"] == p["loss"] and abs(p["loss"]) < float("inf"), f"{be}: loss {p['loss']}"
    mib = {be: p["extra_bytes"] / MiB for be, p in probes.items()}
    _record(bench_results, ("train", name), peak_mib=mib,
            hwm_reset=all(p["hwm_reset"] for p in probes.values()), mem_batch=m.train_batch)
    benchmark.extra_info.update(peak_extra_mib={k: round(v, 1) for k, v in mib.items()},
                                met=mib["fast"] < mib["reference"])
