"""Attention on CUDA tensors: until the CUDA kernels land (next issue) the op runs the fp32
plain-PyTorch path on the device; these tests pin its results to the CPU kernel's.

Marked `gpu`: skipped without a CUDA device (see conftest.py); run by scripts/device_check.sh.
"""
import pytest
import torch

from imgtx_fast import Local1d, Local2d, attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(pattern=Local1d(16)),
                                dict(pattern=Local2d(6, 10, (2, 5), (2, 3))),
                                dict(key_lengths=torch.tensor([60, 7]))],
                         ids=["dense", "causal", "local1d", "local2d", "key_lengths"])
def test_cuda_matches_cpu_forward_and_backward(kw):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 60, 32, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    grad = torch.randn(2, 4, 60, 32, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        dkw = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        out, lse = attention(*leaves, return_lse=True, **dkw)
        grads = torch.autograd.grad(out, leaves, grad.to(device))
        results.append([t.cpu() for t in (out, lse, *grads)])
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
