"""Attention on CUDA tensors.

- Default: the op runs the fp32 plain-PyTorch path on the device; pinned to the CPU kernel.
- IMGTX_FAST_CUDA_ATTENTION=1: the tensor-core kernels (compiled in CI, not yet run on a GPU
  when this file was written): fp16/bf16, head dims 32/64/96/128, every pattern and option, vs
  the float64 reference with tolerances from the dtype (P is rounded to the input dtype before
  the P V product, as in FlashAttention: a few ulp of the output scale).

The kernel tests take `target` and run twice (tests/cuda_targets.py): on a GPU (param `gpu`,
skipped without a CUDA device; run by scripts/device_check.sh) and under the CPU emulator of
the CUDA kernels (param `emulated`: CPU fp16/bf16 tensors inside emulated_cuda() take the
kernels whatever IMGTX_FAST_CUDA_ATTENTION says), with smaller decode cases. The reference
path and graph capture are GPU-only (marked `gpu`).
"""
import pytest
import torch

from attention_helpers import HALF_EPS, gen_for, make_mask, make_qkv, randn
from cuda_targets import EMULATOR_SEED, sized_cases, skip_slow_unless_requested, target  # noqa: F401
from imgtx_fast import Local1d, Local2d, attention
from imgtx_fast.ops.fused_attention import attention_op, cuda_kernels_enabled
from imgtx_fast.reference import attention as ref
from imgtx_fast.testing import emulated_cuda, emulator_available


@pytest.fixture
def cuda_kernels(target, monkeypatch):
    """The target, with the CUDA attention kernels enabled (on a GPU they are opt-in)."""
    if not target.emulated:
        monkeypatch.setenv("IMGTX_FAST_CUDA_ATTENTION", "1")
        if not cuda_kernels_enabled():
            pytest.skip("imgtx_fast was built without CUDA")
    return target


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(pattern=Local1d(16)),
                                dict(pattern=Local2d(6, 10, (2, 5), (2, 3))),
                                dict(key_lengths=torch.tensor([60, 7]))],
                         ids=["dense", "causal", "local1d", "local2d", "key_lengths"])
def test_reference_path_matches_cpu(kw):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 60, 32, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    grad = torch.randn(2, 4, 60, 32, generator=g)
    results = []
    for device in ("cpu", "cuda"):
        dkw = {n: _to(t, device) for n, t in kw.items()}
        leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
        out, lse = attention(*leaves, return_lse=True, **dkw)
        grads = torch.autograd.grad(out, leaves, grad.to(device))
        results.append([t.cpu() for t in (out, lse, *grads)])
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], *results):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)


# name: (B, H, Hkv, Nq, Nk, kw). Tiles of 64 queries x 64 keys; q_len <= 4 takes the decode
# configuration: the query heads of a kv head packed into one CTA and the keys split over
# CTAs (flash-decoding, ~ceil(Nk / 128) splits), then attn_combine_kernel.
CASES = {
    "dense": (2, 4, 4, 100, 100, {}),
    "dense_cross": (2, 4, 2, 77, 300, {}),
    "causal": (2, 4, 4, 130, 130, dict(causal=True)),
    "causal_kv_cache": (1, 8, 2, 37, 200, dict(causal=True)),
    "key_lengths": (3, 2, 2, 64, 77, dict(key_lengths=torch.tensor([77, 20, 0]))),
    "bool_mask": (2, 2, 2, 50, 70, dict(attn_mask="bool")),
    # A mask makes every key block read the block's key indices: with 4 blocks, the next
    # block's indices are written while the last is still read (the loop-end barrier's job).
    "bool_mask_long": (1, 2, 2, 40, 200, dict(attn_mask="bool")),
    "additive_mask": (2, 2, 1, 50, 70, dict(attn_mask="add_q")),
    "local1d": (2, 2, 2, 300, 300, dict(pattern=Local1d(64))),
    "local1d_window": (1, 2, 2, 300, 300, dict(pattern=Local1d(64, False, 17))),
    "local2d": (1, 2, 2, 15 * 17, 15 * 17, dict(pattern=Local2d(15, 17, (4, 5), (2, 3)))),
    "local2d_window": (1, 2, 1, 16 * 16, 16 * 16, dict(pattern=Local2d(16, 16, (8, 16), (8, 16), False))),
    "decode": (4, 8, 2, 1, 1000, dict(causal=True)),
    "decode_chunk": (2, 4, 4, 3, 513, dict(causal=True, key_lengths=torch.tensor([513, 100]))),
    "decode_local2d": (1, 2, 2, 2, 60, dict(pattern=Local2d(6, 10, (2, 5), (2, 3)))),
}
# The emulator's stand-ins where the GPU sizes cost too much there (the decode backward walks
# every key block of every head): still split-K (3 splits, the last one partial) with 4 query
# heads packed per kv head, and a partial last key block.
EMULATED_CASES = {
    "decode": (2, 8, 2, 1, 300, dict(causal=True)),
    "decode_chunk": (2, 4, 4, 3, 257, dict(causal=True, key_lengths=torch.tensor([257, 100]))),
}
SIZES = {name: (case, EMULATED_CASES.get(name, case)) for name, case in CASES.items()}
SPLIT_K = {"decode", "decode_chunk"}  # forward: the split kernel + attn_combine_kernel


def _case(name, D, dtype, target):
    B, H, Hkv, Nq, Nk, kw = target.pick(*SIZES[name])
    gen = gen_for("cuda", name, D, str(dtype))
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, dtype=dtype, gen=gen)
    kw = dict(kw)
    if isinstance(kw.get("attn_mask"), str):
        kw["attn_mask"] = make_mask(kw["attn_mask"], (B, 1, Nq, Nk), gen, dtype)
    return q, k, v, kw, gen


def _double(kw):
    return {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in kw.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("target,name", sized_cases(SIZES), indirect=["target"])
def test_kernel_forward_vs_reference(cuda_kernels, name, D, dtype):
    target = cuda_kernels
    q, k, v, kw, _ = _case(name, D, dtype, target)
    with target.kernels(at_least=2 if name in SPLIT_K else 1):
        out, lse = attention(target.to(q), target.to(k), target.to(v), return_lse=True,
                             **target.to_kw(kw))
    want, want_lse = ref.attention(q.double(), k.double(), v.double(), return_lse=True, **_double(kw))
    eps = HALF_EPS[dtype]
    scale_v = float(v.abs().max())
    torch.testing.assert_close(out.double().cpu(), want, atol=4 * eps * scale_v, rtol=4 * eps)
    torch.testing.assert_close(lse.double().cpu(), want_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("target,name", sized_cases(SIZES), indirect=["target"])
def test_kernel_backward_vs_reference(cuda_kernels, name, D, dtype):
    target = cuda_kernels
    q, k, v, kw, gen = _case(name, D, dtype, target)
    g = randn((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), gen, dtype)
    leaves = [target.to(t).requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, **target.to_kw(kw))
    with target.kernels():
        got = torch.autograd.grad(out, leaves, target.to(g))
    rl = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(ref.attention(*rl, **_double(kw)), rl, g.double())
    eps = HALF_EPS[dtype]
    for name_, a, b in zip("qkv", got, want):
        b = torch.nan_to_num(b)  # rows without a visible key: the reference's 0 * NaN
        torch.testing.assert_close(a.double().cpu(), b, atol=8 * eps * float(b.abs().max()) + 1e-6,
                                   rtol=8 * eps, msg=f"d{name_}")


def test_kernel_unsupported_falls_back(cuda_kernels):
    """fp32, head dims the kernels lack and Dv != D run the fallback (the torch path on a GPU,
    the CPU kernels under the emulator) with the same semantics; under the emulator no CUDA
    kernel may launch (test_kernel_passes_fit_shared_memory_apart: the shared-memory limits)."""
    target = cuda_kernels
    target.expect_launches = False
    gen = gen_for("fallback")
    for dtype, D, Dv in ((torch.float32, 64, 64), (torch.float16, 40, 40), (torch.float16, 64, 32)):
        q, k, v = make_qkv(1, 2, 2, 33, 33, D, Dv, dtype=dtype, gen=gen)
        out = attention(target.to(q), target.to(k), target.to(v), causal=True)
        want = ref.attention(q.double(), k.double(), v.double(), causal=True)
        torch.testing.assert_close(out.double().cpu(), want, atol=1e-2, rtol=1e-2)
        assert target.launches() == 0, (dtype, D, Dv)


# Opt-in shared memory per block of each emulated arch, and per head dim whether the backward
# fits it (the forward always does: 87 KB at D = 128; the backward needs 122 KB there, 98 KB
# at D = 96).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@pytest.mark.emulated
@pytest.mark.skipif(not emulator_available(), reason="needs imgtx_fast._C_simt")
@pytest.mark.parametrize("arch", sorted(SMEM_LIMIT))
@pytest.mark.parametrize("D", [64, 96, 128])
def test_kernel_passes_fit_shared_memory_apart(arch, D):
    """The forward and the backward each take the kernels when their own shared memory fits
    the device: on sm_86/sm_89 a D = 128 forward runs the kernel and its backward falls back
    (the CPU kernels under the emulator), correct both ways."""
    gen = gen_for("smem", arch, D)
    q, k, v = make_qkv(1, 2, 1, 40, 70, D, dtype=torch.float16, gen=gen)
    g = randn((1, 2, 40, D), gen, torch.float16)
    with emulated_cuda(seed=EMULATOR_SEED, arch=arch) as sim:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        before = len(sim.launch_log())
        out = attention(*leaves, causal=True)
        fwd = [r for r in sim.launch_log()[before:] if r["kernel"].startswith("attn_")]
        before = len(sim.launch_log())
        got = torch.autograd.grad(out, leaves, g)
        bwd = [r for r in sim.launch_log()[before:] if r["kernel"].startswith("attn_")]
    assert [r["kernel"].split("<")[0] for r in fwd] == ["attn_fwd_kernel"]
    bwd_fits = arch in (80, 90) or D < 128
    assert bool(bwd) == bwd_fits, [r["kernel"] for r in bwd]
    assert all(r["dynamic_smem"] + r["static_smem"] <= SMEM_LIMIT[arch] for r in fwd + bwd)
    rl = [t.double().requires_grad_() for t in (q, k, v)]
    want = ref.attention(*rl, causal=True)
    want_grads = torch.autograd.grad(want, rl, g.double())
    eps = HALF_EPS[torch.float16]
    torch.testing.assert_close(out.double(), want, atol=4 * eps * float(v.abs().max()), rtol=4 * eps)
    for name, a, b in zip("qkv", got, want_grads):
        torch.testing.assert_close(a.double(), b, atol=8 * eps * float(b.abs().max()) + 1e-6,
                                   rtol=8 * eps, msg=f"d{name}")


@pytest.mark.gpu
def test_kernel_graph_capture(monkeypatch):
    """The launches take the current stream and never sync: a CUDA graph replays them."""
    monkeypatch.setenv("IMGTX_FAST_CUDA_ATTENTION", "1")
    if not cuda_kernels_enabled():
        pytest.skip("imgtx_fast was built without CUDA")
    gen = gen_for("graph")
    q, k, v = (t.cuda() for t in make_qkv(2, 4, 4, 128, 128, 64, dtype=torch.float16, gen=gen))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        attention(q, k, v, causal=True)  # warm-up (allocations) outside the graph
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v, causal=True)
    q.copy_(q * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    want = ref.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)
    torch.testing.assert_close(out.double().cpu(), want, atol=4e-3, rtol=4e-3)


def test_kernel_top_left_offset_and_strided_views(cuda_kernels):
    """attention_op's causal_offset and q/k/v sliced from a fused (B, N, 3, H, D) projection."""
    target = cuda_kernels
    gen = gen_for("strided")
    qkv = target.to(randn((2, 90, 3, 4, 64), gen, torch.float16))
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    with target.kernels():
        out, _ = attention_op(q, k, v, causal_offset=0)
    want = ref.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)
    torch.testing.assert_close(out.double().cpu(), want, atol=4e-3, rtol=4e-3)


def test_kernel_lse_gradient(cuda_kernels):
    """A loss that uses lse: d lse / d s = P folded into the backward's Delta."""
    target = cuda_kernels
    gen = gen_for("cuda_lse_grad")
    q, k, v = make_qkv(2, 4, 2, 70, 90, 64, dtype=torch.float16, gen=gen)
    g, g_lse = randn((2, 4, 70, 64), gen), randn((2, 4, 70), gen)
    leaves = [target.to(t).requires_grad_() for t in (q, k, v)]
    with target.kernels(at_least=2):  # forward and backward
        out, lse = attention(*leaves, causal=True, return_lse=True)
        got = torch.autograd.grad((out.float() * target.to(g)).sum() + (lse * target.to(g_lse)).sum(),
                                  leaves)
    rl = [t.double().requires_grad_() for t in (q, k, v)]
    rout, rlse = ref.attention(*rl, causal=True, return_lse=True)
    want = torch.autograd.grad((rout * g.double()).sum() + (rlse * g_lse.double()).sum(), rl)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=8e-3 * float(b.abs().max()), rtol=8e-3)


def test_kernel_unaligned_rows_and_empty_batches(cuda_kernels):
    """Rows that are not 16-byte aligned take the scalar-load path; a batch with no visible key
    gives exactly 0 and lse = LSE_EMPTY; decode packs several query heads per kv head."""
    target = cuda_kernels
    gen = gen_for("cuda_unaligned")
    base = target.to(randn((2, 8, 3, 65), gen, torch.float16))
    q = base[:, :, :1, 1:].expand(2, 8, 1, 64)         # decode: 1 query, stride-0 rows
    kv = target.to(randn((2, 2, 300, 65), gen, torch.float16))
    k, v = kv[..., 1:], kv[..., :64]
    lengths = target.to(torch.tensor([300, 0]))
    mask = target.to(randn((1, 8, 1, 300), gen, torch.float16))
    with target.kernels():
        out, lse = attention(q, k, v, key_lengths=lengths, attn_mask=mask, return_lse=True)
    want, want_lse = ref.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                   key_lengths=lengths.cpu(), attn_mask=mask.double().cpu(),
                                   return_lse=True)
    torch.testing.assert_close(out.double().cpu(), want, atol=4e-3, rtol=4e-3)
    assert torch.equal(out[1].float().cpu(), torch.zeros(8, 1, 64))
    assert (lse[1] == ref.LSE_EMPTY).all()
    torch.testing.assert_close(lse[0].double().cpu(), want_lse[0], atol=1e-3, rtol=1e-4)


def test_kernel_no_keys(cuda_kernels):
    """No key at all: exact zeros and LSE_EMPTY without a launch (no kernel is needed)."""
    target = cuda_kernels
    target.expect_launches = False
    gen = gen_for("no_keys")
    q = target.to(randn((1, 2, 5, 64), gen, torch.float16))
    k = target.to(randn((1, 2, 0, 64), gen, torch.float16))
    out, lse = attention(q, k, k, return_lse=True)
    assert torch.equal(out.float(), torch.zeros_like(out.float())) and (lse == ref.LSE_EMPTY).all()
