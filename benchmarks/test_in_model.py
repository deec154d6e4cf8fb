"""Our kernels where users call them: inside a model block, right after torch ops.

A kernel timed alone runs on a quiet machine; in a model every call comes right after torch ops
(LayerNorm, Linear, GELU, convolutions), whose OpenMP workers keep spinning for a while after
each op. Each case below is a block as users write it, run with our kernel and with the peer in
the same place, round-robin in one run, in the default environment (no OMP_WAIT_POLICY):

  attention block  x -> LayerNorm -> Linear(qkv) -> attention -> Linear(out) -> MLP, width 512,
                   8 heads (head dim 64), fp32, no grad; ours imgtx_fast.attention, peer torch
                   SDPA; (B, N) in (8, 64), (1, 256), (4, 256), (4, 1024), (1, 4096)
  diffusion step   a VQ-Diffusion transformer (K=4096 codes, 32x32 tokens, width 512, 16 heads,
                   2 blocks, class labels) forward, then the reverse step (guidance 5,
                   truncation 0.86) on its log-probabilities: ours the fused posterior_sample,
                   peer the same step in plain torch ops (the reference backend)
  VQ tokenizer     a conv encoder (128x128x3 -> 32x32x64) -> codebook lookup (K=4096) -> the
                   decoder on the quantized latents: ours codebook_lookup, peer torch.cdist +
                   argmin

  per-call cost    a tiny call, (1, 1, 4, 8): what each entry point costs beyond the kernel's
                   work -- imgtx_fast.attention, our SDPA drop-in, torch SDPA; target: ours
                   within SDPA's + 5 us. Also reported: the same call made first after an
                   attention block's torch ops (cold caches), what a model pays per call

Each row: the whole block's time (peer / ours), the kernel's own time measured inside the block
(peer / ours), and our kernel's time alone (called back to back on the same inputs) with the
in-block / alone ratio, next to the peer's own in-block / alone ratio (what the block's cold
inputs cost any kernel). Targets: attention in the block >= 1.0x SDPA at every row, >= 1.1x at
N >= 1024; each of our kernels within 1.15x of its time alone. Reported met/MISSED in the summary,
never asserted (outputs are checked against the peer's, so a broken kernel cannot post a time).

Modes (conftest.py): full and quick (IMGTX_BENCH_QUICK=1: fewer rows and repeats) time; smoke
(--benchmark-disable) runs tiny shapes once.
"""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import imgtx_fast
from imgtx_fast.diffusion import posterior_sample
from imgtx_fast.models.vq_diffusion import VQDiffusionConfig, VQDiffusionTransformer
from imgtx_fast.models.vqvae import Decoder, Encoder, VQVAEConfig

WIDTH, HEADS = 512, 8
BLOCK_ROWS = ((8, 64), (1, 256), (4, 256), (4, 1024), (1, 4096))
QUICK_ROWS = ((8, 64), (1, 256), (4, 1024))
SMOKE_ROWS = ((2, 16),)
ATTN_TARGET, ATTN_TARGET_LONG, IN_BLOCK_TARGET = 1.0, 1.1, 1.15
OVERHEAD_SHAPE, OVERHEAD_SLACK_US = (1, 1, 4, 8), 5.0


@dataclass
class Case:
    """A block split around the kernel: prep() -> inputs (torch ops), kernel(inputs) -> out,
    post(out) (torch ops). impls: name -> kernel; the first is ours."""
    prep: Callable[[], tuple]
    impls: Dict[str, Callable]
    post: Callable
    check: Callable[[object, object], None]


def timed_rounds(case: Case, rounds: int, reps: int):
    """Median seconds per impl, round-robin: ("block", "in_block", "alone")."""
    times = {name: {"block": [], "in_block": [], "alone": []} for name in case.impls}
    for _ in range(rounds):
        for name, kernel in case.impls.items():
            block = in_block = 0.0
            for _ in range(reps):
                t0 = time.perf_counter()
                inputs = case.prep()
                t1 = time.perf_counter()
                out = kernel(*inputs)
                t2 = time.perf_counter()
                case.post(out)
                block += time.perf_counter() - t0
                in_block += t2 - t1
            inputs = case.prep()
            kernel(*inputs)  # alone: back to back, after a call of the kernel itself
            t0 = time.perf_counter()
            for _ in range(reps):
                kernel(*inputs)
            alone = time.perf_counter() - t0
            for key, v in (("block", block), ("in_block", in_block), ("alone", alone)):
                times[name][key].append(v / reps)
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in times.items()}


def run_case(benchmark, bench_settings, bench_results, key, label, case: Case, target):
    names = list(case.impls)
    ours, peer = names
    budget_s = 0.3 if bench_settings.mode == "full" else 0.1
    with torch.no_grad():
        inputs = case.prep()
        outs = {n: case.impls[n](*inputs) for n in names}
        case.check(outs[names[0]], outs[names[1]])
        for n in names:  # warm-up: thread teams up, kernels dispatched once
            case.post(case.impls[n](*inputs))
        t0 = time.perf_counter()
        case.post(case.impls[ours](*case.prep()))
        block_s = time.perf_counter() - t0
        rounds = bench_settings.rounds if bench_settings.timing else 1
        # repeats per round and impl: about budget_s of blocks (at least 1, at most 100)
        reps = max(1, min(100, int(budget_s / block_s))) if bench_settings.timing else 1
        med = benchmark.pedantic(lambda: timed_rounds(case, rounds, reps), rounds=1, iterations=1)
    row = {
        "label": label, "peer": peer, "rounds": rounds, "reps": reps, "target": target,
        "block_ratio": med[peer]["block"] / med[ours]["block"],
        "kernel_ratio": med[peer]["in_block"] / med[ours]["in_block"],
        "ours_in_block_ms": med[ours]["in_block"] * 1e3, "peer_in_block_ms": med[peer]["in_block"] * 1e3,
        "ours_alone_ms": med[ours]["alone"] * 1e3, "peer_alone_ms": med[peer]["alone"] * 1e3,
        "ours_block_ms": med[ours]["block"] * 1e3, "peer_block_ms": med[peer]["block"] * 1e3,
        "in_block_over_alone": med[ours]["in_block"] / med[ours]["alone"],
        "threading": imgtx_fast._C.cpu_threading(),
    }
    bench_results.in_model[key] = row
    benchmark.extra_info.update(row)


# ------------------------------------------------------------------------------------ attention

class AttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def split(self, x):
        B, N, W = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge(self, x, attn):
        B, N, W = x.shape
        x = x + self.out(attn.transpose(1, 2).reshape(B, N, W))
        return x + self.mlp(self.norm2(x))


def attention_case(B: int, N: int) -> Case:
    g = torch.Generator().manual_seed(0)
    block = AttentionBlock(WIDTH, HEADS).eval()
    x = torch.randn(B, N, WIDTH, generator=g)

    def check(ours, peer):
        torch.testing.assert_close(ours, peer, atol=2e-5, rtol=1e-4)

    return Case(prep=lambda: block.split(x),
                impls={"imgtx_fast": lambda q, k, v: imgtx_fast.attention(q, k, v),
                       "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)},
                post=lambda out: block.merge(x, out), check=check)


@pytest.mark.parametrize("B,N", BLOCK_ROWS, ids=[f"{b}x{n}" for b, n in BLOCK_ROWS])
def test_attention_block(benchmark, bench_settings, bench_results, B, N):
    rows = {"full": BLOCK_ROWS, "quick": QUICK_ROWS, "smoke": BLOCK_ROWS}[bench_settings.mode]
    if (B, N) not in rows:
        pytest.skip("not in quick mode's rows")
    if bench_settings.mode == "smoke":
        B, N = SMOKE_ROWS[0]
    benchmark.group = "in model: attention block"
    target = ATTN_TARGET_LONG if N >= 1024 else ATTN_TARGET
    run_case(benchmark, bench_settings, bench_results, ("attention", B, N),
             f"attention block B={B} N={N}", attention_case(B, N), target)


def test_per_call_overhead(benchmark, bench_settings, bench_results):
    """Microseconds per call on a tiny input, where the kernel's own work is ~1 us: the fixed
    cost of each entry point (checks, allocation, the call into compiled code). Round-robin,
    each timed loop right after an untimed call of the same entry point."""
    from imgtx_fast.nn.functional import scaled_dot_product_attention as drop_in
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*OVERHEAD_SHAPE, generator=g) for _ in range(3))
    impls = {"imgtx_fast.attention": lambda: imgtx_fast.attention(q, k, v),
             "SDPA drop-in": lambda: drop_in(q, k, v),
             "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v)}
    want = impls["torch SDPA"]()
    for name, fn in impls.items():
        torch.testing.assert_close(fn(), want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    calls = 5000 if bench_settings.mode == "full" else 1000 if bench_settings.timing else 1
    rounds = max(bench_settings.rounds, 5) if bench_settings.timing else 1

    def run():
        times = {name: [] for name in impls}
        for _ in range(rounds):
            for name, fn in impls.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / calls)
        return {n: statistics.median(ts) * 1e6 for n, ts in times.items()}

    # The same tiny call made first after an attention block's torch ops (B=8, N=64), where the
    # interpreter's and torch's caches are cold: what a model pays per call. Reported, no target.
    block, x = AttentionBlock(WIDTH, HEADS).eval(), torch.randn(8, 64, WIDTH, generator=g)
    cold_calls = 200 if bench_settings.mode == "full" else 40 if bench_settings.timing else 1

    def run_after_block():
        times = {name: [] for name in impls}
        with torch.no_grad():
            attn = torch.zeros(8, HEADS, 64, WIDTH // HEADS)
            for _ in range(cold_calls):
                for name, fn in impls.items():
                    block.split(x)
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
                    block.merge(x, attn)
        return {n: statistics.median(ts) * 1e6 for n, ts in times.items()}

    benchmark.group = "in model: per-call cost"
    us = benchmark.pedantic(run, rounds=1, iterations=1)
    after_block_us = run_after_block()
    row = {"kind": "overhead", "label": f"attention per call, {OVERHEAD_SHAPE}", "us": us,
           "after_block_us": after_block_us,
           "limit_us": us["torch SDPA"] + OVERHEAD_SLACK_US, "calls": calls, "rounds": rounds}
    bench_results.in_model[("overhead",)] = row
    benchmark.extra_info.update(row)


# ------------------------------------------------------------------------------------ diffusion

def diffusion_case(smoke: bool) -> Case:
    cfg = (VQDiffusionConfig(num_codes=64, height=4, width=4, dim=32, depth=1, heads=2) if smoke else
           VQDiffusionConfig(num_codes=4096, height=32, width=32, dim=512, depth=2, heads=16))
    torch.manual_seed(0)
    model = VQDiffusionTransformer(cfg, backend="fast").eval()
    sched = model.schedule
    K, N, t = cfg.num_codes, cfg.height * cfg.width, 50
    g = torch.Generator().manual_seed(1)
    x_t = torch.where(torch.rand(1, N, generator=g) < 0.5, K, torch.randint(0, K, (1, N), generator=g))
    cond = torch.tensor([3, 3])
    drop = torch.tensor([False, True])

    def prep():
        logp = model(x_t.expand(2, N), t, cond, drop_cond=drop)
        return logp[:1], logp[1:]

    kw = dict(truncation_rate=0.86, guidance_scale=5.0)

    def ours(cond_lp, uncond_lp):
        return posterior_sample(cond_lp, x_t, t, sched, torch.Generator().manual_seed(2),
                                log_p_x0_uncond=uncond_lp, **kw)

    def peer(cond_lp, uncond_lp):
        with imgtx_fast.backend("reference"):
            return posterior_sample(cond_lp, x_t, t, sched, torch.Generator().manual_seed(2),
                                    log_p_x0_uncond=uncond_lp, **kw)

    def check(a, b):  # different random streams: same support (tokens in [0, K]), same shape
        assert a.shape == b.shape == (1, N) and int(a.min()) >= 0 and int(a.max()) <= K

    return Case(prep=prep, impls={"imgtx_fast": ours, "torch_step": peer},
                post=lambda tokens: tokens.sum(), check=check)


def test_diffusion_step_after_the_transformer(benchmark, bench_settings, bench_results):
    benchmark.group = "in model: VQ-Diffusion step"
    smoke = bench_settings.mode == "smoke"
    run_case(benchmark, bench_settings, bench_results, ("diffusion",),
             "VQ-Diffusion transformer + step (K=4096, N=1024)" if not smoke else "diffusion step (tiny)",
             diffusion_case(smoke), None)


# ------------------------------------------------------------------------------------ tokenizer

def tokenizer_case(smoke: bool) -> Case:
    cfg = (VQVAEConfig(in_channels=3, channels=8, channel_mult=(1, 2), embed_dim=8, num_codes=32) if smoke else
           VQVAEConfig(in_channels=3, channels=32, channel_mult=(1, 2, 2), embed_dim=64, num_codes=4096))
    size = 16 if smoke else 128
    torch.manual_seed(0)
    encoder, decoder = Encoder(cfg).eval(), Decoder(cfg).eval()
    codebook = torch.randn(cfg.num_codes, cfg.embed_dim)
    images = torch.randn(1, 3, size, size)

    def prep():
        z = encoder(images).movedim(1, -1)  # (B, h, w, D): channels last, as the lookup reads it
        return (z,)

    def ours(z):
        return imgtx_fast.codebook_lookup(z, codebook)[0]

    def peer(z):
        flat = z.reshape(-1, z.shape[-1])
        return torch.cdist(flat, codebook).argmin(1).view(z.shape[:-1])

    def post(indices):
        return decoder(codebook[indices].movedim(-1, 1))

    def check(a, b):
        assert (a == b).float().mean() > 0.999  # ties at fp32 rounding may pick another code

    return Case(prep=prep, impls={"imgtx_fast": ours, "cdist_argmin": peer}, post=post, check=check)


def test_vq_tokenizer_forward(benchmark, bench_settings, bench_results):
    benchmark.group = "in model: VQ tokenizer"
    smoke = bench_settings.mode == "smoke"
    run_case(benchmark, bench_settings, bench_results, ("tokenizer",),
             "VQ tokenizer 128x128 -> 32x32 x K=4096 (D=64)" if not smoke else "VQ tokenizer (tiny)",
             tokenizer_case(smoke), None)


def format_rows(rows, judge: bool = True) -> list:
    """Summary lines (conftest's terminal summary); judge=False: no met/MISSED (smoke)."""
    lines = ["| case | threading | block ours ms | block peer/ours | kernel in block ours ms | "
             "kernel in block peer/ours | ours alone ms | in block / alone | peer's in block / alone "
             "| targets |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    notes = []
    for r in rows.values():
        if r.get("kind") == "overhead":
            us = r["us"]
            worst = max(us["imgtx_fast.attention"], us["SDPA drop-in"])
            verdict = (f"; target <= SDPA + {OVERHEAD_SLACK_US:g} us: "
                       f"{'met' if worst <= r['limit_us'] else 'MISSED'}") if judge else ""
            notes.append(f"{r['label']}: " + ", ".join(f"{n} {t:.1f} us" for n, t in us.items())
                         + verdict)
            notes.append(f"{r['label']}, first call after an attention block's torch ops (cold "
                         "caches; no target): " + ", ".join(
                             f"{n} {t:.1f} us" for n, t in r["after_block_us"].items()))
            continue
        verdicts = []
        if r["target"] is not None:
            verdicts.append(f"kernel >={r['target']:g}x: {'met' if r['kernel_ratio'] >= r['target'] else 'MISSED'}")
        verdicts.append(f"<={IN_BLOCK_TARGET:g} of alone: "
                        f"{'met' if r['in_block_over_alone'] <= IN_BLOCK_TARGET else 'MISSED'}")
        if not judge:
            verdicts = ["-"]
        lines.append(f"| {r['label']} (peer {r['peer']}) | {r['threading']} | {r['ours_block_ms']:.2f} | "
                     f"{r['block_ratio']:.2f}x | {r['ours_in_block_ms']:.3f} | {r['kernel_ratio']:.2f}x | "
                     f"{r['ours_alone_ms']:.3f} | {r['in_block_over_alone']:.2f} | "
                     f"{r['peer_in_block_ms'] / r['peer_alone_ms']:.2f} | {'; '.join(verdicts)} |")
    return lines + notes

