"""Bad-input corpus for every public op (issue 9): each case raises a clear Python exception
whose message names the offending argument, or gives a documented result that is asserted.

This file adds the cases the per-op suites (test_codebook.py, test_attention.py,
test_diffusion_api.py) do not have: meta / sparse tensors, non-finite values, empty tensors,
sizes past 2^31 elements (stride-0 views or checks that fire before any allocation), odd
argument types, and misaligned or overlapping input views. No op takes an `out=` argument:
outputs are always freshly allocated, so overlapping outputs cannot arise.
"""
import math

import pytest
import torch

from imgtx_fast import attention, codebook_lookup
from imgtx_fast.diffusion import (MaskAndReplaceSchedule, posterior_log_probs, posterior_sample,
                                  q_sample, vb_loss)
from imgtx_fast.ops.fused_attention import attention_op
from imgtx_fast.patterns import Local1d
from imgtx_fast.reference import attention as ref_attention
from imgtx_fast.reference.codebook import codebook_lookup as ref_codebook

BIG = 2**31 + 1  # one past 32-bit indexing
NAN, INF = math.nan, math.inf


def _huge(*shape, dtype=torch.float32):
    """A stride-0 view with the given (huge) shape: no memory behind it."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


def _run(case):
    _, fn, exc, match = case
    with pytest.raises(exc, match=match):
        fn()


# ---- codebook_lookup -------------------------------------------------------------------------
def _codebook_cases():
    g = torch.Generator().manual_seed(9)
    z, c = torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    L = codebook_lookup
    return [
        ("codebook_meta", lambda: L(z, c.to("meta")), ValueError, r"z and codebook must be on the same device"),
        ("z_sparse", lambda: L(z.to_sparse(), c), TypeError, r"z must be a dense \(strided\) tensor"),
        ("codebook_sparse", lambda: L(z, c.to_sparse()), TypeError, r"codebook must be a dense"),
        ("z_complex", lambda: L(z.to(torch.complex64), c), TypeError, r"z must be float32"),
        ("z_int8", lambda: L(z.to(torch.int8), c), TypeError, r"z must be float32"),
        ("codebook_float64", lambda: L(z, c.double()), TypeError, r"codebook must be float32"),
        ("codebook_3d", lambda: L(z, c[None]), ValueError, r"codebook must be 2-D"),
        ("codebook_0d", lambda: L(z, torch.tensor(1.0)), ValueError, r"codebook must be 2-D"),
        ("codebook_D0", lambda: L(z[:, :0], c[:, :0]), ValueError, r"codebook has D = 0"),
        ("z_wrong_D", lambda: L(z[:, :7], c), ValueError, r"z must have shape \(\.\.\., D\) with D = 8"),
        ("z_0d", lambda: L(torch.tensor(1.0), c), ValueError, r"z must have shape"),
        ("z_none", lambda: L(None, c), TypeError, r"z must be a torch\.Tensor"),
        ("codebook_list", lambda: L(z, c.tolist()), TypeError, r"codebook must be a torch\.Tensor"),
        ("metric_none", lambda: L(z, c, metric=None), ValueError, r"metric must be 'l2' or 'cosine'"),
        ("metric_list", lambda: L(z, c, metric=["l2"]), ValueError, r"metric must be 'l2' or 'cosine'"),
        ("metric_case", lambda: L(z, c, metric="L2"), ValueError, r"metric"),
        # past 2^31: rejected before anything is allocated
        ("codebook_K_2p31", lambda: L(z[:, :2], _huge(2**31, 2)), ValueError, r"codebook has 2147483648 codes"),
        ("z_huge_wrong_D", lambda: L(_huge(BIG, 7), c), ValueError, r"z must have shape .* D = 8"),
        ("z_huge_float64", lambda: L(_huge(BIG, 8, dtype=torch.float64), c), TypeError, r"z must be float32"),
        ("raw_op_metric", lambda: torch.ops.imgtx.codebook_lookup(z, c, "l1"), ValueError, r"metric"),
        ("raw_op_codebook_1d", lambda: torch.ops.imgtx.codebook_lookup(z, c[0], "l2"), ValueError,
         r"codebook must be 2-D"),
    ]


@pytest.mark.parametrize("case", _codebook_cases(), ids=lambda c: c[0])
def test_codebook_bad_input(case):
    _run(case)


def test_codebook_non_finite_and_extreme_values_documented():
    """Documented (imgtx/codebook.h): a row of z with NaN/Inf gets index 0; a code with NaN/Inf
    is never chosen; with no finite code every row gets index 0; distances past float32 range
    are +inf in sqdist, never NaN, while the index stays the float64 argmin."""
    g = torch.Generator().manual_seed(1)
    c = torch.randn(6, 4, generator=g)
    for metric in ("l2", "cosine"):
        z = torch.randn(5, 4, generator=g)
        z[0, 0], z[1, 1], z[2, 2] = NAN, INF, -INF
        out = codebook_lookup(z, c, metric=metric, return_stats=True)
        assert out.indices[:3].tolist() == [0, 0, 0]
        assert torch.equal(out.indices, ref_codebook(z, c, metric)[0])
    half = torch.randn(3, 4, generator=g).half()
    half[1, 3] = INF
    assert codebook_lookup(half, c.half())[0][1] == 0
    bad = c.clone()
    bad[:, 0] = NAN  # every code has a NaN
    assert codebook_lookup(torch.randn(3, 4, generator=g), bad)[0].eq(0).all()
    big_z, big_c = torch.randn(4, 4, generator=g) * 1e30, torch.randn(6, 4, generator=g) * 1e30
    out = codebook_lookup(big_z, big_c, return_stats=True)
    assert torch.equal(out.indices, ref_codebook(big_z, big_c)[0])
    assert torch.isinf(out.sqdist).all() and not torch.isnan(out.sqdist).any()


def test_codebook_empty_misaligned_and_overlapping_views():
    """Empty leading dims give empty outputs and zero counts; fp16 data one element off its
    allocation's alignment and overlapping rows (as_strided) are read like a contiguous copy."""
    g = torch.Generator().manual_seed(2)
    c = torch.randn(7, 6, generator=g)
    out = codebook_lookup(torch.randn(0, 3, 6), c, return_stats=True)
    assert out.indices.shape == (0, 3) and out.counts.eq(0).all() and out.counts.shape == (7,)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base = torch.randn(1 + 9 * 6, generator=g).to(dtype)
        z = base[1:].view(9, 6)  # data_ptr one element past the allocation start
        overl = base.as_strided((12, 6), (3, 1))  # rows overlap by half
        for view in (z, overl):
            got = codebook_lookup(view, c.to(dtype), return_stats=True)
            want = codebook_lookup(view.contiguous(), c.to(dtype), return_stats=True)
            for a, b in zip(got, want):
                assert torch.equal(a, b)


# ---- attention -------------------------------------------------------------------------------
def _attention_cases():
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    A, O = attention, attention_op
    meta = [t.to("meta") for t in (q, k, v)]
    return [
        ("q_meta", lambda: A(meta[0], k, v), ValueError, r"q, k and v must be on one device"),
        ("q_sparse", lambda: A(q.to_sparse(), k, v), TypeError, r"q must be a dense \(strided\) tensor"),
        ("v_sparse", lambda: A(q, k, v.to_sparse()), TypeError, r"v must be a dense"),
        ("q_complex", lambda: A(q.to(torch.complex64), k, v), TypeError, r"q must be float32"),
        ("k_int", lambda: A(q, k.int(), v), TypeError, r"k must be float32"),
        ("q_2d", lambda: A(q[0, 0], k, v), ValueError, r"q must be 4-D"),
        ("heads_zero", lambda: A(q[:, :0], k[:, :0], v[:, :0]), ValueError, r"k/v heads \(0\) must divide"),
        ("mask_sparse", lambda: A(q, k, v, attn_mask=torch.zeros(5, 6).to_sparse()), TypeError,
         r"attn_mask must be a dense"),
        ("mask_meta_bool", lambda: A(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool, device="meta")),
         ValueError, r"attn_mask is on meta"),
        ("mask_complex", lambda: A(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.complex64)), TypeError,
         r"attn_mask must be float32"),
        ("lengths_meta", lambda: A(q, k, v, key_lengths=torch.tensor([6, 3], device="meta")), ValueError,
         r"key_lengths is on meta"),
        ("lengths_uint8", lambda: A(q, k, v, key_lengths=torch.tensor([6, 3], dtype=torch.uint8)), TypeError,
         r"key_lengths must be an int32/int64"),
        ("lengths_2p40", lambda: A(q, k, v, key_lengths=torch.tensor([2**40, 3])), ValueError,
         r"key_lengths must be in \[0, 6\]"),
        ("lengths_int32_negative", lambda: A(q, k, v, key_lengths=torch.tensor([-2, 3], dtype=torch.int32)),
         ValueError, r"key_lengths must be in \[0, 6\]"),
        ("scale_nan", lambda: A(q, k, v, scale=NAN), ValueError, r"scale is NaN"),
        ("scale_complex", lambda: A(q, k, v, scale=1j), TypeError, r"scale must be a float"),
        ("causal_offset_float", lambda: O(q, k, v, causal_offset=1.5), TypeError, r"causal_offset must be an int"),
        ("causal_offset_bool", lambda: O(q, k, v, causal_offset=True), TypeError, r"causal_offset must be an int"),
        ("pattern_with_offset", lambda: O(q, k, v, causal_offset=1, pattern=Local1d(2)), ValueError,
         r"pattern carries its own causality"),
        # past 2^31 elements: head dims and batch mismatches are caught before any allocation
        ("D_2p31", lambda: A(_huge(1, 1, 2, BIG), _huge(1, 1, 2, BIG), _huge(1, 1, 2, 4)), ValueError,
         r"q/k head dim must be in \[1, 256\]"),
        ("Nk_huge_batch", lambda: A(q, _huge(3, 2, BIG, 8), _huge(3, 2, BIG, 8)), ValueError,
         r"batch sizes differ"),
        ("Nk_huge_kv_mismatch", lambda: A(q, _huge(2, 2, BIG, 8), _huge(2, 2, BIG - 1, 8)), ValueError,
         r"k and v must have the same"),
        ("Nq_2p31", lambda: A(_huge(1, 1, BIG, 8), _huge(1, 1, BIG, 8), _huge(1, 1, BIG, 8)), ValueError,
         r"q sequence length must be < 2\^31"),
        ("mask_huge_shape", lambda: A(q, k, v, attn_mask=_huge(BIG, 6, dtype=torch.bool)), ValueError,
         r"attn_mask of shape \(2147483649, 6\)"),
        # broadcasting the other way (the mask's 5 queries onto q's 1) is no broadcast to q
        ("mask_wider_than_q", lambda: A(q[:, :, :1], k, v, attn_mask=torch.zeros(5, 6)), ValueError,
         r"attn_mask of shape \(5, 6\) does not broadcast"),
    ]


@pytest.mark.parametrize("case", _attention_cases(), ids=lambda c: c[0])
def test_attention_bad_input(case):
    _run(case)


def test_attention_non_finite_values_documented():
    """Documented: a logit that is NaN, or +inf next to another non-finite logit, makes its row
    NaN (as in softmax); a logit of -inf hides its key like a -inf mask entry, so a row whose
    logits are all -inf sees no key: exactly 0 with lse == LSE_EMPTY. A +inf additive mask entry
    makes its row NaN; scale=inf gives NaN rows, scale=0 the mean of v."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    k[0, 0, :, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0])  # head 0: logits +inf and -inf
    k[0, 1, :, 0] = -1.0  # head 1: every logit -inf
    qn = q.clone()
    qn[0, :, 2, 0] = INF
    out, lse = attention(qn, k, v, return_lse=True)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isnan(lse[0, 0, 2])
    assert out[0, 1, 2].eq(0).all() and lse[0, 1, 2] == ref_attention.LSE_EMPTY
    keep = torch.tensor([0, 1, 3])
    assert torch.equal(out[:, :, keep], attention(q, k, v)[:, :, keep])
    kn = k.clone()
    kn[0, 0, 3, 5] = NAN
    out = attention(q, kn, v)
    assert torch.isnan(out[0, 0]).all() and not torch.isnan(out[0, 1]).any()
    mask = torch.zeros(4, 4)
    mask[1, 2] = INF
    out = attention(q, k, v, attn_mask=mask)
    assert torch.isnan(out[:, :, 1]).all() and not torch.isnan(out[:, :, [0, 2, 3]]).any()
    out, lse = attention(q, k, v, attn_mask=torch.full((4, 4), -INF), return_lse=True)
    assert out.eq(0).all() and lse.eq(ref_attention.LSE_EMPTY).all()
    assert torch.isnan(attention(q, k, v, scale=INF)).all()
    torch.testing.assert_close(attention(q, k, v, scale=0.0), v.mean(2, keepdim=True).expand_as(q))


def test_attention_empty_misaligned_and_overlapping_views():
    """Empty batch/queries/keys give empty or zero outputs; half data one element off its
    alignment and overlapping key rows (as_strided) match a contiguous copy bit for bit."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    assert attention(q[:0], k[:0], v[:0]).shape == (0, 2, 5, 8)
    assert attention(q[:, :, :0], k, v).shape == (2, 2, 0, 8)
    out, lse = attention(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert out.eq(0).all() and lse.eq(ref_attention.LSE_EMPTY).all()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base = torch.randn(1 + 2 * 2 * 9 * 8, generator=g).to(dtype)
        qm = base[1:1 + 2 * 2 * 5 * 8].view(2, 2, 5, 8)  # one element off
        ko = base.as_strided((2, 2, 9, 8), (2 * 9 * 8, 9 * 8, 4, 1))  # rows overlap by half
        vo = ko.flip(2)  # negative stride on the key axis
        got = attention(qm, ko, vo, causal=True)
        want = attention(qm.contiguous(), ko.contiguous(), vo.contiguous(), causal=True)
        assert torch.equal(got, want), dtype


# ---- discrete diffusion ----------------------------------------------------------------------
K, T = 6, 10


def _sampling_cases(fn):
    g = torch.Generator().manual_seed(9)
    S = MaskAndReplaceSchedule(K, T)
    logp = torch.randn(2, K, 5, generator=g).log_softmax(1)
    x_t = torch.randint(0, K + 1, (2, 5), generator=g)
    return [
        ("logp_meta", lambda: fn(logp.to("meta"), x_t.to("meta"), 3, S), ValueError,
         r"log_p_x0 must be on a cpu or cuda device, got meta"),
        ("x_t_meta", lambda: fn(logp, x_t.to("meta"), 3, S), ValueError, r"x_t is on meta"),
        ("logp_sparse", lambda: fn(logp.to_sparse(), x_t, 3, S), TypeError, r"log_p_x0 must be a dense"),
        ("x_t_sparse", lambda: fn(logp, x_t.to_sparse(), 3, S), TypeError, r"x_t must be a dense"),
        ("t_meta", lambda: fn(logp, x_t, torch.tensor(3, device="meta"), S), ValueError, r"t must be a dense tensor on a cpu"),
        ("t_float", lambda: fn(logp, x_t, 3.0, S), TypeError, r"t must be an int"),
        ("t_bool", lambda: fn(logp, x_t, True, S), TypeError, r"t must be an int"),
        ("t_2p40", lambda: fn(logp, x_t, torch.tensor([2**40, 1]), S), ValueError, r"t must be in \[0, 10\)"),
        ("t_negative", lambda: fn(logp, x_t, -1, S), ValueError, r"t must be in \[0, 10\)"),
        ("x_t_2p40", lambda: fn(logp, x_t + 2**40, 3, S), ValueError, r"x_t has values outside \[0, 6\]"),
        ("x_t_int32_negative", lambda: fn(logp, x_t.int() - 7, 3, S), ValueError, r"x_t has values outside"),
        ("x_t_bool", lambda: fn(logp, x_t.bool(), 3, S), TypeError, r"x_t must be an integer tensor"),
        ("logp_float64", lambda: fn(logp.double(), x_t, 3, S), TypeError, r"log_p_x0 must be float32"),
        ("logp_4d", lambda: fn(logp[None], x_t, 3, S), ValueError, r"log_p_x0 must have shape \(B, K, N\)"),
        ("logp_nan", lambda: fn(torch.full_like(logp, NAN), x_t, 3, S), ValueError, r"log_p_x0 has a token .*NaN"),
        ("logp_posinf", lambda: fn(logp.index_fill(2, torch.tensor([3]), INF), x_t, 3, S), ValueError,
         r"log_p_x0 has a token"),
        ("logp_all_neginf", lambda: fn(logp.index_fill(2, torch.tensor([0]), -INF), x_t, 3, S), ValueError,
         r"log_p_x0 has a token .* all -inf"),
        ("guidance_inf", lambda: fn(logp, x_t, 3, S, guidance_scale=INF, log_p_x0_uncond=logp.flip(1)),
         ValueError, r"guided log-probs \(log_p_x0 with log_p_x0_uncond\)"),
        ("uncond_meta", lambda: fn(logp, x_t, 3, S, guidance_scale=2.0, log_p_x0_uncond=logp.to("meta")),
         ValueError, r"log_p_x0_uncond must be on a cpu or cuda"),
        ("truncation_nan", lambda: fn(logp, x_t, 3, S, truncation_rate=NAN), ValueError, r"truncation_rate"),
        ("truncation_negative", lambda: fn(logp, x_t, 3, S, truncation_rate=-0.1), ValueError, r"truncation_rate"),
        ("sched_str", lambda: fn(logp, x_t, 3, "sched"), TypeError, r"sched must be a MaskAndReplaceSchedule"),
        # past 2^31 elements (stride 0): rejected by the shape checks before any kernel runs
        ("logp_huge_K", lambda: fn(_huge(1, BIG, 1), x_t[:1, :1], 3, S), ValueError,
         r"log_p_x0 has K = 2147483649 classes"),
        ("x_t_huge_N", lambda: fn(logp, _huge(2, BIG, dtype=torch.int64), 3, S), ValueError,
         r"x_t must have shape \(2, 5\)"),
    ]


SAMPLING_OPS = {"posterior_sample": posterior_sample, "posterior_log_probs": posterior_log_probs}


@pytest.mark.parametrize("case", [(name, c) for name, f in SAMPLING_OPS.items() for c in _sampling_cases(f)],
                         ids=lambda c: f"{c[0]}-{c[1][0]}")
def test_posterior_bad_input(case):
    _run(case[1])


def test_posterior_sample_generator_is_checked():
    logp, x_t = torch.zeros(1, K, 3), torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"posterior_sample: generator must be a torch\.Generator"):
        posterior_sample(logp, x_t, 3, MaskAndReplaceSchedule(K, T), 5)


def _q_sample_cases():
    g = torch.Generator().manual_seed(9)
    S = MaskAndReplaceSchedule(K, T)
    x0 = torch.randint(0, K, (2, 5), generator=g)
    return [
        ("x0_meta", lambda: q_sample(x0.to("meta"), 3, S), ValueError, r"x0 must be on a cpu or cuda"),
        ("x0_sparse", lambda: q_sample(x0.to_sparse(), 3, S), TypeError, r"x0 must be a dense"),
        ("x0_float", lambda: q_sample(x0.float(), 3, S), TypeError, r"x0 must be an integer tensor"),
        ("x0_bool", lambda: q_sample(x0.bool(), 3, S), TypeError, r"x0 must be an integer tensor"),
        ("x0_complex", lambda: q_sample(x0.to(torch.complex64), 3, S), TypeError, r"x0 must be an integer"),
        ("x0_list", lambda: q_sample(x0.tolist(), 3, S), TypeError, r"x0 must be a torch\.Tensor"),
        ("x0_1d", lambda: q_sample(x0[0], 3, S), ValueError, r"x0 must have shape \(B, N\)"),
        ("x0_3d", lambda: q_sample(x0[None], 3, S), ValueError, r"x0 must have shape \(B, N\)"),
        ("x0_is_mask", lambda: q_sample(torch.full((2, 5), K), 3, S), ValueError, r"x0 has values outside \[0, 6\)"),
        ("x0_negative", lambda: q_sample(x0 - 1, 3, S), ValueError, r"x0 has values outside"),
        ("x0_2p40", lambda: q_sample(x0 + 2**40, 3, S), ValueError, r"x0 has values outside"),
        ("x0_int8_negative", lambda: q_sample(x0.to(torch.int8) - 100, 3, S), ValueError, r"x0 has values outside"),
        ("t_too_big", lambda: q_sample(x0, T, S), ValueError, r"t must be in \[0, 10\)"),
        ("t_negative", lambda: q_sample(x0, -1, S), ValueError, r"t must be in \[0, 10\)"),
        ("t_tensor_2p40", lambda: q_sample(x0, torch.tensor([3, 2**40]), S), ValueError, r"t must be in"),
        ("t_shape", lambda: q_sample(x0, torch.tensor([1, 2, 3]), S), ValueError, r"t must be a scalar or have shape \(2,\)"),
        ("t_float_tensor", lambda: q_sample(x0, torch.tensor([1.0, 2.0]), S), TypeError, r"t must be an integer tensor"),
        ("t_str", lambda: q_sample(x0, "3", S), TypeError, r"t must be an int"),
        ("t_meta", lambda: q_sample(x0, torch.tensor(3, device="meta"), S), ValueError, r"t must be a dense tensor"),
        ("sched_none", lambda: q_sample(x0, 3, None), TypeError, r"sched must be a MaskAndReplaceSchedule"),
        ("generator_int", lambda: q_sample(x0, 3, S, 5), TypeError, r"q_sample: generator must be a torch\.Generator"),
        ("x0_huge_3d", lambda: q_sample(_huge(1, BIG, 1, dtype=torch.int64), 3, S), ValueError, r"x0 must have shape"),
        ("schedule_K_2p31", lambda: MaskAndReplaceSchedule(2**31, T), ValueError, r"num_classes must be <= 2\^30"),
        ("schedule_T_1", lambda: MaskAndReplaceSchedule(K, 1), ValueError, r"num_timesteps must be an int >= 2"),
    ]


@pytest.mark.parametrize("case", _q_sample_cases(), ids=lambda c: c[0])
def test_q_sample_bad_input(case):
    _run(case)


def _vb_loss_cases():
    g = torch.Generator().manual_seed(9)
    S = MaskAndReplaceSchedule(K, T)
    logits = torch.randn(2, K, 5, generator=g)
    x0 = torch.randint(0, K, (2, 5), generator=g)
    x_t = torch.randint(0, K + 1, (2, 5), generator=g)
    V = vb_loss
    return [
        ("logits_meta", lambda: V(logits.to("meta"), x0.to("meta"), x_t.to("meta"), 3, S), ValueError,
         r"logits must be on a cpu or cuda"),
        ("x0_meta", lambda: V(logits, x0.to("meta"), x_t, 3, S), ValueError, r"x0 is on meta"),
        ("x_t_meta", lambda: V(logits, x0, x_t.to("meta"), 3, S), ValueError, r"x_t is on meta"),
        ("logits_sparse", lambda: V(logits.to_sparse(), x0, x_t, 3, S), TypeError, r"logits must be a dense"),
        ("logits_int", lambda: V(logits.long(), x0, x_t, 3, S), TypeError, r"logits must be float32"),
        ("logits_float64", lambda: V(logits.double(), x0, x_t, 3, S), TypeError, r"logits must be float32"),
        ("logits_2d", lambda: V(logits[0], x0, x_t, 3, S), ValueError, r"logits must have shape \(B, K, N\)"),
        ("logits_K", lambda: V(logits[:, :5], x0, x_t, 3, S), ValueError, r"logits has K = 5 classes"),
        ("x0_float", lambda: V(logits, x0.float(), x_t, 3, S), TypeError, r"x0 must be an integer tensor"),
        ("x_t_bool", lambda: V(logits, x0, x_t.bool(), 3, S), TypeError, r"x_t must be an integer tensor"),
        ("x0_shape", lambda: V(logits, x0[:, :4], x_t, 3, S), ValueError, r"x0 must have shape \(2, 5\)"),
        ("x_t_shape", lambda: V(logits, x0, x_t[:1], 3, S), ValueError, r"x_t must have shape \(2, 5\)"),
        ("x0_is_mask", lambda: V(logits, torch.full_like(x0, K), x_t, 3, S), ValueError,
         r"x0 must be in \[0, 6\) and x_t in \[0, 6\]"),
        ("x_t_2p40", lambda: V(logits, x0, x_t + 2**40, 3, S), ValueError, r"x_t in \[0, 6\]"),
        ("x0_negative", lambda: V(logits, x0 - 7, x_t, 3, S), ValueError, r"x0 must be in \[0, 6\)"),
        ("logits_nan", lambda: V(logits.index_fill(2, torch.tensor([1]), NAN), x0, x_t, 3, S), ValueError,
         r"logits has a token .*NaN"),
        ("logits_posinf", lambda: V(logits.index_fill(1, torch.tensor([2]), INF), x0, x_t, 3, S), ValueError,
         r"logits has a token"),
        ("logits_all_neginf", lambda: V(torch.full_like(logits, -INF), x0, x_t, 3, S), ValueError, r"all -inf"),
        ("t_too_big", lambda: V(logits, x0, x_t, T, S), ValueError, r"t must be in \[0, 10\)"),
        ("t_shape", lambda: V(logits, x0, x_t, torch.tensor([[1, 2]]), S), ValueError, r"t must be a scalar"),
        ("sched_none", lambda: V(logits, x0, x_t, 3, None), TypeError, r"sched must be a MaskAndReplaceSchedule"),
        ("pt_shape", lambda: V(logits, x0, x_t, 3, S, pt=torch.ones(3)), ValueError, r"pt must be a tensor of shape \(2,\)"),
        ("pt_float", lambda: V(logits, x0, x_t, 3, S, pt=0.5), ValueError, r"pt must be a tensor"),
        ("mask_weight_short", lambda: V(logits, x0, x_t, 3, S, mask_weight=(1.0,)), ValueError,
         r"mask_weight must be a pair"),
        ("logits_huge_K", lambda: V(_huge(1, BIG, 1), x0[:1, :1], x_t[:1, :1], 3, S), ValueError,
         r"logits has K = 2147483649"),
    ]


@pytest.mark.parametrize("case", _vb_loss_cases(), ids=lambda c: c[0])
def test_vb_loss_bad_input(case):
    _run(case)


def test_diffusion_non_finite_and_empty_documented():
    """Documented: -inf on some classes is fine (they are impossible); a true class at -inf gives
    an infinite vb loss (its probability is 0); huge finite logits behave like their limit;
    empty batches give empty samples and a NaN mean loss (the mean over no tokens)."""
    S = MaskAndReplaceSchedule(K, T)
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(2, K, 7, generator=g)
    logp[:, 1:] = -INF  # only class 0 is possible
    x_t = torch.full((2, 7), K)
    assert posterior_sample(logp, x_t, 0, S, g).eq(0).all()
    lp = posterior_log_probs(logp, x_t, 0, S)
    assert lp[:, 0].eq(0).all() and torch.isinf(lp[:, 1:]).all()
    x0 = torch.full((2, 7), 3)
    assert math.isinf(float(vb_loss(logp, x0, x_t, 0, S)))
    huge = torch.randn(1, K, 5, generator=g) * 1e30
    assert posterior_sample(huge, torch.full((1, 5), K), 0, S, g).eq(huge.argmax(1)).all()
    assert posterior_sample(logp[:0], x_t[:0], 3, S).shape == (0, 7)
    assert q_sample(x0[:, :0], 3, S).shape == (2, 0)
    assert math.isnan(float(vb_loss(logp[:, :, :0], x0[:, :0], x_t[:, :0], 3, S)))


def test_diffusion_misaligned_and_overlapping_views():
    """Half logits one element off their alignment and overlapping tokens (as_strided) give the
    same samples / log-probs / losses as a contiguous copy."""
    S = MaskAndReplaceSchedule(K, T)
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base = torch.randn(1 + 2 * K * 9, generator=g).to(dtype)
        views = [base[1:1 + 2 * K * 9].view(2, K, 9),  # one element off
                 base.as_strided((2, K, 9), (3, 1, 2))]  # tokens overlap
        x_t = torch.randint(0, K + 1, (2, 9), generator=g)
        x0 = torch.randint(0, K, (2, 9), generator=g)
        for v in views:
            c = v.contiguous()
            assert torch.equal(posterior_sample(v, x_t, 4, S, torch.Generator().manual_seed(1)),
                               posterior_sample(c, x_t, 4, S, torch.Generator().manual_seed(1)))
            assert torch.equal(posterior_log_probs(v, x_t, 4, S), posterior_log_probs(c, x_t, 4, S))
            assert torch.equal(vb_loss(v.float(), x0, x_t, 4, S), vb_loss(c.float(), x0, x_t, 4, S))
