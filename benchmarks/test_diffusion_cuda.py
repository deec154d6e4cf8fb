"""Mask-and-replace on the GPU: imgtx_fast vs diffusers' VQDiffusionScheduler.step (and the
pipeline's guidance + truncation sequence) vs one read pass, in one interleaved run.
Marked `gpu`; run by scripts/device_check.sh. The kernels are memory-bound: GB/s of logits
read is reported next to the read pass's."""

import pytest
import torch

from cuda_timing import time_cuda
from imgtx_fast import _C
from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_sample

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and _C.cuda_compiled()),
                       reason="needs a CUDA device and a CUDA build of imgtx_fast"),
]

try:
    from diffusers import VQDiffusionScheduler
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import VQDiffusionPipeline
except Exception:  # pragma: no cover - optional peer
    VQDiffusionScheduler = VQDiffusionPipeline = None

CASES = [(1, 4096, 1024), (4, 4096, 1024), (8, 1024, 256), (32, 4096, 1024)]


@pytest.mark.parametrize("guided", [False, True], ids=["step", "guided_truncated_step"])
def test_gpu_posterior_step(benchmark, bench_results, guided):
    benchmark.group = "diffusion step (GPU)"

    def run_all():
        out = {}
        for (B, K, N) in CASES:
            sched = MaskAndReplaceSchedule(K, 100)
            g = torch.Generator("cuda").manual_seed(0)
            cond = (torch.randn(B, K, N, device="cuda") * 3).log_softmax(1)
            unc = (torch.randn(B, K, N, device="cuda") * 3).log_softmax(1)
            x_t = torch.randint(0, K + 1, (B, N), device="cuda")
            kw = dict(truncation_rate=0.86, guidance_scale=5.0, log_p_x0_uncond=unc) if guided else {}
            ms = {"imgtx_fast": time_cuda(lambda: posterior_sample(cond, x_t, 50, sched, g, **kw)),
                  "read_pass": time_cuda(lambda: cond.amax(1))}
            if VQDiffusionScheduler is not None:
                stock = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=100)
                stock.set_timesteps(100, device="cuda")  # moves its tables to the GPU

                def peer():
                    mo = cond
                    if guided:
                        mo = unc + 5.0 * (cond - unc)
                        mo -= torch.logsumexp(mo, dim=1, keepdim=True)
                        mo = VQDiffusionPipeline.truncate(None, mo, 0.86).clamp(-70)
                    return stock.step(mo, 50, x_t, generator=g).prev_sample
                ms["diffusers"] = time_cuda(peer, rounds=5)
            out[(B, K, N)] = ms
        return out

    results = benchmark.pedantic(run_all, rounds=1, iterations=1, warmup_rounds=0)
    for (B, K, N), ms in results.items():
        ratios = {"ours/read": ms["imgtx_fast"] / ms["read_pass"]}
        if "diffusers" in ms:
            ratios["diffusers/ours"] = ms["diffusers"] / ms["imgtx_fast"]
        gbs = B * K * N * 4 * (2 if guided else 1) / (ms["imgtx_fast"] * 1e-3) / 1e9
        name = "GPU guided+truncated step" if guided else "GPU step"
        bench_results.diffusion[(name, (B, K, N))] = {"ms": ms, "ratios": ratios, "ours_GBps": gbs}
