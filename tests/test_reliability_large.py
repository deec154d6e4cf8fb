"""Sizes past 2^31 elements (issue 9): every count, loop bound and output offset must be 64-bit.

Inputs are stride-0 or overlapping views, so their logical size passes 2^31 elements with little
memory behind them; where an output itself passes 2^31 elements it is real memory (~4.3 GB for
the codebook test). All behind the `slow` marker: run with `pytest -m slow`.
"""
import pytest
import torch

from reliability_helpers import skip_slow_unless_requested  # noqa: F401 (autouse fixture)
from imgtx_fast import attention, codebook_lookup
from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_sample, vb_terms
from imgtx_fast.reference import diffusion as ref_diffusion
from imgtx_fast.reference.codebook import codebook_lookup as ref_codebook

pytestmark = pytest.mark.slow
TWO31 = 2**31


def _available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


def test_codebook_output_past_2p31_elements():
    """(R, M, D) = a (M, D) block repeated R times with stride 0: R*M*D > 2^31, and the fp16
    quantized output (R*M*D elements, 4.3 GB) is written at offsets past 2^31."""
    if _available_gib() < 9:
        pytest.skip("needs ~9 GiB of free memory")
    M, D, K = 1024, 256, 16
    R = TWO31 // (M * D) + 1
    g = torch.Generator().manual_seed(0)
    block = torch.randn(M, D, generator=g).half()
    codebook = torch.randn(K, D, generator=g).half()
    z = block[None].expand(R, M, D)
    assert z.numel() > TWO31
    out = codebook_lookup(z, codebook, return_stats=True)
    want_idx, want_q, want_sq, _ = ref_codebook(block, codebook)
    for r in (0, R // 2, R - 1):  # the last block lies past 2^31 elements of the output
        assert torch.equal(out.indices[r], want_idx), r
        assert torch.equal(out.quantized[r], want_q), r
        torch.testing.assert_close(out.sqdist[r], want_sq, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.counts, torch.bincount(want_idx, minlength=K) * R)


def test_attention_keys_past_2p31_elements():
    """Nk * D > 2^31 with stride-0 keys and overlapping values (v[j, d] = buf[j + d]); an
    additive mask lets each query see three keys, the last one at Nk - 1."""
    D = 64
    Nk = TWO31 // D + 9
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 2, D, generator=g)
    k = torch.randn(1, 1, 1, D, generator=g).expand(1, 1, Nk, D)
    buf = torch.randn(Nk + D, generator=g)
    v = buf.as_strided((1, 1, Nk, D), (0, 0, 1, 1))
    assert k.numel() > TWO31
    mask = torch.full((1, 1, 2, Nk), float("-inf"))
    seen = [[5, Nk // 2, Nk - 1], [0, Nk - 2, Nk - 1]]
    for i, keys in enumerate(seen):
        mask[0, 0, i, keys] = 0.0
    out = attention(q, k, v, attn_mask=mask)
    for i, keys in enumerate(seen):  # identical keys: uniform weights over the visible ones
        want = torch.stack([buf[j:j + D] for j in keys]).double().mean(0)
        torch.testing.assert_close(out[0, 0, i].double(), want, rtol=1e-5, atol=1e-5)


def test_diffusion_logits_past_2p31_elements():
    """(1, K, N) logits with K * N > 2^31 (stride 0 over tokens): sampling at t = 0 follows the
    one dominant class in every token, and the per-token loss matches the one-token reference."""
    K, N = 2**16, 2**15 + 3
    sched = MaskAndReplaceSchedule(K, 10)
    g = torch.Generator().manual_seed(2)
    token = torch.randn(1, K, 1, generator=g)
    token[0, K - 7] = 40.0  # p(K - 7) ~ 1
    logits = token.expand(1, K, N)
    assert logits.numel() > TWO31
    x_t = torch.full((1, N), K)
    x_prev = posterior_sample(logits, x_t, 0, sched, torch.Generator().manual_seed(3))
    assert x_prev.eq(K - 7).all()
    x0 = torch.randint(0, K, (1, N), generator=g)
    x0[0, -1] = K - 7
    lv, la = vb_terms(logits, x0, x_t, 0, sched)
    want = -token[0, :, 0].double().log_softmax(0)[x0[0]]
    torch.testing.assert_close(la[0].double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lv, la)  # at t = 0 the vb term is the cross-entropy
    one = ref_diffusion.vb_terms(token, x0[:, -1:], x_t[:, -1:], sched.coefs(0, 1, "cpu"))[1]
    torch.testing.assert_close(la[0, -1].double(), one[0, 0], rtol=2e-5, atol=2e-5)
