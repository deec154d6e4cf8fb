"""pytest-benchmark setup for the imgtx_fast benchmarks: run modes, threads, and one summary table.

Modes (chosen once per session):
  full   default                              N = 16384 (16 latents of 32x32), mm ceiling 4096^3
  quick  IMGTX_BENCH_QUICK=1                  N = 2048,                        mm ceiling 2048^3
  smoke  --benchmark-disable (CI)             N = 1024, every body runs once untimed, mm 256^3
Knobs: IMGTX_BENCH_ROUNDS / --imgtx-rounds (timed rounds, default 3),
       IMGTX_BENCH_MAX_CALL_S / --imgtx-max-call-s (a call slower than this gets 1 timed round, default 10),
       IMGTX_BENCH_THREADS (intra-op threads; default: every CPU this process may run on).
"""
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import pytest
import torch


def _prefer_installed_package() -> None:
    """`python -m pytest benchmarks/` from a checkout root puts the source tree first on
    sys.path: drop it when it has no compiled core and a package is installed (the benchmark
    modules import imgtx_fast after this). The logic is tests/source_tree.py's."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "source_tree.py")
    if os.path.exists(path):
        spec = importlib.util.spec_from_file_location("imgtx_fast_source_tree", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.prefer_installed_package()


_prefer_installed_package()

FULL_N, QUICK_N, SMOKE_N = 16384, 2048, 1024
DEFAULT_ROUNDS = 3
DEFAULT_MAX_CALL_S = 10.0
READ_TARGET = 0.85          # decode: our K+V read rate over torch.sum's on the same bytes


def pytest_addoption(parser):
    group = parser.getgroup("imgtx-bench", "imgtx_fast benchmarks")
    group.addoption("--imgtx-rounds", type=int, default=None,
                    help=f"timed rounds per benchmark (env IMGTX_BENCH_ROUNDS, default {DEFAULT_ROUNDS})")
    group.addoption("--imgtx-max-call-s", type=float, default=None,
                    help="a benchmark whose warm-up call takes longer than this many seconds is timed "
                         f"for 1 round only (env IMGTX_BENCH_MAX_CALL_S, default {DEFAULT_MAX_CALL_S:g})")


@dataclass
class BenchSettings:
    timing: bool          # False under --benchmark-disable: bodies run once, untimed
    mode: str             # "full" | "quick" | "smoke"
    N: int                # latent vectors per call
    rounds: int
    max_call_s: float
    threads: int
    mm_size: int          # side of the square fp32 matmul ceiling


@dataclass
class BenchResults:
    # (N, K, D) -> impl -> {"median_s": float, "rounds": int}
    cases: Dict[Tuple[int, int, int], Dict[str, dict]] = field(default_factory=dict)
    ceiling: Optional[dict] = None   # {"size": M, "gflops": float}
    memory: Optional[dict] = None    # extra_info of test_peak_memory
    # test_interleaved_ratios: (N, K, D) -> {"ratios": {peer: median ratio}, "ours_ms", "rounds"}
    interleaved: Dict[Tuple[int, int, int], dict] = field(default_factory=dict)
    # GPU (test_codebook_cuda.py): (dtype, N, K, D) -> impl -> median seconds; dtype -> TFLOP/s
    gpu_cases: Dict[Tuple[str, int, int, int], Dict[str, float]] = field(default_factory=dict)
    gpu_ceiling: Dict[str, float] = field(default_factory=dict)
    # test_diffusion.py: (what, (B, K, N)) -> {"ms": {impl: median ms}, "ratios": {...}, ...}
    diffusion: Dict[tuple, dict] = field(default_factory=dict)
    # test_attention.py: case id -> {"label", "shape", "ms", "gflops", "ratios", "bars", ...}
    attention: Dict[str, dict] = field(default_factory=dict)
    attention_ceiling: Optional[dict] = None  # {"size": M, "gflops": float, "rounds": int}
    attention_memory: Optional[dict] = None   # extra_info of test_attention_peak_memory
    attention_stream: Optional[dict] = None   # {"mib", "gbps", "rounds"}: torch.sum read rate
    # test_end_to_end.py, test_end_to_end_imagen.py: ("sampling" | "train", model) -> {"ratio",
    # "bar", "s_total" (sampling), ...; train: "peak_mib"}
    end_to_end: Dict[tuple, dict] = field(default_factory=dict)
    # test_end_to_end_image_transformer.py: (model, case, peer) -> {"shape", "fast_s", "peer_s",
    # "ratio", "bar" (None: no bar), "note"}; one row each, written by _write_models
    models: Dict[tuple, dict] = field(default_factory=dict)
    # test_in_model.py: case key -> {"label", "block_ratio", "kernel_ratio", "in_block_over_alone", ...}
    in_model: Dict[tuple, dict] = field(default_factory=dict)


SETTINGS_KEY = pytest.StashKey[BenchSettings]()
RESULTS_KEY = pytest.StashKey[BenchResults]()


def _option(config, name, env, cast, default):
    value = config.getoption(name, default=None)  # default=None: tolerates a late-loaded conftest
    if value is None and os.environ.get(env):
        value = cast(os.environ[env])
    return default if value is None else value


def _timing_enabled(config) -> bool:
    if config.getoption("benchmark_disable", default=False):
        return False
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark also disables under xdist
    return not getattr(session, "disabled", False)


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (cgroup/affinity aware)
    except AttributeError:
        return os.cpu_count() or 1


def pytest_configure(config):
    env_threads = os.environ.get("IMGTX_BENCH_THREADS")
    threads = int(env_threads) if env_threads else _default_threads()
    torch.set_num_threads(max(1, threads))

    timing = _timing_enabled(config)
    quick = os.environ.get("IMGTX_BENCH_QUICK", "") not in ("", "0")
    if not timing:
        mode, N, mm = "smoke", SMOKE_N, 256
    elif quick:
        mode, N, mm = "quick", QUICK_N, 2048
    else:
        mode, N, mm = "full", FULL_N, 4096
    config.stash[SETTINGS_KEY] = BenchSettings(
        timing=timing, mode=mode, N=N,
        rounds=max(1, _option(config, "imgtx_rounds", "IMGTX_BENCH_ROUNDS", int, DEFAULT_ROUNDS)),
        max_call_s=_option(config, "imgtx_max_call_s", "IMGTX_BENCH_MAX_CALL_S", float, DEFAULT_MAX_CALL_S),
        threads=torch.get_num_threads(), mm_size=mm)
    config.stash[RESULTS_KEY] = BenchResults()


@pytest.fixture(scope="session")
def bench_settings(pytestconfig) -> BenchSettings:
    return pytestconfig.stash[SETTINGS_KEY]


@pytest.fixture(scope="session")
def bench_results(pytestconfig) -> BenchResults:
    return pytestconfig.stash[RESULTS_KEY]


# ----------------------------------------------------------------------------------- summary

IMPL_ORDER = ("imgtx_fast", "cdist_argmin", "taming_formula", "vqtorch", "faiss_flatl2")  # table columns


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


@pytest.hookimpl(trylast=True)
def _write_in_model(tr, results, settings):
    if not results.in_model:
        return
    from test_in_model import format_rows  # the benchmark module owns its table

    tr.write_sep("-", "imgtx_fast kernels inside model blocks")
    tr.write_line(f"fp32 CPU, threads={settings.threads}, mode={settings.mode}, rounds={settings.rounds}"
                  + ("" if settings.timing else "; smoke: numbers not meaningful, targets not judged"))
    for line in format_rows(results.in_model, judge=settings.timing):
        tr.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    settings = config.stash.get(SETTINGS_KEY, None)
    results = config.stash.get(RESULTS_KEY, None)
    if settings is None or results is None:
        return
    tr = terminalreporter
    _write_diffusion(tr, results, settings)
    _write_attention(tr, results, settings)
    _write_end_to_end(tr, results, settings)
    _write_models(tr, results, settings)
    _write_in_model(tr, results, settings)
    title = "imgtx_fast codebook_lookup summary"
    if not settings.timing:
        tr.write_sep("-", title)
        tr.write_line(f"timings disabled (--benchmark-disable): each benchmark ran once, untimed, "
                      f"at N={settings.N}")
        _write_memory(tr, results)
        return
    _write_gpu(tr, results)
    if not (results.cases or results.ceiling or results.memory or results.interleaved):
        return

    tr.write_sep("-", title)
    tr.write_line(f"fp32 CPU, threads={settings.threads}, mode={settings.mode}, rounds={settings.rounds}; "
                  "cells: median ms (peer/ours: >1x means imgtx_fast is faster)")
    ceiling = results.ceiling["gflops"] if results.ceiling else None
    seen = {i for per in results.cases.values() for i in per}
    impls = [i for i in IMPL_ORDER if i in seen] + sorted(seen - set(IMPL_ORDER))
    header = ["case"] + impls + ["ours GF/s", "mm GF/s"]
    rows = []
    reduced = False
    for (N, K, D) in sorted(results.cases):
        per = results.cases[(N, K, D)]
        ours = per.get("imgtx_fast")
        row = [f"N={N} K={K} D={D}"]
        for impl in impls:
            r = per.get(impl)
            if r is None:
                row.append("-")
                continue
            cell = _fmt_ms(r["median_s"])
            if impl != "imgtx_fast" and ours is not None:
                cell += f" ({r['median_s'] / ours['median_s']:.1f}x)"
            if r["rounds"] < settings.rounds:
                cell += "*"
                reduced = True
            row.append(cell)
        row.append(f"{2 * N * K * D / ours['median_s'] / 1e9:.1f}" if ours else "-")
        row.append(f"{ceiling:.1f}" if ceiling else "-")
        rows.append(row)
    if rows:
        widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
        for r in [header] + rows:
            tr.write_line("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(r, widths))))
    if results.ceiling:
        c = results.ceiling
        tr.write_line(f"mm ceiling: fp32 torch.mm {c['size']}x{c['size']} @ {c['size']}x{c['size']} "
                      f"= {c['gflops']:.1f} GF/s (median)")
    _write_memory(tr, results)
    for (N, K, D), r in sorted(results.interleaved.items()):
        parts = ", ".join(f"{peer} {ratio:.2f}x" for peer, ratio in r["ratios"].items())
        tr.write_line(f"interleaved, median of {r['rounds']} round-robin ratios, N={N} K={K} D={D}: "
                      f"ours {r['ours_ms']:.1f} ms; peer/ours: {parts}")
    if reduced:
        tr.write_line(f"* timed for fewer rounds: its warm-up call took > {settings.max_call_s:g} s")


def _write_diffusion(tr, results, settings):
    if not results.diffusion:
        return
    tr.write_sep("-", "imgtx_fast mask-and-replace diffusion summary")
    tr.write_line(f"CPU fp32, threads={settings.threads}, mode={settings.mode}; median ms, interleaved "
                  "in one run; ratios >1x for peer/ours mean imgtx_fast is faster")
    for (what, (B, K, N)), r in sorted(results.diffusion.items(), key=lambda kv: str(kv[0])):
        case = f"{what:<24} B={B} K={K} N={N}"
        if "mib" in r:
            cells = ", ".join(f"{k} {v:.1f}" for k, v in r["mib"].items())
            tr.write_line(f"{case}: {cells} (inputs {r['input_mib']:.0f} MiB)")
            continue
        ms = ", ".join(f"{k} {v:.1f}" for k, v in r["ms"].items())
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r.get("ratios", {}).items())
        gbs = f", ours {r['ours_GBps']:.1f} GB/s of logits" if "ours_GBps" in r else ""
        tr.write_line(f"{case}: {ms}; {ratios}{gbs}")


def _write_attention(tr, results, settings):
    if not (results.attention or results.attention_ceiling or results.attention_memory):
        return
    tr.write_sep("-", "imgtx_fast attention summary")
    if settings.timing:
        tr.write_line(f"CPU fp32, threads={settings.threads}, mode={settings.mode}; median ms of calls "
                      "timed round-robin in one test, each after an untimed call (none for calls > 1 s); "
                      "ratio = peer median / "
                      "ours median (>1x: imgtx_fast faster); GF/s on visible pairs "
                      "(4*pairs*D per forward, fwd+bwd = 3.5x)")
    else:
        tr.write_line(f"smoke (--benchmark-disable): tiny shapes, each implementation called once, "
                      f"threads={settings.threads}; numbers are not meaningful and targets are not judged")
    header = ["case", "shape", "ours ms", "ours GF/s", "peer", "peer ms", "peer GF/s", "ratio", "target", ""]
    rows = []
    for r in results.attention.values():
        peers = [p for p in r["ms"] if p != "imgtx_fast"] or ["-"]
        for i, peer in enumerate(peers):
            row = [r["label"], r["shape"], f"{r['ms']['imgtx_fast']:.2f}",
                   f"{r['gflops']['imgtx_fast']:.1f}"] if i == 0 else ["", "", "", ""]
            if peer == "-":
                rows.append(row + ["-"] * 6)
                continue
            bar = r["bars"].get(peer)
            ratio = r["ratios"][peer]
            verdict = ("" if bar is None else "-" if not settings.timing
                       else "met" if ratio >= bar else "MISSED")
            rows.append(row + [peer, f"{r['ms'][peer]:.2f}", f"{r['gflops'][peer]:.1f}", f"{ratio:.2f}x",
                               "-" if bar is None else f">={bar:g}x", verdict])
    if rows:
        widths = [max(len(r[c]) for r in rows + [header]) for c in range(len(header))]
        for r in [header] + rows:
            tr.write_line("  ".join(c.ljust(w) if i in (0, 1, 4, 9) else c.rjust(w)
                                    for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if settings.timing:
            rounds = sorted({r["rounds"] for r in results.attention.values()})
            judged = [(r["label"], p, r["ratios"][p], b) for r in results.attention.values()
                      for p, b in r["bars"].items() if p in r["ratios"]]
            missed = [f"{label} vs {p} {ratio:.2f}x < {b:g}x" for label, p, ratio, b in judged if ratio < b]
            tr.write_line(f"targets met: {len(judged) - len(missed)}/{len(judged)}"
                          + (f"; missed: {'; '.join(missed)}" if missed else "")
                          + f"; timed rounds per implementation: {', '.join(map(str, rounds))}")
    c = results.attention_ceiling
    if c:
        tr.write_line(f"mm ceiling: fp32 torch.mm {c['size']}^3 = {c['gflops']:.1f} GF/s "
                      f"(median of {c['rounds']})")
    st = results.attention_stream
    if st:
        reads = "; ".join(f"{r['label']}: " + ", ".join(f"{n} {g:.1f}" for n, g in r["gbps"].items())
                          for r in results.attention.values() if "gbps" in r)
        tr.write_line(f"read ceiling: torch.sum over {st['mib']:.0f} MiB = {st['gbps']:.1f} GB/s "
                      f"(median of {st['rounds']})" + (f"; K+V read rate GB/s, {reads}" if reads else ""))
    for r in results.attention.values():
        if "read_fraction" in r:
            verdict = ("" if not settings.timing else
                       "; no target (several query heads a kv head: more work a byte)"
                       if not r["read_target"] else
                       "; target >=85%: " + ("met" if r["read_fraction"] >= READ_TARGET else "MISSED"))
            tr.write_line(f"{r['label']} {r['shape']}: imgtx_fast reads K+V at "
                          f"{r['gbps']['imgtx_fast']:.1f} GB/s = {100 * r['read_fraction']:.0f}% of "
                          f"torch.sum over the same bytes ({r['read_ceiling_gbps']:.1f} GB/s){verdict}")
    m = results.attention_memory
    if m:
        parts = []
        for impl, v in m["impls"].items():
            extra = (f" (setup keeps {v['setup_resident_mib']:.1f} resident, peaks {v['setup_peak_mib']:.1f}"
                     f"; call {v['call_mib']:.1f})" if v["setup_peak_mib"] >= 0.05 else "")
            parts.append(f"{impl} {v['total_mib']:.1f}{extra}")
        note = "" if m["hwm_reset"] else " (VmHWM not resettable: lower bound)"
        tr.write_line(f"peak extra RSS MiB, local1d {m['shape']} L={m['block']} forward, fresh process each: "
                      + "; ".join(parts) + note)
        tr.write_line(f"  for scale: dense (N, N) bool mask N^2 = {m['dense_mask_mib']:.1f} MiB, one fp32 "
                      f"(B, H, N, N) score tensor = {m['scores_fp32_mib']:.0f} MiB, output "
                      f"{m['output_mib']:.1f} MiB (included in every figure)")


def _write_end_to_end(tr, results, settings):
    if not results.end_to_end:
        return
    tr.write_sep("-", "imgtx_fast end to end summary (VQ-Diffusion, Imagen-style)")
    if settings.timing:
        tr.write_line(f"CPU fp32, threads={settings.threads}, mode={settings.mode}; same weights on the fast "
                      "and the reference backend, timed round-robin in one run; ratio = reference / fast")
    else:
        tr.write_line(f"smoke (--benchmark-disable): tiny configs, each call once, threads={settings.threads}; "
                      "numbers are not meaningful and targets are not judged")

    def verdict(ok):
        return "-" if not settings.timing else "met" if ok else "MISSED"

    judged, missed = 0, []
    for (what, name), r in sorted(results.end_to_end.items()):
        if what == "sampling":
            s = r["s_total"]
            how = ("" if r["timed_steps"] == r["steps"]
                   else f" (x{r['steps'] // r['timed_steps'] if r['steps'] % r['timed_steps'] == 0 else r['steps'] / r['timed_steps']:g}"
                        f" from {r['timed_steps']} timed step{'s' if r['timed_steps'] > 1 else ''})")
            v = verdict(r["ratio"] >= r["bar"])
            tr.write_line(f"sampling {name:<5} {r['shape']}, {r['what']}, {r['steps']} steps{how}: "
                          f"fast {s['fast']:.2f} s, reference {s['reference']:.2f} s, {r['ratio']:.2f}x "
                          f"(target >={r['bar']:g}x {v}; rounds {r['rounds']})")
            judged += 1
            if v == "MISSED":
                missed.append(f"sampling {name} {r['ratio']:.2f}x")
        else:
            if "ms" in r:
                v = verdict(r["ratio"] >= r["bar"])
                tr.write_line(f"train    {name:<5} {r['shape']}, batch {r['batch']}, fwd+bwd: fast "
                              f"{r['ms']['fast']:.1f} ms, reference {r['ms']['reference']:.1f} ms, "
                              f"{r['ratio']:.2f}x (target >={r['bar']:g}x {v}; rounds {r['rounds']})")
                judged += 1
                if v == "MISSED":
                    missed.append(f"train {name} {r['ratio']:.2f}x")
            if "peak_mib" in r:
                p = r["peak_mib"]
                v = verdict(p["fast"] < p["reference"])
                note = "" if r["hwm_reset"] else " (VmHWM not resettable: lower bound)"
                tr.write_line(f"memory   {name:<5} peak extra RSS of one training step (batch {r['mem_batch']}, "
                              f"fresh process each): fast {p['fast']:.1f} MiB, reference "
                              f"{p['reference']:.1f} MiB (target fast < reference {v}){note}")
                judged += 1
                if v == "MISSED":
                    missed.append(f"memory {name}")
    if settings.timing:
        tr.write_line(f"targets met: {judged - len(missed)}/{judged}"
                      + (f"; missed: {'; '.join(missed)}" if missed else ""))


def _write_models(tr, results, settings):
    if not results.models:
        return
    tr.write_sep("-", "imgtx_fast model benchmarks summary")
    tr.write_line(f"CPU fp32, threads={settings.threads}, mode={settings.mode}; same weights on the fast and "
                  "the reference backend, timed round-robin in one run; ratio = peer / fast"
                  + ("" if settings.timing else "; smoke: numbers not meaningful, targets not judged"))
    judged, missed = 0, []
    for (model, case, peer), r in sorted(results.models.items()):
        bar = r.get("bar")
        if bar is None or not settings.timing:
            verdict = "" if bar is None else f" (bar >={bar:g}x -)"
        else:
            ok = r["ratio"] >= bar
            verdict = f" (bar >={bar:g}x {'met' if ok else 'MISSED'})"
            judged += 1
            if not ok:
                missed.append(f"{model} {case} vs {peer} {r['ratio']:.2f}x")
        note = f"; {r['note']}" if r.get("note") else ""
        tr.write_line(f"{model:<24} {case:<11} {r['shape']}: fast {_fmt_s(r['fast_s'])}, {peer} "
                      f"{_fmt_s(r['peer_s'])}, {r['ratio']:.2f}x{verdict}{note}")
    if settings.timing and judged:
        tr.write_line(f"targets met: {judged - len(missed)}/{judged}" + (f"; missed: {'; '.join(missed)}" if missed else ""))


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _write_gpu(tr, results):
    if not results.gpu_cases:
        return
    tr.write_sep("-", "imgtx_fast codebook_lookup GPU summary")
    tr.write_line("cells: median ms (peer/ours: >1x means imgtx_fast is faster); "
                  "TF/s = ours, mm TF/s = torch.mm 8192^3 of the same dtype")
    impls = ("imgtx_fast", "cdist_argmin", "matmul_formula")
    tr.write_line(f"{'case':<30}" + "".join(f"{i:>22}" for i in impls) + f"{'TF/s':>8}{'mm TF/s':>9}")
    for (dtype, N, K, D), per in sorted(results.gpu_cases.items()):
        ours = per.get("imgtx_fast")
        cells = []
        for impl in impls:
            t = per.get(impl)
            cell = "-" if t is None else _fmt_ms(t)
            if t is not None and ours and impl != "imgtx_fast":
                cell += f" ({t / ours:.1f}x)"
            cells.append(f"{cell:>22}")
        tf = f"{2 * N * K * D / ours / 1e12:.1f}" if ours else "-"
        ceil = results.gpu_ceiling.get(dtype)
        tr.write_line(f"{dtype + f' N={N} K={K} D={D}':<30}" + "".join(cells) + f"{tf:>8}"
                      + (f"{ceil:>9.0f}" if ceil else f"{'-':>9}"))


def _write_memory(tr, results):
    m = results.memory
    if not m:
        return
    parts = [f"{impl} {m[f'peak_extra_mib_{impl}']:.1f} MiB (N={m[f'N_{impl}']})"
             for impl in ("imgtx_fast", "cdist_argmin") if f"peak_extra_mib_{impl}" in m]
    note = "" if m.get("hwm_reset", True) else " (VmHWM not resettable: lower bound)"
    tr.write_line(f"peak extra RSS of one call, K={m['K']} D={m['D']}: " + ", ".join(parts) + note)
