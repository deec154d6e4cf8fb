"""Fused attention on the GPU (fp16): imgtx_fast's tensor-core kernels vs torch SDPA (default
backend, and with the dense mask for the patterns), flash-attn / xformers when installed, in one
run. Marked `gpu`; run by scripts/device_check.sh, which prints the table. The kernels are
opt-in until verified (IMGTX_FAST_CUDA_ATTENTION=1, set here).

Targets on an H100: dense forward >= 0.7x SDPA's default backend; local 1D and 2D >= 4x
SDPA with the dense mask. TFLOP/s counts visible (query, key) pairs: 4 * pairs * D forward,
3.5x that for forward + backward."""

import pytest
import torch
import torch.nn.functional as F

from cuda_timing import time_cuda
from imgtx_fast import Local1d, Local2d, _C, attention
from imgtx_fast.reference.attention import visible_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and _C.cuda_compiled()),
                       reason="needs a CUDA device and a CUDA build of imgtx_fast"),
]

try:
    from flash_attn import flash_attn_func
except Exception:  # pragma: no cover - optional peer
    flash_attn_func = None

B, H, N, D = 4, 16, 4096, 64
CASES = {  # id: (kwargs of ours, bar vs SDPA default, bar vs SDPA with the dense mask)
    "dense": (dict(), 0.7, None),
    "causal": (dict(causal=True), None, None),
    "local1d": (dict(pattern=Local1d(256)), None, 4.0),
    "local2d": (dict(pattern=Local2d(64, 64, (8, 16), (8, 16))), None, 4.0),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_attention(benchmark, bench_results, case, backward, monkeypatch):
    monkeypatch.setenv("IMGTX_FAST_CUDA_ATTENTION", "1")
    kw, bar_default, bar_mask = CASES[case]
    if backward and case not in ("dense", "causal"):
        pytest.skip("forward + backward is benchmarked for dense and causal")
    benchmark.group = "attention (GPU)"
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16, generator=g)
               for _ in range(3))
    mask = visible_mask(N, N, causal=kw.get("causal", False), pattern=kw.get("pattern"), device="cuda")
    pairs = int(mask.sum()) * B * H
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]

    def run(fn):
        def call():
            out = fn(*leaves)
            if backward:
                torch.autograd.grad(out, leaves, grad)
        return call

    impls = {"imgtx_fast": run(lambda q_, k_, v_: attention(q_, k_, v_, **kw))}
    if case in ("dense", "causal"):
        impls["sdpa"] = run(lambda q_, k_, v_: F.scaled_dot_product_attention(
            q_, k_, v_, is_causal=case == "causal"))
        if flash_attn_func is not None:
            impls["flash_attn"] = run(lambda q_, k_, v_: flash_attn_func(
                q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                causal=case == "causal"))
    impls["sdpa_dense_mask"] = run(lambda q_, k_, v_: F.scaled_dot_product_attention(
        q_, k_, v_, attn_mask=mask))
    ms = benchmark.pedantic(lambda: {n: time_cuda(f) for n, f in impls.items()},
                            rounds=1, iterations=1, warmup_rounds=0)
    flop = 4 * pairs * D * (3.5 if backward else 1.0)
    tflops = {n: flop / (t * 1e-3) / 1e12 for n, t in ms.items()}
    ratios = {n: t / ms["imgtx_fast"] for n, t in ms.items() if n != "imgtx_fast"}
    bars = {}
    if bar_default and not backward:
        bars["sdpa"] = bar_default
    if bar_mask and not backward:
        bars["sdpa_dense_mask"] = bar_mask
    record = {"ms": ms, "tflops": tflops, "ratios": ratios, "bars": bars,
              "device": torch.cuda.get_device_name()}
    bench_results.attention[f"gpu {case} {'fwd+bwd' if backward else 'fwd'}"] = {
        "label": f"GPU {case} {'fwd+bwd' if backward else 'fwd'} fp16", "shape": f"({B},{H},{N},{D})",
        "D": D, "rounds": 20, "mode": "gpu", "ms": ms, "gflops": {n: t * 1e3 for n, t in tflops.items()},
        "ratios": ratios, "bars": bars}
    benchmark.extra_info.update(record)
