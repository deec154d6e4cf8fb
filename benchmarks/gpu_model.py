"""A GPU cost model of imgtx_fast's CUDA kernels, built from what the kernels actually do.

This is a MODEL, never a measurement. Each shape of the GPU benchmarks (benchmarks/test_*_cuda.py)
runs under the CUDA emulator (imgtx_fast.testing.emulated_cuda) with a random sample of each
launch's blocks; the emulator counts, per launch, the global bytes the kernel code loads and
stores, shared-memory bytes, mma instructions and barriers, and the launch configuration. With
registers per thread from ptxas (the real nvcc build, when nvcc is available), the model gives
for an H100 SXM (132 SMs, 228 KB shared memory and 64K registers per SM, 3.35 TB/s HBM3,
989 TFLOP/s dense fp16/bf16, 495 tf32, 67 fp32):
- occupancy (blocks per SM) and waves; the share of SMs idle in the last wave;
- the roofline time of the op: max(minimum bytes / bandwidth, useful FLOPs / peak);
- the bytes the kernels request over the minimum the op must move (re-reads of K/V per query
  tile, of codes per row tile: on a GPU most are L2 hits, so this bounds HBM traffic from above);
- a model time: max(minimum bytes / HBM bandwidth, requested bytes / L2 bandwidth (assumed
  5.5 TB/s), issued mma FLOPs / peak) -- no latency, no bank conflicts, perfect overlap;
- published figures of the peers for the same shapes where they exist.

    python benchmarks/gpu_model.py [--family attention|codebook|diffusion] [--sample-blocks N]
"""
import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Device:
    name: str = "H100 SXM"
    sms: int = 132
    smem_per_sm: int = 228 * 1024
    smem_reserved_per_block: int = 1024
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    hbm_bytes_per_s: float = 3.35e12
    # L2 read bandwidth: an assumption (microbenchmarks of H100 report about 5.5 TB/s); the
    # bytes the kernels request beyond the op's minimum are re-reads that mostly hit L2.
    l2_bytes_per_s: float = 5.5e12
    peak: Dict[str, float] = field(default_factory=lambda: {
        "fp16": 989e12, "bf16": 989e12, "tf32": 495e12, "fp32": 67e12})


H100 = Device()


def blocks_per_sm(dev: Device, threads: int, regs: Optional[int], smem: int) -> int:
    """Resident blocks per SM: limited by threads, registers (allocated per warp in units of
    256), shared memory (plus the 1 KB the hardware reserves per block) and 32 blocks."""
    warps = math.ceil(threads / 32)
    limit = min(dev.blocks_per_sm, dev.threads_per_sm // (warps * 32))
    if regs:
        per_warp = math.ceil(regs * 32 / 256) * 256
        limit = min(limit, dev.regs_per_sm // (per_warp * warps))
    if smem:
        limit = min(limit, dev.smem_per_sm // (smem + dev.smem_reserved_per_block))
    return max(limit, 0)


# ---- registers per thread from ptxas ------------------------------------------------------
_PTXAS_CACHE: Dict[str, Dict[str, int]] = {}


def ptxas_registers(source: str, arch: str = "sm_90a") -> Dict[str, int]:
    """{kernel base name: max registers per thread over its instantiations} for one .cu file,
    from `nvcc -Xptxas -v` (empty without nvcc)."""
    key = f"{source}:{arch}"
    if key in _PTXAS_CACHE:
        return _PTXAS_CACHE[key]
    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME") and str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    out: Dict[str, int] = {}
    if nvcc and Path(nvcc).exists():
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-arch={arch}", "-Xptxas", "-v",
                 f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", "-c", str(ROOT / source),
                 "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True)
        entry = None
        demangle = shutil.which("c++filt")
        for line in done.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\S+)'", line)
            if m:
                entry = m.group(1)
                if demangle:
                    entry = subprocess.run([demangle, entry], capture_output=True, text=True).stdout.strip()
                continue
            m = re.search(r"Used (\d+) registers", line)
            if m and entry:
                base = re.sub(r"<.*", "", entry).split("::")[-1].split("(")[0]
                out[base] = max(out.get(base, 0), int(m.group(1)))
                entry = None
    _PTXAS_CACHE[key] = out
    return out


def kernel_base(name: str) -> str:
    return re.sub(r"<.*", "", name).strip()


# ---- the cases: every shape of the GPU benchmarks ----------------------------------------
@dataclass
class Case:
    family: str
    label: str
    run: Callable[[], None]           # runs the op (under the emulator)
    min_bytes: float                  # what the op must read and write at least
    flops: float                      # useful FLOPs
    precision: str                    # which peak bounds the math
    sources: List[str]                # .cu files whose kernels it launches (for ptxas)
    peers: Dict[str, float] = field(default_factory=dict)  # name -> seconds (published or modeled)
    # Run every block: later kernels read indices the earlier ones write (a sampled run would
    # leave them garbage and could send a kernel out of bounds).
    all_blocks: bool = False


def attention_cases() -> List[Case]:
    from imgtx_fast import Local1d, Local2d, attention
    from imgtx_fast.reference.attention import visible_mask

    B, H, N, D = 4, 16, 4096, 64  # benchmarks/test_attention_cuda.py
    elt = 2
    patterns = {"dense": {}, "causal": dict(causal=True), "local1d": dict(pattern=Local1d(256)),
                "local2d": dict(pattern=Local2d(64, 64, (8, 16), (8, 16)))}
    # FlashAttention-3 paper (Shah et al. 2024), H100 SXM5 fp16, seqlen 4k, head dim 64
    # (batch x seqlen = 16k, hidden 2048): TFLOP/s of FlashAttention-2 and cuDNN; the backward
    # figures (their Fig. 6) are converted with the paper's 2.5x-forward FLOP count into a
    # fwd+bwd time below (forward time + backward time).
    published = {("dense", False): {"FlashAttention-2": 321, "cuDNN": 408},
                 ("causal", False): {"FlashAttention-2": 284, "cuDNN": 363},
                 ("dense", True): {"FlashAttention-2": 279, "cuDNN": 417}}
    cases = []
    for name, kw in patterns.items():
        pairs = int(visible_mask(N, N, causal=kw.get("causal", False), pattern=kw.get("pattern")).sum()) * B * H
        for backward in (False, True):
            if backward and name not in ("dense", "causal"):
                continue
            fwd_flops = 4.0 * pairs * D

            def run(kw=kw, backward=backward):
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(B, H, N, D, generator=g).half().requires_grad_(backward)
                           for _ in range(3))
                out = attention(q, k, v, **kw)
                if backward:
                    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

            # fwd+bwd as the GPU benchmark times it (autograd runs the forward too): FLOPs 3.5x
            # the forward's; bytes: q k v o (forward) + q k v o do dq dk dv (backward) + lse.
            flops = fwd_flops * (3.5 if backward else 1.0)
            tensors = 12 if backward else 4
            if backward:
                peers = {p: fwd_flops / (published[(name, False)][p] * 1e12)
                         + 2.5 * fwd_flops / (t * 1e12)
                         for p, t in published.get((name, True), {}).items()}
            else:
                peers = {p: flops / (t * 1e12) for p, t in published.get((name, False), {}).items()}
            sources = ["csrc/attention/cuda/fwd_hdim64_fp16.cu", "csrc/attention/attention_cuda.cu"]
            if backward:
                sources.append("csrc/attention/cuda/bwd_hdim64_fp16.cu")
            cases.append(Case(
                "attention", f"{name} {'fwd+bwd' if backward else 'fwd'} ({B},{H},{N},{D}) fp16", run,
                tensors * B * H * N * D * elt + B * H * N * 4 * (3 if backward else 1), flops, "fp16",
                sources, peers))
    return cases


def codebook_cases() -> List[Case]:
    from imgtx_fast import codebook_lookup

    # The GPU benchmark's N = 65536 rows, scaled down to 4096 so every block can be emulated
    # (its finalize reads the indices the score pass writes): the plan then splits the codes
    # over 16 blocks per row tile instead of 1, which re-reads z 16 times (a few % of the bytes).
    N = 4096
    cases = []
    for dtype, elt in ((torch.float32, 4), (torch.bfloat16, 2)):
        for K in (8192, 16384):
            for D in (64, 256):
                def run(dtype=dtype, K=K, D=D):
                    g = torch.Generator().manual_seed(0)
                    z = torch.randn(N, D, generator=g).to(dtype)
                    c = torch.randn(K, D, generator=g).to(dtype)
                    codebook_lookup(z, c, return_stats=True)

                flops = 2.0 * N * K * D
                min_bytes = (N * D + K * D) * elt + N * D * elt + N * (8 + 4) + K * 8
                # The peer users run: a cuBLAS GEMM (tf32 tensor cores) writing the N x K scores,
                # then an argmin pass reading them: its roofline (a model too).
                peer = max(flops / H100.peak["tf32"], (min_bytes + 8.0 * N * K) / H100.hbm_bytes_per_s)
                cases.append(Case("codebook", f"N={N} K={K} D={D} {str(dtype)[6:]}", run, min_bytes, flops,
                                  "tf32", ["csrc/codebook/codebook_cuda.cu"],
                                  {"cuBLAS GEMM + argmin (roofline)": peer}, all_blocks=True))
    return cases


def diffusion_cases() -> List[Case]:
    from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_sample

    cases = []
    for B, K, N in [(1, 4096, 1024), (4, 4096, 1024), (8, 1024, 256), (32, 4096, 1024)]:
        for guided in (False, True):
            def run(B=B, K=K, N=N, guided=guided):
                g = torch.Generator().manual_seed(0)
                sched = MaskAndReplaceSchedule(K, 100)
                logp = torch.randn(B, K, N, generator=g)
                unc = torch.randn(B, K, N, generator=g) if guided else None
                x_t = torch.randint(0, K + 1, (B, N), generator=g)
                posterior_sample(logp, x_t, 50, sched, g, logits=True,
                                 truncation_rate=0.86 if guided else None,
                                 guidance_scale=5.0 if guided else None, log_p_x0_uncond=unc)

            reads = B * K * N * 4 * (2 if guided else 1)
            cases.append(Case("diffusion", f"({B},{K},{N}) {'guided+truncated' if guided else 'plain'} step",
                              run, reads + 16.0 * B * N, 0.0, "fp32", ["csrc/diffusion/diffusion_cuda.cu"]))
    return cases


FAMILIES = {"attention": attention_cases, "codebook": codebook_cases, "diffusion": diffusion_cases}


# ---- the model ------------------------------------------------------------------------------
def model_case(case: Case, sample_blocks: int, dev: Device = H100, with_ptxas: bool = True) -> dict:
    from imgtx_fast.testing import emulated_cuda

    regs: Dict[str, int] = {}
    if with_ptxas:
        for src in case.sources:
            regs.update(ptxas_registers(src))
    t0 = time.time()
    with emulated_cuda(seed=0, arch=90, sample_blocks=0 if case.all_blocks else sample_blocks) as sim:
        sim.clear_launch_log()
        case.run()
        log = sim.launch_log()
    launches = []
    total_bytes = total_smem = mma = 0.0
    busy = 0.0
    for r in log:
        threads = r["block"][0] * r["block"][1] * r["block"][2]
        smem = r["dynamic_smem"] + r["static_smem"]
        reg = regs.get(kernel_base(r["kernel"]))
        per_sm = blocks_per_sm(dev, threads, reg, smem)
        slots = per_sm * dev.sms
        waves = r["blocks_total"] / slots if slots else float("inf")
        idle = 1.0 - waves / math.ceil(waves) if waves not in (0, float("inf")) else 0.0
        nbytes = r["global_bytes_loaded"] + r["global_bytes_stored"]
        total_bytes += nbytes
        total_smem += r["shared_bytes_loaded"] + r["shared_bytes_stored"]
        mma += r["mma"]
        launches.append(dict(kernel=kernel_base(r["kernel"]), blocks=r["blocks_total"],
                             sampled=r["blocks_run"], threads=threads, smem=smem, regs=reg,
                             blocks_per_sm=per_sm, waves=waves, idle_last_wave=idle, bytes=nbytes,
                             mma=r["mma"]))
    peak = dev.peak[case.precision]
    roofline = max(case.min_bytes / dev.hbm_bytes_per_s, case.flops / peak)
    mma_flops = mma * 4096.0 if case.precision in ("fp16", "bf16") else mma * 2048.0
    # HBM moves at least the op's minimum; everything the kernels request goes through L2; the
    # tensor cores execute every issued mma (padding included), else the useful FLOPs.
    modeled = max(case.min_bytes / dev.hbm_bytes_per_s, total_bytes / dev.l2_bytes_per_s,
                  mma_flops / peak if mma_flops else case.flops / peak)
    return dict(case=case, launches=launches, bytes=total_bytes, bytes_ratio=total_bytes / case.min_bytes,
                smem_bytes=total_smem, mma_flops=mma_flops, roofline_s=roofline, model_s=modeled,
                emulation_s=time.time() - t0)


def markdown(results: List[dict]) -> str:
    lines = ["| case | kernel | blocks | threads | regs | smem KB | blocks/SM | waves | idle SMs, last wave |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for l in r["launches"]:
            lines.append(f"| {r['case'].family} {r['case'].label} | `{l['kernel']}` | {l['blocks']} | {l['threads']} | "
                         f"{l['regs'] if l['regs'] else '?'} | {l['smem'] / 1024:.1f} | {l['blocks_per_sm']} | "
                         f"{l['waves']:.2f} | {100 * l['idle_last_wave']:.0f}% |")
    lines += ["", "| case | roofline (min bytes, useful FLOPs) | bytes requested / minimum | model time | peers |",
              "| --- | ---: | ---: | ---: | --- |"]
    for r in results:
        c = r["case"]
        peers = "; ".join(f"{n}: {t * 1e6:.0f} us" for n, t in c.peers.items()) or "-"
        lines.append(f"| {c.family} {c.label} | {r['roofline_s'] * 1e6:.0f} us | {r['bytes_ratio']:.2f}x | "
                     f"{r['model_s'] * 1e6:.0f} us | {peers} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="GPU cost model (a model, not a measurement)")
    ap.add_argument("--family", choices=sorted(FAMILIES), action="append")
    ap.add_argument("--sample-blocks", type=int, default=8, help="blocks emulated per launch")
    ap.add_argument("--only", default="", help="cases whose label contains this")
    ap.add_argument("--no-ptxas", action="store_true", help="skip the nvcc register report")
    args = ap.parse_args(argv)
    results = []
    for fam in args.family or sorted(FAMILIES):
        for case in FAMILIES[fam]():
            if args.only and args.only not in case.label:
                continue
            r = model_case(case, args.sample_blocks, with_ptxas=not args.no_ptxas)
            print(f"# {fam} {case.label}: emulated in {r['emulation_s']:.1f} s", file=sys.stderr, flush=True)
            results.append(r)
    print(f"GPU cost model ({H100.name}): a model from emulated counts, not a measurement\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
