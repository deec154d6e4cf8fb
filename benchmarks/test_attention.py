"""Fused attention on the CPU, fp32: imgtx_fast.attention against torch SDPA, in the same run.

Each case is one test that times imgtx_fast and its SDPA peers round-robin (interleaved), every
timed call right after one untimed call of the same implementation (torch's OpenMP threads keep
spinning after an op and slow whatever runs next). Ratio = peer median / ours median (> 1x:
imgtx_fast is faster); each bar is reported met/missed in the summary, never asserted.

  case            shapes (full and quick)                          peer                      bar
  dense_fwd       q/k/v (4, 8, 1024, 64)                           sdpa                      1.0x
  causal_fwd      (4, 8, 1024, 64), causal                         sdpa is_causal=True       1.0x
  dense_long_fwd  (2, 8, 4096, 64)                                 sdpa                      1.0x
  dense_fwd_bwd   (4, 8, 1024, 64), forward + backward             sdpa forward + backward   1.0x
  short_fwd_bwd   (8, 8, 64, 64), forward + backward (training     sdpa forward + backward   1.0x
                  at short sequences: per-call costs weigh)
  local1d         (2, 8, 4096, 64), Local1d(256) causal            sdpa + dense bool mask    8x
                                                                   sdpa tile by tile         2x
                                                                   sdpa blocked (batched)    -
  local2d         (2, 8, 4096, 64), 64x64 image, Local2d query     sdpa + dense bool mask    8x
                  (8, 16), flange (8, 16), causal
  cross_padded    q (4, 8, 1024, 64), k/v (4, 8, 77, 64),          sdpa + (B,1,1,77) mask    1.5x
                  key_lengths [77, 50, 20, 7]
  decode          q (4, 8, 1, 64), k/v (4, 8, 4096, 64), causal    sdpa, no mask             2x
  decode_small    q (1, 8, 1, 64), k/v (1, 8, 1024, 64), causal    sdpa, no mask             1.0x
  decode_gqa      q (1, 32, 1, 128), k/v (1, 8, 2048, 128), causal sdpa, enable_gqa=True     -
                  (4 query heads a kv head)

Decoding reads each cached key and value once: the decode cases also report our K+V read rate
against torch.sum over as many bytes, timed in the same round robin (target: >= 85% of it,
with one query head a kv head; with GQA each byte feeds several heads' work: no target).

Peers get their masks built outside the timed region (the best case for them). The decode peer
takes no mask: every cached key is visible, and SDPA's is_causal is top-left aligned (one query
would see key 0 only). "tile by tile" is a Python loop over query blocks calling SDPA on the
block's 2L-key window with one small (L, 2L) mask, the best a user can do with SDPA; "blocked"
(no bar) batches the same windows into one 5-D SDPA call after concatenating each block's keys
with the previous block's (a copy of K and V).

GF/s counts visible (query, key) pairs only: 4 * pairs * D flops for a forward, 3.5x that for
forward + backward (backward = 2.5x forward), for ours and the peers alike; test_attention_mm_ceiling
measures fp32 torch.mm in the same session for scale. test_attention_peak_memory measures the
peak extra RSS of one local 1D forward per implementation, each in a fresh process.

After timing, every peer's output (gradients for forward + backward) must match ours within fp32
tolerances, so a wrong kernel cannot post a fast time.

Modes (conftest.py): full = the shapes above, medians of >= 7 rounds for sub-second calls
(>= 31 under 10 ms, >= 101 under a millisecond);
quick (IMGTX_BENCH_QUICK=1) = the same shapes, the session's rounds (3); smoke
(--benchmark-disable) = tiny shapes, each implementation called once, bars not judged.
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from imgtx_fast import Local1d, Local2d, attention
from imgtx_fast.reference.attention import visible_mask
from rss_probe import PROC_STATUS_HELPERS

if not hasattr(F, "scaled_dot_product_attention"):  # pragma: no cover - torch < 2.0
    pytest.skip("torch.nn.functional.scaled_dot_product_attention (the peer) needs torch >= 2.0",
                allow_module_level=True)

MiB = 2.0 ** 20
FWD_ATOL, FWD_RTOL = 2e-4, 2e-3      # fp32 outputs of ~unit scale, different summation orders
BWD_ATOL, BWD_RTOL = 1e-3, 1e-2
READ_CEILING = "torch_sum"  # the decode cases' read ceiling, timed in their round robin


# ------------------------------------------------------------------------------------ cases

@dataclass(frozen=True)
class Case:
    id: str
    label: str
    B: int
    H: int
    Nq: int
    Nk: int
    D: int
    causal: bool = False
    pattern: object = None
    key_lengths: Optional[Tuple[int, ...]] = None
    backward: bool = False
    bars: Dict[str, float] = field(default_factory=dict)  # peer -> minimum peer/ours ratio
    Hkv: Optional[int] = None  # kv heads (GQA); None: H

    @property
    def kv_heads(self) -> int:
        return self.H if self.Hkv is None else self.Hkv

    @property
    def shape(self) -> str:
        q = f"({self.B},{self.H},{self.Nq},{self.D})"
        kv = f"({self.B},{self.kv_heads},{self.Nk},{self.D})"
        return q if self.Nq == self.Nk and self.Hkv is None else f"{q} x kv {kv}"


def _cases(mode: str):
    """The target shapes in full and quick mode; tiny ones (same structure) in smoke mode."""
    if mode == "smoke":
        B, H, N, NL, D, L, img, qs = 1, 2, 128, 256, 32, 32, 16, (4, 8)
        Bx, Nx, Bd, Nd, Nds, Bs, Ns = 4, 64, 2, 512, 128, 2, 32
        Hg, Hgkv, Ng, Dg = 4, 1, 128, 32
    else:
        B, H, N, NL, D, L, img, qs = 4, 8, 1024, 4096, 64, 256, 64, (8, 16)
        Bx, Nx, Bd, Nd, Nds, Bs, Ns = 4, 1024, 4, 4096, 1024, 8, 64
        Hg, Hgkv, Ng, Dg = 32, 8, 2048, 128
    Bl = max(1, B // 2)
    lengths = (77, 50, 20, 7)[:Bx]
    return [
        Case("dense_fwd", "dense fwd", B, H, N, N, D, bars={"sdpa": 1.0}),
        Case("causal_fwd", "causal fwd", B, H, N, N, D, causal=True, bars={"sdpa_is_causal": 1.0}),
        Case("dense_long_fwd", "dense long fwd", Bl, H, NL, NL, D, bars={"sdpa": 1.0}),
        Case("dense_fwd_bwd", "dense fwd+bwd", B, H, N, N, D, backward=True, bars={"sdpa": 1.0}),
        Case("short_fwd_bwd", "short fwd+bwd", Bs, H, Ns, Ns, D, backward=True, bars={"sdpa": 1.0}),
        Case("local1d", f"local1d L={L} causal", Bl, H, NL, NL, D, pattern=Local1d(L, causal=True),
             bars={"sdpa_dense_mask": 8.0, "sdpa_tiled": 2.0}),
        Case("local2d", f"local2d {img}x{img} q{qs[0]}x{qs[1]} f{qs[0]}x{qs[1]}", Bl, H, img * img, img * img, D,
             pattern=Local2d(img, img, qs, qs, causal=True), bars={"sdpa_dense_mask": 8.0}),
        Case("cross_padded", "cross, padded keys", Bx, H, Nx, 77, D, key_lengths=lengths,
             bars={"sdpa_bool_mask": 1.5}),
        Case("decode", "decode (1 query)", Bd, H, 1, Nd, D, causal=True, bars={"sdpa": 2.0}),
        Case("decode_small", "decode (1 query), short cache", 1, H, 1, Nds, D, causal=True,
             bars={"sdpa": 1.0}),
        Case("decode_gqa", f"decode (1 query), GQA {Hg // Hgkv}:1", 1, Hg, 1, Ng, Dg, causal=True,
             Hkv=Hgkv),
    ]


CASE_IDS = [c.id for c in _cases("full")]


def case_by_id(mode: str, case_id: str) -> Case:
    return next(c for c in _cases(mode) if c.id == case_id)


def visible_pairs(c: Case) -> int:
    """(query, key) pairs that are visible, summed over batch and heads."""
    if c.key_lengths is not None:
        return c.H * c.Nq * sum(c.key_lengths)
    if c.pattern is None and not c.causal:
        return c.B * c.H * c.Nq * c.Nk
    per_head = int(visible_mask(c.Nq, c.Nk, causal=c.causal, pattern=c.pattern).sum())
    return c.B * c.H * per_head


def flops(c: Case) -> float:
    fwd = 4.0 * visible_pairs(c) * c.D
    return fwd * 3.5 if c.backward else fwd


# ------------------------------------------------------------------------------------ peers

def sdpa_local1d_tiled(q, k, v, block, inner_mask):
    """Causal Local1d through SDPA, one query block at a time: block b (b >= 1) attends to the
    keys [(b-1)L, (b+1)L) under the (L, 2L) mask key <= query + L; block 0 is plain causal."""
    N = q.shape[2]
    out = torch.empty_like(q)
    for s in range(0, N, block):
        e = min(s + block, N)
        if s == 0:
            out[:, :, :e] = F.scaled_dot_product_attention(q[:, :, :e], k[:, :, :e], v[:, :, :e],
                                                           is_causal=True)
        else:
            ks = s - block
            out[:, :, s:e] = F.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, ks:e], v[:, :, ks:e], attn_mask=inner_mask[:e - s, :e - ks])
    return out


def local1d_inner_mask(block, device=None):
    """(L, 2L) bool: query i of a block sees window key j (window = previous block + own) iff j <= i + L."""
    return torch.ones(block, 2 * block, dtype=torch.bool, device=device).tril(diagonal=block)


def local1d_blocked_mask(n_blocks, block, device=None):
    """(n_blocks, L, 2L) bool for sdpa_local1d_blocked: block 0 has no previous block."""
    m = local1d_inner_mask(block, device).expand(n_blocks, block, 2 * block).clone()
    m[0, :, :block] = False
    return m


def sdpa_local1d_blocked(q, k, v, block, mask):
    """Causal Local1d as one batched 5-D SDPA call over all query blocks (N % L == 0): each block's
    keys are the previous block's followed by its own (concatenated: a copy of K and V)."""
    B, H, N, D = q.shape
    nb = N // block

    def windows(t):
        tb = t.reshape(B, H, nb, block, D)
        prev = F.pad(tb, (0, 0, 0, 0, 1, 0))[:, :, :nb]  # block b-1 (zeros for block 0)
        return torch.cat([prev, tb], dim=3)              # (B, H, nb, 2L, D)
    out = F.scaled_dot_product_attention(q.reshape(B, H, nb, block, D), windows(k), windows(v),
                                         attn_mask=mask)
    return out.reshape(B, H, N, D)


# ------------------------------------------------------------------------------------ inputs

def make_inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(c.B, c.H, c.Nq, c.D, generator=g)
    k = torch.randn(c.B, c.kv_heads, c.Nk, c.D, generator=g)
    v = torch.randn(c.B, c.kv_heads, c.Nk, c.D, generator=g)
    return q, k, v


def build_fns(c: Case, q, k, v):
    """{impl: fn}; fn() returns the output (forward: the caller runs it under no_grad) or the
    (dq, dk, dv) tuple (forward+backward).
    Masks and other peer setup are built here, outside the timed region."""
    fns = {}
    if c.backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

        def ours():
            return torch.autograd.grad(attention(q, k, v), (q, k, v), go)

        def sdpa():
            return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), go)
        return {"imgtx_fast": ours, "sdpa": sdpa}

    if c.key_lengths is not None:
        kl = torch.tensor(c.key_lengths, dtype=torch.int64)
        mask = (torch.arange(c.Nk)[None, :] < kl[:, None])[:, None, None, :]  # (B, 1, 1, Nk)
        fns["imgtx_fast"] = lambda: attention(q, k, v, key_lengths=kl)
        fns["sdpa_bool_mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    elif c.pattern is not None:
        dense = visible_mask(c.Nq, c.Nk, pattern=c.pattern)
        fns["imgtx_fast"] = lambda: attention(q, k, v, pattern=c.pattern)
        fns["sdpa_dense_mask"] = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        if isinstance(c.pattern, Local1d):
            L = c.pattern.block
            inner = local1d_inner_mask(L)
            fns["sdpa_tiled"] = lambda: sdpa_local1d_tiled(q, k, v, L, inner)
            if c.Nq % L == 0:
                blocked = local1d_blocked_mask(c.Nq // L, L)
                fns["sdpa_blocked"] = lambda: sdpa_local1d_blocked(q, k, v, L, blocked)
    elif c.causal and c.Nq == 1:  # decode: every cached key is visible
        fns["imgtx_fast"] = lambda: attention(q, k, v, causal=True)
        gqa = c.Hkv is not None  # SDPA reads the shared kv heads itself (enable_gqa)
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif c.causal:
        fns["imgtx_fast"] = lambda: attention(q, k, v, causal=True)
        fns["sdpa_is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        fns["imgtx_fast"] = lambda: attention(q, k, v)
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)
    return fns


# ------------------------------------------------------------------------------------ timing

def interleave(fns, settings, rewarm_below_s=1.0):
    """Median seconds per implementation, timed round-robin, and each one's last output.

    Smoke mode: one call each (timed, for the table only). Otherwise: one or two untimed warm-up
    rounds, then rounds in which each timed call follows one untimed call of the same
    implementation; calls slower than rewarm_below_s skip that untimed call (a spinning thread
    pool costs them nothing measurable and it would double the run). Rounds: 1 if the slowest
    warm-up call took more than max_call_s; in full mode, when every call is under a second, a
    second warm-up round and at least 7 rounds (31 when every call of that round took under
    10 ms, 101 under 1 ms); otherwise the session's rounds."""
    times = {name: [] for name in fns}
    outs, last = {}, {}
    for name, fn in fns.items():  # warm-up round (the only round in smoke mode)
        t0 = time.perf_counter()
        outs[name] = fn()
        last[name] = time.perf_counter() - t0
    if not settings.timing:
        return {n: t for n, t in last.items()}, outs, 0
    slowest = max(last.values())
    if slowest > settings.max_call_s:
        rounds = 1
    elif settings.mode == "full" and slowest < 1.0:
        for name, fn in fns.items():  # a second warm-up round: first calls pay one-time setup
            t0 = time.perf_counter()
            fn()
            last[name] = time.perf_counter() - t0
        slowest = max(last.values())
        # short calls: a median of 7 moves by ~15% run to run; more rounds cost under a second
        rounds = max(settings.rounds, 101 if slowest < 1e-3 else 31 if slowest < 1e-2 else 7)
    else:
        rounds = settings.rounds
    for _ in range(rounds):
        for name, fn in fns.items():
            if last[name] < rewarm_below_s:
                fn()
            t0 = time.perf_counter()
            outs[name] = fn()
            last[name] = time.perf_counter() - t0
            times[name].append(last[name])
    return {n: statistics.median(ts) for n, ts in times.items()}, outs, rounds


def check_against_ours(c: Case, outs):
    ours = outs["imgtx_fast"]
    for name, out in outs.items():
        if name == "imgtx_fast":
            continue
        if c.backward:
            for g_name, a, b in zip(("dq", "dk", "dv"), ours, out):
                torch.testing.assert_close(a, b, atol=BWD_ATOL, rtol=BWD_RTOL,
                                           msg=lambda m: f"{c.id}: {g_name} of imgtx_fast vs {name}: {m}")
        else:
            torch.testing.assert_close(ours, out, atol=FWD_ATOL, rtol=FWD_RTOL,
                                       msg=lambda m: f"{c.id}: imgtx_fast vs {name}: {m}")


# ------------------------------------------------------------------------------------ tests

def _time_calls(fn, settings):
    """Median seconds of fn over the session's rounds, each after an untimed call (smoke: 1 call)."""
    fn()
    if not settings.timing:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, 1
    ts = []
    for _ in range(settings.rounds):
        fn()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), len(ts)


def test_attention_mm_ceiling(benchmark, bench_settings, bench_results):
    """fp32 torch.mm M^3 (M = 4096 full, 2048 quick, 256 smoke): the GEMM rate this machine reaches."""
    M = bench_settings.mm_size
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, M, generator=g), torch.randn(M, M, generator=g)
    benchmark.group = "attention ceiling"
    med, rounds = benchmark.pedantic(lambda: _time_calls(lambda: torch.mm(a, b), bench_settings),
                                     rounds=1, iterations=1, warmup_rounds=0)
    gflops = 2 * M ** 3 / med / 1e9
    benchmark.extra_info.update(M=M, gflops=round(gflops, 2), rounds=rounds)
    bench_results.attention_ceiling = {"size": M, "gflops": gflops, "rounds": rounds}


def test_attention_stream_ceiling(benchmark, bench_settings, bench_results):
    """torch.sum over as many bytes as the decode case's K and V: the DRAM (or cache) read rate
    that bounds decoding, which reads each cached key and value once."""
    c = case_by_id(bench_settings.mode, "decode")
    x = torch.randn(2 * c.B * c.H * c.Nk * c.D)
    benchmark.group = "attention ceiling"
    med, rounds = benchmark.pedantic(lambda: _time_calls(lambda: x.sum(), bench_settings),
                                     rounds=1, iterations=1, warmup_rounds=0)
    gbps = x.numel() * 4 / med / 1e9
    benchmark.extra_info.update(bytes=x.numel() * 4, gbps=round(gbps, 2), rounds=rounds)
    bench_results.attention_stream = {"mib": x.numel() * 4 / 2 ** 20, "gbps": gbps, "rounds": rounds}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_attention(benchmark, bench_settings, bench_results, case_id):
    c = case_by_id(bench_settings.mode, case_id)
    benchmark.group = f"attention {c.id}"
    q, k, v = make_inputs(c)
    fns = build_fns(c, q, k, v)
    kv_bytes = (k.numel() + v.numel()) * k.element_size()
    if c.Nq == 1:  # decoding is a read of K and V: torch.sum over as many bytes joins the round
        x = torch.randn(kv_bytes // 4)  # robin, so the read ceiling sees the same caches and threads
        fns[READ_CEILING] = x.sum

    def timed():
        # Forward calls run under no_grad entered once, as inference code does, not per call:
        # the context manager costs ~4 us a call, a tenth of a short decode (and the torch.sum
        # it is compared with runs without it).
        with torch.no_grad() if not c.backward else contextlib.nullcontext():
            return interleave(fns, bench_settings)
    medians, outs, rounds = benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    sum_s = medians.pop(READ_CEILING, None)
    outs.pop(READ_CEILING, None)
    check_against_ours(c, outs)  # on the outputs of the last timed calls

    work = flops(c)
    ours = medians["imgtx_fast"]
    ratios = {p: medians[p] / ours for p in medians if p != "imgtx_fast"}
    record = {
        "label": c.label, "shape": c.shape, "D": c.D, "rounds": rounds, "mode": bench_settings.mode,
        "ms": {n: t * 1e3 for n, t in medians.items()},
        "gflops": {n: work / t / 1e9 for n, t in medians.items()},
        "ratios": ratios, "bars": dict(c.bars),
    }
    if sum_s is not None:  # decoding: report it as a bandwidth
        record["gbps"] = {n: kv_bytes / t / 1e9 for n, t in medians.items()}
        record["read_ceiling_gbps"] = kv_bytes / sum_s / 1e9
        record["read_fraction"] = record["gbps"]["imgtx_fast"] / record["read_ceiling_gbps"]
        record["read_target"] = c.Hkv is None  # one query row a kv head: a read of the cache
    bench_results.attention[c.id] = record
    benchmark.extra_info.update(
        shape=c.shape, rounds=rounds, visible_pairs=visible_pairs(c),
        ms={n: round(v, 3) for n, v in record["ms"].items()},
        gflops={n: round(v, 2) for n, v in record["gflops"].items()},
        ratios={n: round(v, 3) for n, v in ratios.items()},
        bars={p: {"bar": b, "ratio": round(ratios[p], 3), "met": ratios[p] >= b}
              for p, b in c.bars.items() if p in ratios})


_MEMORY_SCRIPT = r"""
import importlib.util, json, sys, torch
path, impl, B, H, N, D, L, threads = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
torch.set_num_threads(threads)
sys.path.insert(0, path.rsplit("/", 1)[0])  # the module imports its neighbour rss_probe
spec = importlib.util.spec_from_file_location("attention_bench", path)
ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab)
""" + PROC_STATUS_HELPERS + r"""
def prepare(q, k, v):
    n = q.shape[2]
    if impl == "imgtx_fast":
        pat = ab.Local1d(L, causal=True)
        return lambda: ab.attention(q, k, v, pattern=pat)
    if impl == "sdpa_dense_mask":
        mask = ab.visible_mask(n, n, pattern=ab.Local1d(L, causal=True))
        return lambda: ab.F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "sdpa_tiled":
        inner = ab.local1d_inner_mask(L)
        return lambda: ab.sdpa_local1d_tiled(q, k, v, L, inner)
    if impl == "sdpa_blocked":
        mask = ab.local1d_blocked_mask(n // L, L)
        return lambda: ab.sdpa_local1d_blocked(q, k, v, L, mask)
    raise ValueError(impl)

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
with torch.no_grad():
    small = [t[:, :, :2 * L].clone() for t in (q, k, v)]
    prepare(*small)()  # warm-up: load kernels, start the thread pool
    del small
    reset_hwm()
    rss0 = status("VmRSS")
    fn = prepare(q, k, v)           # the peer's mask (kept alive, as a user would cache it)
    prep_peak = status("VmHWM") - rss0
    rss1 = status("VmRSS")
    reset = reset_hwm()
    out = fn()
    hwm = status("VmHWM")
base = rss1 if reset else max(rss1, hwm)
print(json.dumps({"prep_resident": max(0, rss1 - rss0), "prep_peak": max(0, prep_peak),
                  "call_extra": max(0, hwm - base), "hwm_reset": reset,
                  "output_bytes": out.numel() * out.element_size()}))
"""

MEMORY_IMPLS = ("imgtx_fast", "sdpa_dense_mask", "sdpa_tiled", "sdpa_blocked")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_attention_peak_memory(benchmark, bench_settings, bench_results):
    """Peak extra RSS of one local 1D forward (the local1d case's shape), each implementation in
    a fresh process: MiB above the RSS before the call, plus what the peer's setup keeps resident
    (the dense (N, N) bool mask: N^2 bytes) and its peak while built. Reported, not asserted."""
    c = case_by_id(bench_settings.mode, "local1d")
    L = c.pattern.block
    benchmark.group = "attention memory (time = probe processes)"
    threads = bench_settings.threads

    def probe(impl):
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, os.path.abspath(__file__), impl,
             *map(str, (c.B, c.H, c.Nq, c.D, L, threads))],
            capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir(),
            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        assert proc.returncode == 0, f"memory probe for {impl} failed:\n{proc.stderr[-3000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    probes = benchmark.pedantic(lambda: {i: probe(i) for i in MEMORY_IMPLS},
                                rounds=1, iterations=1, warmup_rounds=0)
    info = {
        "shape": c.shape, "block": L, "N": c.Nq,
        "dense_mask_mib": c.Nq * c.Nk / MiB,                       # bool: 1 byte per (query, key)
        "scores_fp32_mib": c.B * c.H * c.Nq * c.Nk * 4 / MiB,     # one fp32 (B, H, N, N) score tensor
        "output_mib": probes["imgtx_fast"]["output_bytes"] / MiB,
        "hwm_reset": all(p["hwm_reset"] for p in probes.values()),
        "impls": {i: {"call_mib": p["call_extra"] / MiB, "setup_resident_mib": p["prep_resident"] / MiB,
                      "setup_peak_mib": p["prep_peak"] / MiB,
                      "total_mib": max(p["prep_peak"], p["prep_resident"] + p["call_extra"]) / MiB}
                  for i, p in probes.items()},
    }
    bench_results.attention_memory = info
    benchmark.extra_info.update(info)
