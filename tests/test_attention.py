"""Fused attention (imgtx_fast.attention, attention_op, torch.ops.imgtx.attention_forward /
attention_backward) against the float64 reference; tolerances: tests/attention_helpers.py."""
import math

import pytest
import torch

from attention_helpers import (LSE_EMPTY, assert_within, check_outputs, gen_for, grad_tolerance,
                               logit_bound, make_mask, make_qkv, oracle, oracle_grads, randn,
                               run_backward, run_forward, spec_visible, visibility)
import imgtx_fast.ops.fused_attention as attention_ops
from imgtx_fast import Local1d, Local2d, attention
from imgtx_fast.ops.fused_attention import attention_op
from imgtx_fast.reference import attention as ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
_NO_CAUSAL = attention_ops._NO_CAUSAL


def qkv(B=2, H=3, Hkv=None, Nq=17, Nk=None, D=32, Dv=None, dtype=F32, key=(), scale=1.0):
    gen = gen_for(B, H, Hkv, Nq, Nk, D, Dv, str(dtype), key)
    q, k, v = make_qkv(B, H, H if Hkv is None else Hkv, Nq, Nq if Nk is None else Nk, D, Dv,
                       dtype=dtype, gen=gen, scale=scale)
    return q, k, v, gen


# ---- the oracle itself ------------------------------------------------------------------------
ORACLE_PATTERNS = [
    (None, 9, 9, True), (None, 4, 9, True), (None, 9, 4, True),
    (Local1d(1), 7, 7, False), (Local1d(3), 10, 10, False), (Local1d(4), 3, 11, False),
    (Local1d(5), 17, 17, False), (Local1d(64), 20, 20, False),
    (Local1d(3, causal=False), 10, 10, False), (Local1d(4, False, 2), 13, 13, False),
    (Local1d(2, False, 9), 7, 7, False),
    (Local2d(6, 7, (2, 3), (1, 2)), 42, 42, False), (Local2d(6, 7, (2, 3), (1, 2)), 5, 30, False),
    (Local2d(5, 9, (2, 4), (3, 5)), 45, 45, False), (Local2d(5, 9, (2, 4), 0), 45, 45, False),
    (Local2d(4, 3, (8, 16), (8, 16)), 12, 12, False), (Local2d(1, 1, 1, 0), 1, 1, False),
    (Local2d(6, 7, (2, 3), (1, 2), causal=False), 42, 42, False),
    (Local2d(5, 9, (2, 4), (0, 3), causal=False), 45, 45, False),
]


@pytest.mark.parametrize("pattern,Nq,Nk,causal", ORACLE_PATTERNS)
def test_oracle_visibility_matches_spec(pattern, Nq, Nk, causal):
    """The reference's visible_mask equals the spec's key sets built pixel by pixel."""
    got = ref.visible_mask(Nq, Nk, causal=causal, pattern=pattern)
    assert torch.equal(got, spec_visible(Nq, Nk, causal=causal, pattern=pattern))


def test_oracle_key_counts_match_spec():
    """Interior tiles see fh*(qw+2fw) + qh*fw + qh*qw keys (last pixel); Local1d L+1..2L keys."""
    p = Local2d(24, 40, (4, 8), (2, 3))
    vis = ref.visible_mask(960, 960, pattern=p)
    last = (8 + 3) * 40 + 16 + 7  # last pixel of the tile with origin (8, 16)
    assert int(vis[last].sum()) == 2 * (8 + 6) + 4 * 3 + 4 * 8
    L = 16
    vis = ref.visible_mask(100, 100, pattern=Local1d(L))
    for i in (0, L - 1, L, 2 * L + 5, 99):
        b = i // L
        assert int(vis[i].sum()) == (i - b * L + 1) + (L if b else 0)


def test_oracle_gradients_gradcheck():
    """Finite differences confirm the oracle's float64 autograd (empty rows, -inf bias too)."""
    gen = gen_for("gradcheck")
    q, k, v = make_qkv(1, 2, 1, 5, 4, 3, 2, dtype=torch.float64, gen=gen)
    mask = randn((5, 4), gen, torch.float64)
    mask[1, :2] = -math.inf

    def f(q_, k_, v_):  # the op does not differentiate lse (its -inf rows have NaN grads here)
        return oracle(q_, k_, v_, causal=True, attn_mask=mask)[0]

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in (q, k, v)))
    dq, dk, dv = oracle_grads(q, k, v, torch.ones(1, 2, 5, 2, dtype=torch.float64), causal=True)
    assert torch.all(dq[:, :, 0] == 0) and torch.isfinite(dq).all()  # row 0 sees no key


# ---- dense and causal -------------------------------------------------------------------------
SHAPES = [(1, 1), (1, 7), (7, 7), (7, 33), (33, 7), (33, 33), (100, 100), (64, 257), (257, 257),
          (1, 300), (300, 100)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk", SHAPES)
def test_dense_and_causal(Nq, Nk, causal, cpu_isa):
    """Bottom-right causal: Nq > Nk leaves the first Nq - Nk rows without keys (zeros,
    LSE_EMPTY)."""
    D = 64 if Nq * Nk < 10_000 else 24
    q, k, v, _ = qkv(2, 3, Nq=Nq, Nk=Nk, D=D, key=causal)
    out, lse = run_forward(q, k, v, causal=causal)
    if causal and Nq > Nk:
        assert torch.all(out[:, :, :Nq - Nk] == 0) and torch.all(lse[:, :, :Nq - Nk] == LSE_EMPTY)
        assert torch.all(lse[:, :, Nq - Nk:] > LSE_EMPTY)


def test_return_lse_false_returns_the_tensor():
    q, k, v, _ = qkv(1, 2, Nq=9, D=8)
    out = attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)
    assert torch.equal(out, attention(q, k, v, causal=True, return_lse=True)[0])


@pytest.mark.parametrize("D,Dv", [(1, 1), (3, 3), (16, 16), (17, 17), (40, 40), (64, 64), (80, 80),
                                  (128, 128), (256, 256), (64, 16), (16, 128), (3, 256), (256, 1),
                                  (40, 80), (1, 33), (255, 7)])
def test_head_dims(D, Dv):
    q, k, v, _ = qkv(1, 2, Nq=37, D=D, Dv=Dv)
    run_forward(q, k, v, causal=True)
    q, k, v, _ = qkv(1, 2, Nq=5, Nk=70, D=D, Dv=Dv, key="cross")
    run_forward(q, k, v)


@pytest.mark.parametrize("B,H,Hkv", [(1, 1, 1), (3, 5, 5), (5, 3, 1), (1, 7, 7), (3, 6, 3)])
def test_odd_batch_and_head_counts(B, H, Hkv):
    q, k, v, _ = qkv(B, H, Hkv, Nq=19, Nk=23, D=20)
    run_forward(q, k, v, causal=True)


@pytest.mark.parametrize("scale", [0.0, 0.3, 2, -0.5, 1e-3])
def test_explicit_scale(scale):
    """scale=0 averages the visible values; a negative scale flips the ordering."""
    q, k, v, _ = qkv(2, 2, Nq=21, D=16, key=scale)
    run_forward(q, k, v, causal=True, scale=scale)
    run_forward(q, k, v, pattern=Local1d(4), scale=scale)


# ---- causal alignment through attention_op ----------------------------------------------------
@pytest.mark.parametrize("Nq,Nk,offset", [(5, 9, 0), (9, 5, 0), (33, 70, 0), (7, 7, -3),
                                          (7, 7, 2), (4, 10, 100), (6, 6, -6), (6, 6, -100),
                                          (33, 70, 10), (70, 33, -5), (1, 40, 17)])
def test_causal_offset(Nq, Nk, offset):
    """attention_op: query i sees keys j <= i + causal_offset; 0 is top-left alignment."""
    q, k, v, _ = qkv(2, 2, Nq=Nq, Nk=Nk, D=24, key=offset)
    out, lse = run_forward(q, k, v, api="op", causal_offset=offset)
    for i in range(Nq):  # rows with no key j <= i + offset
        if i + offset < 0:
            assert torch.all(out[:, :, i] == 0) and torch.all(lse[:, :, i] == LSE_EMPTY)


def test_causal_offset_none_is_dense_and_causal_matches_bottom_right():
    q, k, v, _ = qkv(1, 2, Nq=6, Nk=11, D=8)
    dense = attention_op(q, k, v, causal_offset=None)
    run_forward(q, k, v, api="op", causal_offset=None)
    assert torch.equal(dense[0], attention(q, k, v))
    assert torch.equal(attention_op(q, k, v, causal_offset=5)[0], attention(q, k, v, causal=True))


# ---- key_lengths ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Nq,Nk,lengths", [
    (9, 9, [9]), (9, 9, [0]), (13, 13, [13, 0, 5]), (7, 33, [1, 32, 16]), (33, 7, [7, 3]),
    (1, 300, [300, 0, 1, 299]), (100, 100, [37, 100, 64]), (16, 257, [257, 256, 129])])
@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32])
def test_key_lengths(Nq, Nk, lengths, causal, int_dtype):
    """Keys j >= key_lengths[b] are never seen; length 0 gives zero rows with LSE_EMPTY."""
    B = len(lengths)
    q, k, v, _ = qkv(B, 2, Nq=Nq, Nk=Nk, D=16, key=(causal, tuple(lengths)))
    kl = torch.tensor(lengths, dtype=int_dtype)
    out, lse = run_forward(q, k, v, causal=causal, key_lengths=kl)
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.all(out[b] == 0) and torch.all(lse[b] == LSE_EMPTY)


def test_key_lengths_ignore_padding_contents():
    """Whatever sits in the padded keys (here huge values) cannot change the result."""
    q, k, v, _ = qkv(3, 2, Nq=5, Nk=40, D=16)
    kl = torch.tensor([40, 17, 3])
    out = attention(q, k, v, key_lengths=kl)
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(kl.tolist()):
        k2[b, :, n:] = 1e4
        v2[b, :, n:] = -1e4
    assert torch.equal(out, attention(q, k2, v2, key_lengths=kl))


# ---- attn_mask --------------------------------------------------------------------------------
MASK_SHAPES = ["Nk", "Nq,Nk", "B,1,1,Nk", "1,H,Nq,Nk", "B,H,Nq,Nk", "H,Nq,Nk", "B,1,Nq,Nk",
               "1,Nk", "Nk,Nq^T"]


def mask_for(shape_name, kind, B, H, Nq, Nk, gen, q_dtype=F32):
    if shape_name == "Nk,Nq^T":  # a transposed (non-contiguous) (Nq, Nk) view
        return make_mask(kind, (Nk, Nq), gen, q_dtype).t()
    sizes = dict(B=B, H=H, Nq=Nq, Nk=Nk, **{"1": 1})
    return make_mask(kind, tuple(sizes[s] for s in shape_name.split(",")), gen, q_dtype)


@pytest.mark.parametrize("kind", ["bool", "add_f32", "add_q"])
@pytest.mark.parametrize("shape_name", MASK_SHAPES)
def test_attn_mask_broadcast(shape_name, kind):
    B, H, Nq, Nk = 2, 3, 19, 45
    dtype = BF16 if kind == "add_q" else F32
    q, k, v, gen = qkv(B, H, Nq=Nq, Nk=Nk, D=16, dtype=dtype, key=(shape_name, kind))
    mask = mask_for(shape_name, kind, B, H, Nq, Nk, gen, dtype)
    run_forward(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "add_f32", "add_q"])
def test_attn_mask_with_causal_and_key_lengths(kind):
    B, H, Nq, Nk = 3, 2, 23, 31
    q, k, v, gen = qkv(B, H, Nq=Nq, Nk=Nk, D=16, key=kind)
    mask = mask_for("B,1,Nq,Nk", kind, B, H, Nq, Nk, gen)
    kl = torch.tensor([31, 0, 12])
    run_forward(q, k, v, attn_mask=mask, causal=True)
    run_forward(q, k, v, attn_mask=mask, key_lengths=kl)
    run_forward(q, k, v, attn_mask=mask, causal=True, key_lengths=kl)
    run_forward(q, k, v, api="op", attn_mask=mask, causal_offset=-4, key_lengths=kl)


@pytest.mark.parametrize("kind", ["bool", "neg_inf"])
def test_fully_masked_rows_are_zero(kind):
    """A row whose mask hides every key (False, or -inf bias) outputs zeros and LSE_EMPTY."""
    B, H, Nq, Nk = 2, 2, 11, 20
    q, k, v, gen = qkv(B, H, Nq=Nq, Nk=Nk, D=16, key=kind)
    visible = torch.rand(B, H, Nq, Nk, generator=gen) < 0.5
    visible[0, 1, 3] = False
    visible[1, :, 7] = False
    visible[:, :, 10] = False
    mask = visible if kind == "bool" else torch.zeros(B, H, Nq, Nk).masked_fill(~visible, -math.inf)
    out, lse = run_forward(q, k, v, attn_mask=mask)
    for b, h, i in [(0, 1, 3), (1, 0, 7), (1, 1, 7), (0, 0, 10), (1, 1, 10)]:
        assert torch.all(out[b, h, i] == 0) and lse[b, h, i] == LSE_EMPTY


def test_finfo_min_bias_is_a_finite_bias():
    """HF-style masks add finfo.min: a row hidden that way is not empty but the uniform average
    of its keys (as in softmax); partially hidden rows ignore those keys."""
    B, H, Nq, Nk = 1, 2, 6, 13
    q, k, v, gen = qkv(B, H, Nq=Nq, Nk=Nk, D=16)
    mask = torch.zeros(Nq, Nk)
    mask[0] = torch.finfo(F32).min
    mask[1, 5:] = torch.finfo(F32).min
    out, lse = run_forward(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[0, :, 0], v[0].mean(1), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all() and torch.all(lse[0, :, 1:] > -1e30)
    # row 0's true lse, finfo.min + log(13), rounds to finfo.min: the LSE_EMPTY value itself
    assert torch.all(lse[0, :, 0] <= -3e38)


# ---- Image Transformer local 1D ----------------------------------------------------------------
@pytest.mark.parametrize("block,N", [(1, 7), (4, 33), (16, 100), (32, 257), (256, 300), (300, 300),
                                     (128, 600), (7, 7), (64, 1)])
def test_local1d_causal(block, N, cpu_isa):
    q, k, v, _ = qkv(2, 2, Nq=N, D=32, key=block)
    run_forward(q, k, v, pattern=Local1d(block))


@pytest.mark.parametrize("block,N,fw", [(8, 33, 0), (8, 33, 3), (16, 100, 16), (5, 7, 10),
                                        (32, 257, 5), (1, 20, 2), (300, 300, 0), (64, 1, 3)])
def test_local1d_non_causal(block, N, fw, cpu_isa):
    q, k, v, _ = qkv(2, 2, Nq=N, D=32, key=(block, fw))
    run_forward(q, k, v, pattern=Local1d(block, causal=False, filter_width=fw))


# ---- Image Transformer local 2D ----------------------------------------------------------------
LOCAL2D = [
    (8, 16, (8, 16), (8, 16)),   # one tile
    (16, 16, (16, 16), (16, 32)),  # the paper's (16,16)/(16,32) on a 16x16 image
    (12, 20, (4, 8), (2, 3)),
    (13, 19, (4, 8), (3, 5)),    # sides not multiples of the query shape
    (1, 1, (1, 1), (0, 0)),      # 1-pixel images
    (1, 1, (8, 16), (8, 16)),
    (10, 10, (3, 4), (0, 0)),    # flange 0
    (9, 7, (2, 3), (0, 2)),
    (9, 7, (2, 3), (2, 0)),
    (37, 3, (8, 16), (8, 16)),   # query tile wider than the image
    (1, 40, (1, 8), (0, 8)),     # one row
    (20, 1, (4, 1), (3, 0)),     # one column
    (17, 23, (8, 16), (8, 16)),
    (24, 37, (8, 16), (8, 16)),  # the paper's setting, several tiles and > 128 rows per tile row
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("height,width,qs,fl", LOCAL2D)
def test_local2d(height, width, qs, fl, causal, cpu_isa):
    N = height * width
    q, k, v, _ = qkv(2, 2, Nq=N, D=24, key=(height, width, qs, fl, causal))
    run_forward(q, k, v, pattern=Local2d(height, width, qs, fl, causal))


# ---- KV-cache decode ---------------------------------------------------------------------------
DECODE_PATTERNS = {
    "causal": dict(causal=True),
    "local1d": dict(pattern=Local1d(32)),
    "local1d_big": dict(pattern=Local1d(256)),
    "local2d": dict(pattern=Local2d(15, 20, (4, 8), (4, 8))),
    "local2d_paper": dict(pattern=Local2d(16, 20, (8, 16), (8, 16))),
}


@pytest.mark.parametrize("name", list(DECODE_PATTERNS))
@pytest.mark.parametrize("Nq,Nk", [(1, 300), (1, 1), (1, 37), (3, 300), (16, 257), (7, 100)])
def test_kv_decode(Nq, Nk, name, cpu_isa):
    """The queries are the newest Nq of the Nk cached positions."""
    q, k, v, _ = qkv(2, 4, 2, Nq=Nq, Nk=Nk, D=64, key=name)
    run_forward(q, k, v, **DECODE_PATTERNS[name])


@pytest.mark.parametrize("name", list(DECODE_PATTERNS))
def test_kv_decode_with_key_lengths(name):
    """Batched decode over caches of different fill (the padding is never seen)."""
    q, k, v, _ = qkv(3, 2, 1, Nq=1, Nk=300, D=40, key=name)
    run_forward(q, k, v, key_lengths=torch.tensor([300, 1, 123]), **DECODE_PATTERNS[name])
    q, k, v, _ = qkv(3, 2, 1, Nq=4, Nk=300, D=40, key=(name, 4))
    run_forward(q, k, v, key_lengths=torch.tensor([299, 0, 250]), **DECODE_PATTERNS[name])


@pytest.mark.parametrize("kind", ["bool", "add_f32", "add_q"])
@pytest.mark.parametrize("Nq,Nk,Hkv,D", [(1, 300, 4, 64), (3, 77, 2, 40), (4, 1000, 1, 64)])
def test_kv_decode_with_masks(Nq, Nk, Hkv, D, kind, cpu_isa):
    """Decoding walks the cache 16 keys at a time (and splits long caches across threads):
    every chunk must see its own mask columns, with causality and key_lengths too."""
    B, H = 2, 4
    dtype = BF16 if kind == "add_q" else F32
    q, k, v, gen = qkv(B, H, Hkv, Nq=Nq, Nk=Nk, D=D, dtype=dtype, key=("decode mask", kind))
    mask = mask_for("B,H,Nq,Nk", kind, B, H, Nq, Nk, gen, dtype)
    run_forward(q, k, v, attn_mask=mask)
    run_forward(q, k, v, attn_mask=mask, causal=True, key_lengths=torch.tensor([Nk, Nk // 3]))


@pytest.mark.parametrize("D", [64, 128, 40])
def test_kv_decode_strided_cache(D, cpu_isa):
    """A cache stored [B, N, H, D] (rows at a stride of H * D) is read in place."""
    q, k, v, _ = qkv(2, 4, 2, Nq=1, Nk=300, D=D, key="decode strided")
    k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    run_forward(q, k, v, causal=True)


@pytest.mark.parametrize("mag", [30.0, 300.0])
def test_kv_decode_large_logits(mag, cpu_isa):
    """The running max must be the true max of each chunk: exp(x - max) overflows otherwise."""
    q, k, v, _ = qkv(2, 4, 4, Nq=1, Nk=500, D=64, key=("decode large", mag))
    out, lse = run_forward(q * mag, k, v, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("B,H,Hkv", [(2, 4, 4), (1, 2, 2), (2, 4, 2), (1, 6, 2), (1, 8, 1),
                                     (2, 10, 2)])
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("Nk", [16, 37, 256, 300, 1029])
def test_kv_decode_rescales(B, H, Hkv, D, Nk, cpu_isa):
    """The decode loop keeps a reference max per row and rescales the running output and sum
    only when a score rises past it by a margin. Logits rising along the cache move it many
    times mid-block. With no mask and fp32 rows in place, the keys of a block that every row of
    a kv head sees take the single loops, full 16-key chunks: one row (registers), or groups
    of 2-4 (groups of 2, 3 and 4 heads here, 8 as two of 4, 5 as 4 and one row; two new tokens
    a head). The rest goes chunk by chunk: the tail, and with causality the last block's keys
    past the earliest new token. 1029 keys on (1, 2) heads is also split across threads."""
    q, k, v, _ = qkv(B, H, Hkv, Nq=1, Nk=Nk, D=D, key=("decode rescale", B, Hkv, D, Nk))
    ramp = torch.linspace(0, 6, Nk).view(1, 1, Nk, 1)
    rising = k + q[:, :: H // Hkv] * ramp  # logits up to ~6 sqrt(D)
    q2 = torch.cat([q, q.flip(1)], dim=2)  # two new tokens a head
    for keys in (k, rising):
        run_forward(q, keys, v, causal=True)
        run_forward(q, keys, v, api="op", causal_offset=max(0, Nk - 22))
        run_forward(q2, keys, v)
        run_forward(q2, keys, v, causal=True)  # the last block: fused up to the first token's key


# ---- patterns with the other options ------------------------------------------------------------
PATTERNS = {
    "local1d": Local1d(8),
    "local1d_nc": Local1d(8, causal=False, filter_width=4),
    "local2d": Local2d(7, 9, (2, 4), (2, 3)),
    "local2d_nc": Local2d(7, 9, (2, 4), (1, 2), causal=False),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_with_key_lengths_and_masks(name):
    B, H, N = 3, 2, 63
    q, k, v, gen = qkv(B, H, Nq=N, D=16, key=name)
    p = PATTERNS[name]
    kl = torch.tensor([63, 0, 30])
    run_forward(q, k, v, pattern=p, key_lengths=kl)
    run_forward(q, k, v, pattern=p, attn_mask=mask_for("B,1,Nq,Nk", "bool", B, H, N, N, gen))
    run_forward(q, k, v, pattern=p, attn_mask=mask_for("Nq,Nk", "add_f32", B, H, N, N, gen),
                key_lengths=kl)


# ---- GQA / MQA ---------------------------------------------------------------------------------
@pytest.mark.parametrize("H,Hkv", [(6, 1), (6, 2), (6, 3), (4, 2), (8, 8), (5, 1)])
@pytest.mark.parametrize("opts", ["dense", "causal", "local1d", "local2d", "decode"])
def test_gqa(H, Hkv, opts):
    """Query head h reads k/v head h // (H / Hkv)."""
    Nq, Nk = (2, 63) if opts == "decode" else (63, 63)
    q, k, v, _ = qkv(2, H, Hkv, Nq=Nq, Nk=Nk, D=16, Dv=24, key=opts)
    kw = dict(dense={}, causal=dict(causal=True), local1d=dict(pattern=Local1d(8)),
              local2d=dict(pattern=Local2d(7, 9, (2, 4), (2, 3))),
              decode=dict(causal=True))[opts]
    run_forward(q, k, v, **kw)


# ---- dtypes -----------------------------------------------------------------------------------
DTYPE_CASES = ["dense", "causal", "decode", "key_lengths", "bool_mask", "add_mask_q",
               "add_mask_f32", "local1d", "local1d_nc", "local2d", "local2d_nc", "gqa"]


def dtype_case(name, dtype):
    B, H, N = 2, 4, 70
    Nq = 3 if name == "decode" else N
    Hkv = 2 if name == "gqa" else H
    q, k, v, gen = qkv(B, H, Hkv, Nq=Nq, Nk=N, D=40, dtype=dtype, key=name)
    kw = {}
    if name in ("causal", "decode", "gqa"):
        kw["causal"] = True
    elif name == "key_lengths":
        kw["key_lengths"] = torch.tensor([70, 33])
    elif name == "bool_mask":
        kw["attn_mask"] = mask_for("B,1,Nq,Nk", "bool", B, H, Nq, N, gen)
    elif name == "add_mask_q":
        kw["attn_mask"] = mask_for("Nq,Nk", "add_q", B, H, Nq, N, gen, dtype)
    elif name == "add_mask_f32":
        kw["attn_mask"] = mask_for("1,H,Nq,Nk", "add_f32", B, H, Nq, N, gen)
    elif name.startswith("local"):
        kw["pattern"] = {"local1d": Local1d(16), "local1d_nc": Local1d(16, False, 5),
                         "local2d": Local2d(7, 10, (2, 4), (2, 3)),
                         "local2d_nc": Local2d(7, 10, (2, 4), (1, 2), False)}[name]
    return q, k, v, gen, kw


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("name", DTYPE_CASES)
def test_dtypes(name, dtype, cpu_isa):
    """fp16/bf16: inputs enter exactly, fp32 math, one rounding of the output (<= 1 ulp here)."""
    q, k, v, _, kw = dtype_case(name, dtype)
    run_forward(q, k, v, **kw)


def test_half_inputs_are_not_rounded_through_the_other_half_type():
    """bf16 values that fp16 cannot hold (and back) must enter exactly."""
    gen = gen_for("half-range")
    q = randn((1, 1, 4, 8), gen, BF16, 1e3)
    k = randn((1, 1, 6, 8), gen, BF16, 1e-3)
    v = randn((1, 1, 6, 8), gen, BF16, 1e5)  # beyond fp16's range
    run_forward(q, k, v)
    v16 = randn((1, 1, 6, 8), gen, F16, 1e-5)  # fp16 subnormals
    run_forward(q.half(), k.half(), v16)


# ---- strides -----------------------------------------------------------------------------------
def strided_inputs(layout, B, H, Hkv, Nq, Nk, D, gen, dtype=F32):
    """(q, k, v) views with the layouts real models hand over; none is a copy."""
    if layout == "fused_qkv":  # one (B, N, 3, H, D) projection, permuted to (B, H, N, D)
        qkv_ = randn((B, Nq, 3, H, D), gen, dtype)
        return tuple(qkv_[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    if layout == "fused_kv":  # separate q (B, N, H, D) and a fused (B, N, 2, Hkv, D) cache
        q = randn((B, Nq, H, D), gen, dtype).transpose(1, 2)
        kv = randn((B, Nk, 2, Hkv, D), gen, dtype)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    if layout == "heads_major":  # (H, B, N, D) buffers
        return tuple(randn((h, B, n, D), gen, dtype).transpose(0, 1)
                     for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    if layout == "sliced":  # every other head/batch of bigger buffers, a padded cache capacity
        q = randn((2 * B, 2 * H, Nq, D), gen, dtype)[::2, 1::2]
        k = randn((B, 2 * Hkv, Nk + 13, D), gen, dtype)[:, ::2, :Nk]
        v = randn((B + 1, Hkv, Nk + 5, D), gen, dtype)[1:, :, 5:]
        return q, k, v
    if layout == "last_dim_strided":  # D not contiguous: the op may copy
        return tuple(randn((B, h, n, 2 * D), gen, dtype)[..., ::2]
                     for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
    if layout == "broadcast_kv":  # one k/v shared by the batch (stride 0) and by heads
        q = randn((B, H, Nq, D), gen, dtype)
        k = randn((1, Hkv, Nk, D), gen, dtype).expand(B, Hkv, Nk, D)
        v = randn((1, 1, Nk, D), gen, dtype).expand(B, Hkv, Nk, D)
        return q, k, v
    raise ValueError(layout)


LAYOUTS = ["fused_qkv", "fused_kv", "heads_major", "sliced", "last_dim_strided", "broadcast_kv"]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("opts", ["causal", "local2d", "key_lengths"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(layout, opts, dtype):
    B, H, Nq, D = 2, 4, 63, 40
    Hkv = H if layout == "fused_qkv" else 2
    gen = gen_for(layout, opts, str(dtype))
    q, k, v = strided_inputs(layout, B, H, Hkv, Nq, Nq, D, gen, dtype)
    assert not all(t.is_contiguous() for t in (q, k, v))
    kw = dict(causal=dict(causal=True), local2d=dict(pattern=Local2d(7, 9, (2, 4), (2, 3))),
              key_lengths=dict(key_lengths=torch.tensor([63, 20])))[opts]
    out, lse = run_forward(q, k, v, **kw)
    out_c, lse_c = attention(*(t.contiguous() for t in (q, k, v)), return_lse=True, **kw)
    atol = 2e-5 * float(v.abs().max()) if dtype == F32 else 0.0
    torch.testing.assert_close(out, out_c, atol=atol, rtol=1e-4 if dtype == F32 else 2**-7)
    torch.testing.assert_close(lse, lse_c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("N", [64, 300])
def test_fused_projection_with_far_rows(N, cpu_isa):
    """A (B, N, 3, H, D) projection with H * D = 512: each head's rows are 6 KB apart, so with
    enough query subtiles the forward copies each block of V instead of reading it in place."""
    B, H, D = 2, 8, 64
    gen = gen_for("far rows", N)
    q, k, v = strided_inputs("fused_qkv", B, H, H, N, N, D, gen, F32)
    assert v.stride(2) * 4 > 4096
    for kw in (dict(causal=True), dict(key_lengths=torch.tensor([N, N // 3]))):
        out, lse = run_forward(q, k, v, **kw)
        out_c, lse_c = attention(*(t.contiguous() for t in (q, k, v)), return_lse=True, **kw)
        torch.testing.assert_close(out, out_c, atol=0, rtol=0)  # the same products, in order
        torch.testing.assert_close(lse, lse_c, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,H,Nq,Nk", [(2, 2, 2100, 1100), (1, 1, 2100, 300), (1, 2, 1100, 1030)])
def test_tall_query_tiles(B, H, Nq, Nk, causal):
    """Long query lists run in tiles of 1024 or 512 rows where there are enough of them (each
    key block is then read once for more queries), with a partial last tile. The height depends
    on the thread count (1 thread: 1024, 512, 1024 rows here; 2 threads: 1024, 256, 256), and
    the results do not."""
    q, k, v, _ = qkv(B, H, Nq=Nq, Nk=Nk, D=16, key=("tall", causal))
    one = with_threads(1, lambda: run_forward(q, k, v, causal=causal))
    two = with_threads(2, lambda: run_forward(q, k, v, causal=causal))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# ---- randomized sweep --------------------------------------------------------------------------
def test_hypothesis_sweep():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(B=st.integers(1, 3), Hkv=st.integers(1, 3), group=st.integers(1, 3),
                      Nq=st.integers(1, 80), extra=st.integers(0, 60), D=st.integers(1, 96),
                      Dv=st.integers(1, 96), dtype=st.sampled_from([F32, F32, F16, BF16]),
                      mode=st.sampled_from(["dense", "causal", "offset", "local1d", "local1d_nc",
                                            "local2d", "local2d_nc"]),
                      use_lengths=st.booleans(),
                      mask=st.sampled_from([None, "bool", "add_f32", "add_q"]),
                      block=st.integers(1, 40), fw=st.integers(0, 9), qh=st.integers(1, 9),
                      qw=st.integers(1, 9), fh=st.integers(0, 5), fwidth=st.integers(0, 5),
                      mag=st.sampled_from([0.3, 1.0, 4.0]), seed=st.integers(0, 2**31))
    def run(B, Hkv, group, Nq, extra, D, Dv, dtype, mode, use_lengths, mask, block, fw, qh, qw,
            fh, fwidth, mag, seed):
        gen = torch.Generator().manual_seed(seed)
        H = Hkv * group
        Nk = Nq + extra
        kw, api = {}, "attention"
        if mode == "causal":
            kw["causal"] = True
        elif mode == "offset":
            api, kw["causal_offset"] = "op", extra // 2 - 10
        elif mode == "local1d":
            kw["pattern"] = Local1d(block)
        elif mode == "local1d_nc":
            Nk = Nq
            kw["pattern"] = Local1d(block, False, fw)
        else:
            width = 1 + seed % 13
            if mode == "local2d":
                Nk = max(Nq, Nk)
                height = -(-Nk // width)
            else:
                height = max(1, Nq // width)
                Nq = Nk = height * width
            kw["pattern"] = Local2d(height, width, (qh, qw), (fh, fwidth), mode == "local2d")
        q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=dtype, gen=gen, scale=mag)
        if use_lengths:
            kw["key_lengths"] = torch.randint(0, Nk + 1, (B,), generator=gen)
        if mask is not None:
            shape = [(Nk,), (Nq, Nk), (B, 1, 1, Nk), (1, H, Nq, Nk)][seed % 4]
            kw["attn_mask"] = make_mask(mask, shape, gen, dtype)
        run_forward(q, k, v, api=api, **kw)

    run()


# ---- numerics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("mag", [30.0, 100.0, 1000.0])
def test_large_logits_are_stable(mag, dtype):
    """|logits| up to ~1e4-1e6: finite and within the logit-scaled tolerance (max subtraction)."""
    q, k, v, _ = qkv(2, 2, Nq=33, Nk=50, D=32, dtype=dtype, key=mag)
    q = (q.float() * mag).to(dtype)
    out, lse = run_forward(q, k, v, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    out, lse = run_forward(q, k, v, pattern=Local1d(8))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("D", [40, 64])
def test_scratch_left_by_an_earlier_call_is_never_read(D, dtype, cpu_isa):
    """The CPU forward keeps its scratch from call to call. Fill it with NaN (an all-NaN call at
    a larger shape), then calls with partial key blocks, causal prefixes, masks and empty rows
    must still match the oracle."""
    q, k, v, gen = qkv(2, 2, Nq=300, Nk=700, D=D, dtype=dtype, key=("poison", D))
    attention(q, torch.full_like(k, float("nan")), torch.full_like(v, float("nan")))
    q, k, v, gen = qkv(2, 3, Nq=37, Nk=45, D=D, dtype=dtype, key=("after poison", D))
    run_forward(q, k, v, causal=True)
    run_forward(q, k, v, attn_mask=mask_for("B,1,Nq,Nk", "bool", 2, 3, 37, 45, gen))
    run_forward(q, k, v, key_lengths=torch.tensor([45, 0]))


@pytest.mark.parametrize("D", [40, 64])
def test_backward_scratch_left_by_an_earlier_call_is_never_read(D, cpu_isa):
    """The CPU backward keeps its scratch from call to call too. Poison it with NaN (a backward
    of all-NaN inputs at a larger shape), then backwards with short subtiles (live lanes),
    partial key blocks, causal prefixes, masks and empty rows must still match the oracle."""
    q, k, v, gen = qkv(2, 2, Nq=300, Nk=700, D=D, key=("bwd poison", D))
    nan_q, nan_k, nan_v = (torch.full_like(t, float("nan")).requires_grad_() for t in (q, k, v))
    out = attention(nan_q, nan_k, nan_v)
    torch.autograd.grad(out, (nan_q, nan_k, nan_v), torch.full_like(out, float("nan")))
    for Nq, Nk in ((13, 45), (37, 45)):
        q, k, v, gen = qkv(2, 3, Nq=Nq, Nk=Nk, D=D, key=("bwd after poison", D, Nq))
        run_backward(q, k, v, gen=gen, causal=True)
        run_backward(q, k, v, gen=gen, attn_mask=mask_for("B,1,Nq,Nk", "bool", 2, 3, Nq, Nk, gen))
        run_backward(q, k, v, gen=gen, key_lengths=torch.tensor([Nk, 0]))


def test_one_dominant_key_per_row():
    """Softmax that is one-hot to fp32 precision returns that key's value."""
    gen = gen_for("one-hot")
    Nk, D = 40, 16
    k = randn((1, 1, Nk, D), gen)
    v = randn((1, 1, Nk, D), gen)
    idx = torch.randperm(Nk, generator=gen)[:25]
    q = (k[:, :, idx] * 50).contiguous()
    out, _ = run_forward(q, k, v)
    torch.testing.assert_close(out[0, 0], v[0, 0, idx], atol=1e-5, rtol=1e-5)


def test_nan_in_query_row_stays_in_that_row():
    """A NaN in query i makes every logit of row i NaN, so out[b, h, i] is all NaN (not silently
    finite garbage) and its lse is NaN; every other row equals the reference."""
    q, k, v, _ = qkv(2, 3, Nq=40, Nk=50, D=16)
    q[1, 2, 17, 5] = float("nan")
    q[0, 0, 0, 0] = float("nan")
    out, lse = run_forward(q, k, v, causal=True, allow_nan=True)
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[1, 2, 17] = bad[0, 0, 0] = True
    assert torch.isnan(out[bad]).all() and torch.isnan(lse[bad]).all()
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(lse[~bad]).all()


def test_nan_in_invisible_keys_is_ignored():
    """NaN/inf in k where the mask/causality hides that key never reaches a logit."""
    q, k, v, _ = qkv(2, 2, Nq=20, Nk=30, D=16)
    k2 = k.clone()
    k2[:, :, 29] = float("nan")  # 18 queries, offset 9: the last one sees keys <= 26
    k2[0, 1, 28] = float("inf")
    run_forward(q[:, :, :-2], k2, v, api="op", causal_offset=9)
    kl = torch.tensor([30, 11])
    k3 = k.clone()
    k3[1, :, 11:] = float("nan")
    run_forward(q, k3, v, key_lengths=kl)


def test_nan_in_padded_values_is_ignored():
    """Garbage (NaN) in the padded slots of a KV cache must not leak: padded keys are never
    seen, so 0 * NaN must not happen. (The reference computes P @ V densely and gets NaN.)"""
    q, k, v, _ = qkv(2, 2, Nq=3, Nk=40, D=16)
    kl = torch.tensor([40, 13])
    v2 = v.clone()
    v2[1, :, 13:] = float("nan")
    out = attention(q, k, v2, key_lengths=kl)
    assert torch.isfinite(out).all()
    want, _ = oracle(q, k, v, key_lengths=kl)
    assert_within(out, want, 2e-5 * float(v.abs().max()), 1e-4, "out")


# ---- empty tensors -----------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,Nq,Nk", [(0, 2, 5, 5), (2, 2, 0, 5), (0, 2, 0, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_tensors(B, H, Nq, Nk, causal):
    q, k, v, _ = qkv(B, H, Nq=Nq, Nk=Nk, D=8, Dv=5)
    out, lse = attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == (B, H, Nq, 5) and lse.shape == (B, H, Nq)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = attention(q, k, v, causal=causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dk.any() and not dv.any()


@pytest.mark.parametrize("causal", [False, True])
def test_no_keys_at_all(causal):
    """Nk = 0: every query sees no key -> zeros, LSE_EMPTY, zero gradients."""
    q, k, v, _ = qkv(2, 3, Nq=6, Nk=0, D=8, Dv=5)
    out, lse = run_forward(q, k, v, causal=causal)
    assert torch.all(out == 0) and torch.all(lse == LSE_EMPTY)
    q.requires_grad_()
    dq, = torch.autograd.grad(attention(q, k, v, causal=causal).sum(), q)
    assert torch.all(dq == 0)


# ---- threads -----------------------------------------------------------------------------------
def with_threads(n, fn):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("case", ["causal", "local2d", "gqa_decode", "key_lengths_mask"])
def test_thread_count_does_not_change_results(case):
    """Bitwise identical forward and backward for 1 and 2 threads."""
    B, H, N = 3, 4, 130
    Nq = 2 if case == "gqa_decode" else N
    q, k, v, gen = qkv(B, H, 1 if case == "gqa_decode" else H, Nq=Nq, Nk=N, D=48, key=case)
    kw = dict(causal=dict(causal=True), local2d=dict(pattern=Local2d(10, 13, (4, 8), (2, 4))),
              gqa_decode=dict(pattern=Local1d(32)),
              key_lengths_mask=dict(key_lengths=torch.tensor([130, 7, 64]),
                                    attn_mask=mask_for("Nq,Nk", "add_f32", B, H, N, N, gen)))[case]
    g = randn((B, H, Nq, 48), gen)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = attention(*leaves, return_lse=True, **kw)
        return (out, lse) + torch.autograd.grad(out, leaves, g)

    one = with_threads(1, run)
    two = with_threads(2, run)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], one, two):
        assert torch.equal(a, b), name


# ---- backward ----------------------------------------------------------------------------------
BACKWARD_CASES = {
    "dense": dict(Nq=37, Nk=45),
    "causal": dict(Nq=45, Nk=45, kw=dict(causal=True)),
    "causal_more_queries": dict(Nq=45, Nk=30, kw=dict(causal=True)),  # 15 empty rows
    "causal_offset": dict(Nq=20, Nk=33, api="op", kw=dict(causal_offset=-3)),
    "key_lengths": dict(B=3, Nq=30, Nk=41,
                        kw=dict(causal=True, key_lengths=torch.tensor([41, 0, 9]))),
    "bool_mask": dict(Nq=30, Nk=41, mask=("B,1,Nq,Nk", "bool")),
    "add_mask": dict(Nq=30, Nk=41, mask=("Nq,Nk", "add_f32")),
    "local1d": dict(Nq=70, Nk=70, kw=dict(pattern=Local1d(16))),
    "local1d_nc": dict(Nq=70, Nk=70, kw=dict(pattern=Local1d(16, False, 5))),
    "local2d": dict(Nq=70, Nk=70, kw=dict(pattern=Local2d(7, 10, (2, 4), (2, 3)))),
    "local2d_nc": dict(Nq=70, Nk=70, kw=dict(pattern=Local2d(7, 10, (2, 4), (1, 2), False))),
    "gqa": dict(H=6, Hkv=2, Nq=33, Nk=33, kw=dict(causal=True)),
    "mqa_decode": dict(H=4, Hkv=1, Nq=3, Nk=100, kw=dict(causal=True)),
    "decode_local2d": dict(Nq=1, Nk=77, kw=dict(pattern=Local2d(10, 12, (4, 4), (2, 4)))),
    "odd_dims": dict(Nq=19, Nk=19, D=3, Dv=17, kw=dict(causal=True)),
    "big_dims": dict(B=1, H=2, Nq=19, Nk=19, D=256, Dv=80, kw=dict(causal=True)),
    "scale": dict(Nq=19, Nk=25, kw=dict(scale=0.37, pattern=Local1d(4))),
    # 16 (batch, kv head) pairs and >= 512 queries: 512-row tiles (a partial last one)
    "tall_tiles": dict(B=4, H=4, Nq=600, Nk=530, D=16, kw=dict(causal=True)),
}


def backward_case(name, dtype=F32):
    c = BACKWARD_CASES[name]
    B, H = c.get("B", 2), c.get("H", 2)
    q, k, v, gen = qkv(B, H, c.get("Hkv"), Nq=c["Nq"], Nk=c["Nk"], D=c.get("D", 24),
                       Dv=c.get("Dv"), dtype=dtype, key=name)
    kw = dict(c.get("kw", {}))
    if "mask" in c:
        kw["attn_mask"] = mask_for(*c["mask"], B, H, c["Nq"], c["Nk"], gen)
    return q, k, v, gen, c.get("api", "attention"), kw


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward(name, cpu_isa):
    q, k, v, gen, api, kw = backward_case(name)
    run_backward(q, k, v, gen=gen, api=api, **kw)


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("name", ["dense", "causal", "key_lengths", "add_mask", "local2d", "gqa"])
def test_backward_half(name, dtype):
    q, k, v, gen, api, kw = backward_case(name, dtype)
    run_backward(q, k, v, gen=gen, api=api, **kw)


@pytest.mark.parametrize("wrt", ["q", "k", "v", "qv", "kv", "qk"])
def test_backward_some_inputs_require_grad(wrt):
    q, k, v, gen, api, kw = backward_case("local1d")
    run_backward(q, k, v, gen=gen, api=api, wrt=wrt, **kw)


def test_backward_tall_tiles_do_not_depend_on_the_thread_count():
    """The backward's tile height depends on the problem only: 512-row tiles give bitwise the
    same gradients on 1 and 2 threads."""
    q, k, v, gen, _, kw = backward_case("tall_tiles")
    g = randn(q.shape, gen)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(attention(*leaves, **kw), leaves, g)

    for a, b in zip(with_threads(1, run), with_threads(2, run)):
        assert torch.equal(a, b)


def test_backward_rows_without_keys_have_zero_grads():
    """Empty rows (causal Nq > Nk, key_lengths 0, a fully masked row): dq rows exactly zero, dk/dv
    get nothing from them, no NaN anywhere."""
    B, H, Nq, Nk = 3, 2, 12, 8
    q, k, v, gen = qkv(B, H, Nq=Nq, Nk=Nk, D=8)
    mask = torch.ones(Nq, Nk, dtype=torch.bool)
    mask[6] = False
    kw = dict(causal=True, key_lengths=torch.tensor([8, 0, 5]), attn_mask=mask)
    grads = run_backward(q, k, v, gen=gen, **kw)
    assert torch.all(grads["q"][:, :, :4] == 0) and torch.all(grads["q"][:, :, 6] == 0)
    assert torch.all(grads["q"][1] == 0) and torch.all(grads["k"][1] == 0)
    assert torch.all(grads["v"][1] == 0) and torch.all(grads["k"][2, :, 5:] == 0)


def test_backward_into_a_fused_projection():
    """Gradients flow through permuted views of one (B, N, 3, H, D) projection."""
    B, H, N, D = 2, 3, 40, 16
    gen = gen_for("fused-grad")
    base = randn((B, N, 3, H, D), gen).requires_grad_()
    q, k, v = (base[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    out = attention(q, k, v, pattern=Local1d(8))
    g = randn(out.shape, gen)
    got, = torch.autograd.grad(out, base, g)
    want = oracle_grads(q, k, v, g, pattern=Local1d(8))
    want = torch.stack([w.permute(0, 2, 1, 3) for w in want], 2)
    atol, rtol = grad_tolerance(F32, want, logit_bound(q, k))
    assert_within(got, want, atol, rtol, "d(qkv)")


def test_backward_with_lse_output_used_only_for_out():
    """return_lse=True does not change the gradient of out."""
    q, k, v, gen, _, kw = backward_case("causal")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, return_lse=True, **kw)
    g = randn(out.shape, gen)
    got = torch.autograd.grad(out, leaves, g)
    want = oracle_grads(q, k, v, g, **kw)
    bound = logit_bound(q, k)
    for n, a, b in zip("qkv", got, want):
        assert_within(a, b, *grad_tolerance(F32, b, bound), f"d{n}")


@pytest.mark.parametrize("case", ["causal", "local1d", "gqa_decode"])
def test_lse_gradient(case):
    """A loss that uses lse gets d lse / d s = P folded into the fused backward."""
    gen = gen_for("lse_grad", case)
    if case == "gqa_decode":
        q, k, v = make_qkv(2, 4, 2, 3, 40, 16, gen=gen)
        kw = dict(causal=True)
    else:
        q, k, v = make_qkv(2, 2, 2, 37, 37, 24, gen=gen)
        kw = dict(causal=True) if case == "causal" else dict(pattern=Local1d(8))
    g = randn((2, q.shape[1], q.shape[2], v.shape[3]), gen)
    g_lse = randn((2, q.shape[1], q.shape[2]), gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = attention(*leaves, return_lse=True, **kw)
    got = torch.autograd.grad((out * g).sum() + (lse * g_lse).sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    rout, rlse = ref.attention(*ref_leaves, return_lse=True, **kw)
    want = torch.autograd.grad((rout * g.double()).sum() + (rlse * g_lse.double()).sum(), ref_leaves)
    bound = logit_bound(q, k)
    for n, a, b in zip("qkv", got, want):
        assert_within(a, b, *grad_tolerance(F32, b, bound), f"d{n}")


# ---- the raw ops ---------------------------------------------------------------------------------
def raw_args(q, k, v, *, key_lengths=None, attn_mask=None, pattern=None, causal_offset=None,
             scale=None):
    B, H, Nq, D = q.shape
    if attn_mask is not None:
        attn_mask = attn_mask.expand(B, H, Nq, k.shape[2])
    return (q, k, v, key_lengths, attn_mask, attention_ops.pattern_args(pattern),
            _NO_CAUSAL if causal_offset is None else causal_offset,
            1.0 / math.sqrt(D) if scale is None else scale)


@pytest.mark.parametrize("case", ["dense_mask_lengths", "offset", "local2d", "local1d_nc"])
def test_raw_ops_forward_and_backward(case):
    """torch.ops.imgtx.attention_forward / attention_backward called directly."""
    B, H, Nq, Nk = 2, 2, 30, 30
    q, k, v, gen = qkv(B, H, 1, Nq=Nq, Nk=Nk, D=16, key=case)
    kw = dict(dense_mask_lengths=dict(key_lengths=torch.tensor([30, 4]),
                                      attn_mask=mask_for("Nq,Nk", "add_f32", B, H, Nq, Nk, gen)),
              offset=dict(causal_offset=-2, key_lengths=torch.tensor([30, 17])),
              local2d=dict(pattern=Local2d(5, 6, (2, 3), (1, 2))),
              local1d_nc=dict(pattern=Local1d(8, False, 3), scale=0.5))[case]
    out, lse = torch.ops.imgtx.attention_forward(*raw_args(q, k, v, **kw))
    want_out, want_lse = oracle(q, k, v, **kw)
    check_outputs(out, lse, want_out, want_lse, q, k, v, empty=~visibility(q, k, **kw).any(-1),
                  scale=kw.get("scale"), attn_mask=kw.get("attn_mask"))
    g = randn(out.shape, gen)
    a = raw_args(q, k, v, **kw)
    grads = torch.ops.imgtx.attention_backward(g, None, q, k, v, out, lse, *a[3:])
    bound = logit_bound(q, k, kw.get("scale"), kw.get("attn_mask"))
    for n, got, want in zip("qkv", grads, oracle_grads(q, k, v, g, **kw)):
        assert got.shape == want.shape and got.dtype == q.dtype
        assert_within(got, want, *grad_tolerance(F32, want, bound), f"d{n}")


@pytest.mark.parametrize("case", ["dense", "masked_causal_lengths", "local2d_bf16"])
def test_opcheck(case):
    gen = gen_for("opcheck", case)
    dtype = BF16 if case == "local2d_bf16" else F32
    B, H, Nq, Nk = 2, 2, 12, 12
    q, k, v = make_qkv(B, H, 1, Nq, Nk, 8, 6, dtype=dtype, gen=gen)
    kw = dict(dense={}, masked_causal_lengths=dict(
        key_lengths=torch.tensor([12, 5]), causal_offset=-1,
        attn_mask=make_mask("add_f32", (Nq, Nk), gen)),
        local2d_bf16=dict(pattern=Local2d(3, 4, (2, 2), (1, 1))))[case]
    args = raw_args(q, k, v, **kw)
    torch.library.opcheck(torch.ops.imgtx.attention_forward.default, args)
    grad_args = tuple(t.requires_grad_() if i < 3 else t for i, t in enumerate(args))
    torch.library.opcheck(torch.ops.imgtx.attention_forward.default, grad_args)
    out, lse = torch.ops.imgtx.attention_forward(*args)
    g = randn(out.shape, gen, dtype)
    saved = (*(t.detach() for t in args[:3]), out.detach(), lse.detach())
    torch.library.opcheck(torch.ops.imgtx.attention_backward.default, (g, None, *saved, *args[3:]))
    g_lse = randn(lse.shape, gen, torch.float32)
    torch.library.opcheck(torch.ops.imgtx.attention_backward.default, (g, g_lse, *saved, *args[3:]))


def _compile_check(fn, inputs, gen):
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves_e = [t.clone().requires_grad_() for t in inputs]
    leaves_c = [t.clone().requires_grad_() for t in inputs]
    out_e, out_c = fn(*leaves_e), compiled(*leaves_c)
    torch.testing.assert_close(out_c, out_e, atol=0, rtol=0)
    g = randn(out_e.shape, gen)
    grads_c = torch.autograd.grad(out_c, leaves_c, g)
    for a, b in zip(grads_c, torch.autograd.grad(out_e, leaves_e, g)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["causal", "local1d_mask", "local2d_gqa"])
def test_torch_compile_fullgraph(case):
    """Forward and backward under torch.compile(fullgraph=True) equal eager."""
    q, k, v, gen = qkv(2, 4, 2, Nq=24, Nk=24, D=16, key=case)
    mask = make_mask("bool", (24, 24), gen)

    def fn(q_, k_, v_):
        if case == "causal":
            out, lse = attention(q_, k_, v_, causal=True, return_lse=True)
            return out * 2.0 + lse[..., None]
        if case == "local1d_mask":
            return attention(q_, k_, v_, pattern=Local1d(8), attn_mask=mask).sin()
        return attention(q_, k_, v_, pattern=Local2d(4, 6, (2, 3), (1, 1)))

    _compile_check(fn, (q, k, v), gen)


def test_torch_compile_fullgraph_with_key_lengths():
    q, k, v, gen = qkv(2, 2, Nq=16, Nk=16, D=8)
    kl = torch.tensor([16, 5])
    _compile_check(lambda q_, k_, v_: attention(q_, k_, v_, causal=True, key_lengths=kl),
                   (q, k, v), gen)


# ---- bad input ---------------------------------------------------------------------------------
def _bad_inputs():
    """(id, call, exception, regex naming the argument); q (2, 4, 5, 8), k/v (2, 2, 6, 8)."""
    gen = gen_for("errors")
    q, k, v = make_qkv(2, 4, 2, 5, 6, 8, gen=gen)
    kl = torch.tensor([6, 3])
    A, O = attention, attention_op

    def ones(*shape, dtype=torch.bool, device="cpu"):
        return torch.ones(shape, dtype=dtype, device=device)

    def k_v(n):  # the first n keys
        return k[:, :, :n], v[:, :, :n]

    return [
        ("q_list", lambda: A(q.tolist(), k, v), TypeError, r"q must be a torch\.Tensor"),
        ("k_list", lambda: A(q, k.tolist(), v), TypeError, r"k must be a torch\.Tensor"),
        ("v_none", lambda: A(q, k, None), TypeError, r"v must be a torch\.Tensor"),
        ("k_list_causal", lambda: A(q, k.tolist(), v, causal=True), TypeError,
         r"k must be a torch\.Tensor"),
        ("q_3d", lambda: A(q[0], k, v), ValueError, r"q must be 4-D"),
        ("k_5d", lambda: A(q, k[None], v), ValueError, r"k must be 4-D"),
        ("v_3d", lambda: A(q, k, v[0]), ValueError, r"v must be 4-D"),
        ("q_3d_causal", lambda: A(q[0], k, v, causal=True), ValueError, r"q must be 4-D"),
        ("dtype_mismatch", lambda: A(q, k.half(), v.half()), TypeError,
         r"q, k and v must share a dtype"),
        ("v_dtype", lambda: A(q, k, v.bfloat16()), TypeError, r"share a dtype"),
        ("float64", lambda: A(q.double(), k.double(), v.double()), TypeError,
         r"q must be float32, float16 or bfloat16"),
        ("int_k", lambda: A(q, k.long(), v), TypeError, r"k must be float32"),
        ("device", lambda: A(q, k.to("meta"), v.to("meta")), ValueError,
         r"q, k and v must be on one device"),
        ("batch", lambda: A(q[:1], k, v), ValueError, r"batch sizes differ"),
        ("kv_len", lambda: A(q, k, v[:, :, :5]), ValueError, r"k and v must have the same"),
        ("kv_heads", lambda: A(q, k, v[:, :1]), ValueError, r"k and v must have the same"),
        ("gqa_divide", lambda: A(q[:, :3], k, v), ValueError,
         r"k/v heads \(2\) must divide q heads \(3\)"),
        ("gqa_more_kv", lambda: A(q[:, :1], k, v), ValueError,
         r"k/v heads \(2\) must divide q heads \(1\)"),
        ("qk_dims", lambda: A(q, k[..., :7], v), ValueError, r"q and k head dims differ: 8 and 7"),
        ("D_257", lambda: A(ones(1, 1, 2, 257, dtype=F32), ones(1, 1, 2, 257, dtype=F32),
                            ones(1, 1, 2, 4, dtype=F32)),
         ValueError, r"q/k head dim must be in \[1, 256\], got 257"),
        ("Dv_300", lambda: A(q, k, ones(2, 2, 6, 300, dtype=F32)), ValueError,
         r"v head dim must be in \[1, 256\]"),
        ("D_0", lambda: A(q[..., :0], k[..., :0], v), ValueError,
         r"head dim must be in \[1, 256\], got 0"),
        ("mask_shape", lambda: A(q, k, v, attn_mask=ones(5, 7)), ValueError,
         r"attn_mask of shape \(5, 7\)"),
        ("mask_batch", lambda: A(q, k, v, attn_mask=ones(3, 1, 5, 6)), ValueError, r"attn_mask"),
        ("mask_5d", lambda: A(q, k, v, attn_mask=ones(1, 1, 1, 5, 6)), ValueError, r"attn_mask"),
        ("mask_int", lambda: A(q, k, v, attn_mask=ones(5, 6, dtype=torch.int64)), TypeError,
         r"attn_mask must be float32"),
        ("mask_f64", lambda: A(q, k, v, attn_mask=ones(5, 6, dtype=torch.float64)), TypeError,
         r"attn_mask must be float32"),
        ("mask_list", lambda: A(q, k, v, attn_mask=[[True] * 6] * 5), TypeError,
         r"attn_mask must be a tensor"),
        ("mask_device", lambda: A(q, k, v, attn_mask=ones(5, 6, dtype=F32, device="meta")),
         ValueError, r"attn_mask is on meta"),
        ("local2d_nc_hw", lambda: A(q, *k_v(5), pattern=Local2d(2, 3, causal=False)), ValueError,
         r"Local2d: height\*width = 6 must equal the sequence length"),
        ("local2d_nc_decode", lambda: A(q, k, v, pattern=Local2d(2, 3, causal=False)),
         ValueError, r"Local2d: height\*width"),
        ("local2d_causal_small", lambda: A(q, k, v, pattern=Local2d(2, 2)), ValueError,
         r"Local2d: 6 keys do not fit a 2x2 image"),
        ("local2d_more_queries", lambda: A(q, *k_v(4), pattern=Local2d(3, 3)), ValueError,
         r"Local2d: more queries \(5\) than keys \(4\)"),
        ("local1d_nc_lengths", lambda: A(q, k, v, pattern=Local1d(4, causal=False)), ValueError,
         r"Local1d\(causal=False\) needs as many queries as keys"),
        ("local1d_more_queries", lambda: A(q, *k_v(4), pattern=Local1d(4)), ValueError,
         r"Local1d: more queries"),
        ("local1d_block0", lambda: Local1d(0), ValueError, r"Local1d: block must be > 0"),
        ("local1d_fw_causal", lambda: Local1d(4, True, 2), ValueError, r"Local1d: filter_width"),
        ("local2d_qs0", lambda: Local2d(4, 4, (0, 2)), ValueError, r"Local2d: query_shape\[0\]"),
        ("local2d_causal_int", lambda: Local2d(4, 4, causal=1), TypeError,
         r"Local2d: causal must be a bool"),
        ("lengths_negative", lambda: A(q, k, v, key_lengths=torch.tensor([-1, 3])), ValueError,
         r"key_lengths must be in \[0, 6\]"),
        ("lengths_too_long", lambda: A(q, k, v, key_lengths=torch.tensor([7, 3])), ValueError,
         r"key_lengths must be in \[0, 6\]"),
        ("lengths_shape", lambda: A(q, k, v, key_lengths=torch.tensor([6, 3, 1])), ValueError,
         r"key_lengths must have shape \(2,\)"),
        ("lengths_2d", lambda: A(q, k, v, key_lengths=kl[:, None]), ValueError,
         r"key_lengths must have shape \(2,\)"),
        ("lengths_float", lambda: A(q, k, v, key_lengths=kl.float()), TypeError,
         r"key_lengths must be an int32/int64"),
        ("lengths_bool", lambda: A(q, k, v, key_lengths=kl.bool()), TypeError,
         r"key_lengths must be an int32/int64"),
        ("lengths_list", lambda: A(q, k, v, key_lengths=[6, 3]), TypeError,
         r"key_lengths must be an int32/int64"),
        ("causal_pattern", lambda: A(q, k, v, causal=True, pattern=Local1d(4)), ValueError,
         r"pattern .*causal"),
        ("causal_int", lambda: A(q, k, v, causal=1), TypeError, r"causal must be a bool"),
        ("causal_none", lambda: A(q, k, v, causal=None), TypeError, r"causal must be a bool"),
        ("pattern_type", lambda: A(q, k, v, pattern="local1d"), TypeError,
         r"pattern must be Local1d, Local2d or None"),
        ("pattern_type_op", lambda: O(q, k, v, pattern=(4,)), TypeError,
         r"pattern must be Local1d"),
        ("scale_str", lambda: A(q, k, v, scale="0.5"), TypeError, r"scale must be a float or None"),
        ("op_lengths", lambda: O(q, k, v, key_lengths=torch.tensor([9, 3])), ValueError,
         r"key_lengths"),
        ("op_offset_pattern", lambda: O(q, k, v, causal_offset=0, pattern=Local1d(4)), ValueError,
         r"pattern carries its own causality"),
        ("op_mask", lambda: O(q, k, v, attn_mask=ones(6, 5, dtype=F32)), ValueError, r"attn_mask"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_inputs()])
def test_bad_input_names_the_argument(case):
    _, fn, exc, match = next(c for c in _bad_inputs() if c[0] == case)
    with pytest.raises(exc, match=match):
        fn()


def test_reference_backend_switch():
    """imgtx_fast.backend('reference') runs the plain-PyTorch twin: same values, differentiable."""
    import imgtx_fast
    from unittest import mock
    gen = gen_for("backend_switch")
    q, k, v = make_qkv(2, 4, 2, 30, 40, 16, gen=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fast = attention(*leaves, causal=True, pattern=None)
    with imgtx_fast.backend("reference"), mock.patch.object(
            attention_ops, "_forward_impl", side_effect=AssertionError("kernel called")):
        slow = attention(*leaves, causal=True)
        grads = torch.autograd.grad(slow.sum(), leaves)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_concurrent_calls_from_python_threads():
    """The GIL is released during the kernel: calls from several threads at once (a pool busy
    with one call runs the others inline) give each caller its own, correct result."""
    from concurrent.futures import ThreadPoolExecutor
    gen = gen_for("concurrent")
    inputs = [make_qkv(2, 2, 2, 70, 90, 32, gen=gen) for _ in range(6)]
    want = [attention(*qkv, causal=True) for qkv in inputs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda qkv: attention(*qkv, causal=True), inputs * 3))
    for i, g in enumerate(got):
        assert torch.equal(g, want[i % len(inputs)])
