"""Per-call overhead of each front end: the torch ops against imgtx_fast.numpy, same data, CPU.

Every case times, round-robin in one test:
  _C      the bare binding call, its arguments and outputs prepared once (the kernel's floor),
  torch   the public torch API (imgtx_fast.codebook_lookup, attention, imgtx_fast.diffusion.*)
          on tensors sharing the numpy arrays' memory,
  numpy   imgtx_fast.numpy on the numpy arrays.
front end - _C is what a front end adds per call: checks, output allocation, the random key,
and for torch the dispatcher. Small shapes, where that overhead dominates, and one mid size per op;
at mid sizes the difference also holds the kernel writing into fresh outputs (the bare call
rewrites the same cache-warm buffers every time), and the shared 2-core machine is noisy.
Both front ends' outputs are compared bitwise after timing, so a wrong answer cannot post a time.
Modes (conftest.py): smoke (--benchmark-disable) calls each once; otherwise each timed sample
is a batch of calls of about 2 ms (so microsecond calls are measurable), medians over
max(rounds, 15) round-robin samples. The summary table is printed at the end of the session.
"""
import statistics
import time

import numpy as np
import pytest
import torch

import imgtx_fast
import imgtx_fast.numpy as itx
from imgtx_fast import _C, Local1d
from imgtx_fast import diffusion as tdiff
from imgtx_fast._frontend import ArrayOps

SAMPLE_S = 2e-3   # one timed sample: a batch of calls lasting about this long
MIN_ROUNDS = 15
IMPLS = ("_C", "torch", "numpy")


# ------------------------------------------------------------------------ the bare _C call

class _Recorder:
    """The numpy front end's runtime, recording the kernel call instead of dropping it: its
    arguments, and every array whose address went into them (kept alive for the replays)."""

    def __init__(self, runtime):
        self._rt, self.keep, self.launch = runtime, [], None

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def ptr(self, a):
        self.keep.append(a)
        return self._rt.ptr(a)

    def _record(self, fn, args):
        self.launch = (fn, args)
        return fn(*args, itx.get_num_threads())

    def codebook_lookup(self, args, sizes):
        self._record(_C.codebook_lookup_cpu, args)

    def attention_forward(self, args):
        self._record(_C.attention_forward_cpu, args)

    def mr_posterior(self, args):
        return self._record(_C.mr_posterior_cpu, args)

    def mr_q_sample(self, args):
        return self._record(_C.mr_q_sample_cpu, args)


def bare_call(op: str, *args, **kwargs):
    """A function making exactly the _C call that imgtx_fast.numpy.<op>(*args, **kwargs) makes."""
    rec = _Recorder(itx._ops._rt)
    getattr(ArrayOps(rec), op)(*args, **kwargs)
    fn, c_args = rec.launch
    threads = itx.get_num_threads()
    keep = rec.keep

    def call():
        assert keep  # the arrays behind the recorded pointers live as long as this function
        return fn(*c_args, threads)
    return call


# ------------------------------------------------------------------------------------ cases

def _rng(name):
    return np.random.default_rng(sum(map(ord, name)))


def _f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def case_codebook(name, N, K, D):
    rng = _rng(name)
    z, cb = _f32(rng, (N, D)), _f32(rng, (K, D))
    zt, cbt = torch.from_numpy(z), torch.from_numpy(cb)
    fns = {"_C": bare_call("codebook_lookup", z, cb),
           "torch": lambda: imgtx_fast.codebook_lookup(zt, cbt),
           "numpy": lambda: itx.codebook_lookup(z, cb)}
    return fns, f"N={N} K={K} D={D}"


def case_attention(name, B, H, Nq, Nk, D, **kw):
    rng = _rng(name)
    q, k, v = _f32(rng, (B, H, Nq, D)), _f32(rng, (B, H, Nk, D)), _f32(rng, (B, H, Nk, D))
    qt, kt, vt = map(torch.from_numpy, (q, k, v))
    fns = {"_C": bare_call("attention", q, k, v, **kw),
           "torch": lambda: imgtx_fast.attention(qt, kt, vt, **kw),
           "numpy": lambda: itx.attention(q, k, v, **kw)}
    extra = "".join(f" {n}={v!r}" for n, v in kw.items()).replace("Local1d(block=", "Local1d(")
    return fns, f"B={B} H={H} Nq={Nq} Nk={Nk} D={D}{extra}"


def case_posterior(name, B, K, N):
    rng = _rng(name)
    logp = _f32(rng, (B, N, K), 3.0).transpose(0, 2, 1)  # diffusers' layout
    x_t = rng.integers(0, K + 1, (B, N))
    s, ts = itx.MaskAndReplaceSchedule(K), tdiff.MaskAndReplaceSchedule(K)
    lt, xt = torch.from_numpy(logp), torch.from_numpy(x_t)
    gen, tgen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    kw = dict(truncation_rate=0.86)
    fns = {"_C": bare_call("posterior_sample", logp, x_t, 50, s, 0, **kw),
           "torch": lambda: tdiff.posterior_sample(lt, xt, 50, ts, tgen, **kw),
           "numpy": lambda: itx.posterior_sample(logp, x_t, 50, s, gen, **kw)}
    return fns, f"B={B} K={K} N={N}"


def case_q_sample(name, B, K, N):
    rng = _rng(name)
    x0 = rng.integers(0, K, (B, N))
    s, ts = itx.MaskAndReplaceSchedule(K), tdiff.MaskAndReplaceSchedule(K)
    x0t = torch.from_numpy(x0)
    gen, tgen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    fns = {"_C": bare_call("q_sample", x0, 50, s, 0),
           "torch": lambda: tdiff.q_sample(x0t, 50, ts, tgen),
           "numpy": lambda: itx.q_sample(x0, 50, s, gen)}
    return fns, f"B={B} K={K} N={N}"


CASES = {
    "codebook_small": (case_codebook, dict(N=16, K=16, D=8)),
    "codebook_mid": (case_codebook, dict(N=1024, K=512, D=64)),
    "attention_small": (case_attention, dict(B=1, H=1, Nq=16, Nk=16, D=16)),
    "attention_decode": (case_attention, dict(B=1, H=8, Nq=1, Nk=256, D=64, causal=True)),
    "attention_local1d_small": (case_attention, dict(B=1, H=2, Nq=64, Nk=64, D=32, pattern=Local1d(16))),
    "attention_mid": (case_attention, dict(B=1, H=4, Nq=512, Nk=512, D=64, causal=True)),
    "posterior_small": (case_posterior, dict(B=1, K=16, N=16)),
    "posterior_mid": (case_posterior, dict(B=2, K=1024, N=256)),
    "q_sample_small": (case_q_sample, dict(B=1, K=16, N=16)),
    "q_sample_mid": (case_q_sample, dict(B=8, K=1024, N=1024)),
}


# ----------------------------------------------------------------------------------- timing

def interleave(fns, settings):
    """Median seconds per call of each implementation, sampled round-robin; smoke: one call."""
    if not settings.timing:
        for fn in fns.values():
            fn()
        return {n: 0.0 for n in fns}, 0
    iters = {}
    for name, fn in fns.items():  # warm-up, and the batch size of a ~SAMPLE_S sample
        fn()
        t0 = time.perf_counter()
        fn()
        iters[name] = max(1, min(2000, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-7))))
    times = {n: [] for n in fns}
    rounds = max(settings.rounds, MIN_ROUNDS)
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no fixed order
            fn, n = fns[name], iters[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t0) / n)
    return {n: statistics.median(ts) for n, ts in times.items()}, rounds


def check_same(fns, sampling: bool):
    """The torch and numpy front ends give bitwise-equal results (same kernel). Samples are
    drawn with different keys here, so only their shapes and ranges are compared (the tests
    compare samples of equal keys bitwise)."""
    t_out, n_out = fns["torch"](), fns["numpy"]()
    t_out, n_out = (t_out, n_out) if isinstance(t_out, tuple) else ((t_out,), (n_out,))
    for a, b in zip(t_out, n_out):
        if sampling:
            assert tuple(a.shape) == b.shape and int(a.min()) >= 0 and b.min() >= 0
        else:
            np.testing.assert_array_equal(a.numpy(), b)


# ----------------------------------------------------------------------------- the summary

_RESULTS = {}


class _Summary:
    """Prints the overhead table at the end of the session (registered by the first test, so
    this file needs nothing in conftest.py)."""

    def __init__(self, settings):
        self.settings = settings

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        tr, s = terminalreporter, self.settings
        tr.write_sep("-", "imgtx_fast front ends: per-call time and overhead over the bare _C call")
        if not s.timing:
            tr.write_line(f"smoke (--benchmark-disable): each call made once, untimed; threads={s.threads}")
            return
        rounds = ", ".join(str(n) for n in sorted({r["rounds"] for r in _RESULTS.values()}))
        tr.write_line(f"CPU fp32, threads={s.threads}, mode={s.mode}; median us per call over {rounds} "
                      "round-robin samples of ~2 ms each; (+x) = front end - _C")
        header = ["case", "shape", "_C us", "torch us", "numpy us"]
        rows = []
        for case, r in _RESULTS.items():
            base = r["us"]["_C"]
            cells = [f"{base:.1f}"] + [f"{r['us'][i]:.1f} (+{r['us'][i] - base:.1f})" for i in ("torch", "numpy")]
            rows.append([case, r["shape"]] + cells)
        widths = [max(len(row[c]) for row in rows + [header]) for c in range(len(header))]
        for row in [header] + rows:
            tr.write_line("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(row, widths))))


@pytest.fixture(scope="module")
def summary(pytestconfig, bench_settings):
    plugin = _Summary(bench_settings)
    pytestconfig.pluginmanager.register(plugin, "imgtx_frontends_summary")
    yield
    # stays registered: the terminal summary runs after the tests


@pytest.fixture(scope="module", autouse=True)
def _threads(bench_settings):
    previous = itx.get_num_threads()
    itx.set_num_threads(torch.get_num_threads())  # the same thread count for every implementation
    yield
    itx.set_num_threads(previous)


@pytest.mark.parametrize("case", list(CASES))
def test_frontend_overhead(benchmark, bench_settings, summary, case):
    build, kw = CASES[case]
    fns, shape = build(case, **kw)
    assert tuple(fns) == IMPLS
    benchmark.group = f"frontends {case}"
    medians, rounds = benchmark.pedantic(lambda: interleave(fns, bench_settings),
                                         rounds=1, iterations=1, warmup_rounds=0)
    check_same(fns, sampling=build in (case_posterior, case_q_sample))
    us = {n: t * 1e6 for n, t in medians.items()}
    _RESULTS[case] = {"shape": shape, "us": us, "rounds": rounds}
    benchmark.extra_info.update(shape=shape, rounds=rounds, us={n: round(v, 2) for n, v in us.items()},
                                overhead_us={n: round(us[n] - us["_C"], 2) for n in ("torch", "numpy")})
