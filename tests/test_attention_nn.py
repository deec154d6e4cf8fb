"""imgtx_fast.nn attention: the SDPA drop-in, MultiheadAttention and the local attention layers.

The drop-ins are checked against torch's own functions/modules: results in float32 against
torch in float64 (the kernel accumulates in float32), shapes/dtypes/errors against torch's.
A spy on the fused op checks that the fused path really ran (and with key_lengths where the
mask allows); falls back to torch are checked by their one-time warning.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import imgtx_fast.nn.attention as nn_attention
import imgtx_fast.nn.functional as nn_functional
from imgtx_fast import Local1d, Local2d
from imgtx_fast._frontend.attention import _NO_CAUSAL
from imgtx_fast.nn import KVCache, LocalAttention1d, LocalAttention2d, MultiheadAttention
from imgtx_fast.nn.functional import scaled_dot_product_attention as fused_sdpa
from imgtx_fast.reference import attention as reference

ATOL = RTOL = 2e-5  # float32 kernel vs float64 torch, O(1) values


@pytest.fixture(autouse=True)
def _fresh_warnings():
    nn_functional._warned.clear()
    yield
    nn_functional._warned.clear()


class Spy:
    """Records the keyword arguments of every call of the fused op made through `module`: its
    attention_op, and the one-call path (eager_forward) where the module has one, as the same
    keywords (causal_offset None when not causal)."""

    def __init__(self, monkeypatch, module):
        self.calls = []
        real = module.attention_op

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "attention_op", spy)
        if hasattr(module, "eager_forward"):
            real_eager = module.eager_forward

            def eager_spy(q, k, v, causal_offset, align_end, key_lengths, attn_mask, scale, **kw):
                done = real_eager(q, k, v, causal_offset, align_end, key_lengths, attn_mask, scale,
                                  **kw)
                if done is not None:
                    self.calls.append(dict(
                        causal_offset=None if causal_offset == _NO_CAUSAL else causal_offset,
                        key_lengths=key_lengths, attn_mask=attn_mask, scale=scale))
                return done

            monkeypatch.setattr(module, "eager_forward", eager_spy)


@pytest.fixture
def sdpa_spy(monkeypatch):
    return Spy(monkeypatch, nn_functional)


@pytest.fixture
def mha_spy(monkeypatch):
    return Spy(monkeypatch, nn_attention)


def torch64(fn, *tensors, **kwargs):
    """torch's function in float64 (the oracle), result cast back to float32."""
    def d(t):
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    return fn(*map(d, tensors), **{k: d(v) for k, v in kwargs.items()}).float()


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ------------------------------------------------------------------------------------- SDPA

SDPA_SHAPES = [  # (q shape, k shape, v shape)
    ((5, 8), (7, 8), (7, 6)),                               # 2-D
    ((3, 5, 8), (3, 7, 8), (3, 7, 8)),                      # 3-D
    ((2, 4, 5, 8), (2, 4, 7, 8), (2, 4, 7, 6)),             # 4-D, Ev != E
    ((2, 3, 2, 9, 16), (2, 3, 2, 4, 16), (2, 3, 2, 4, 16)),  # 5-D
    ((1, 2, 1, 3), (1, 2, 1, 3), (1, 2, 1, 5)),             # single query and key
]


@pytest.mark.parametrize("shapes", SDPA_SHAPES, ids=lambda s: f"{len(s[0])}d")
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_sdpa_matches_torch(shapes, is_causal, scale, sdpa_spy):
    torch.manual_seed(0)
    q, k, v = (rand(*s) for s in shapes)
    out = fused_sdpa(q, k, v, is_causal=is_causal, scale=scale)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, torch64(F.scaled_dot_product_attention, q, k, v,
                                            is_causal=is_causal, scale=scale),
                               atol=ATOL, rtol=RTOL)
    assert len(sdpa_spy.calls) == 1 and sdpa_spy.calls[0]["causal_offset"] == (0 if is_causal else None)


@pytest.mark.parametrize("L,S", [(3, 9), (9, 3), (6, 6)])
def test_sdpa_causal_is_top_left(L, S):
    """torch's is_causal: query i sees keys j <= i whatever L and S (not bottom-right)."""
    torch.manual_seed(1)
    q, k, v = rand(2, 3, L, 8), rand(2, 3, S, 8), rand(2, 3, S, 8)
    out = fused_sdpa(q, k, v, is_causal=True)
    top_left = torch.ones(L, S, dtype=torch.bool).tril()
    torch.testing.assert_close(out, torch64(F.scaled_dot_product_attention, q, k, v,
                                            attn_mask=top_left), atol=ATOL, rtol=RTOL)
    if L != S:  # bottom-right alignment would differ
        bottom_right = torch.ones(L, S, dtype=torch.bool).tril(S - L)
        other = F.scaled_dot_product_attention(q, k, v, attn_mask=bottom_right)
        assert not torch.allclose(out, other, atol=1e-3)


def _masks(shape_q, S, kind):
    """A mask of the given kind for queries of shape_q and S keys (broadcast shapes)."""
    L = shape_q[-2]
    g = torch.Generator().manual_seed(2)
    if kind == "bool_2d":
        m = torch.rand(L, S, generator=g) > 0.4
        m[:, 0] = True
        return m
    if kind == "bool_full":
        return torch.rand(*shape_q[:-1], S, generator=g) > 0.5  # some rows see nothing
    if kind == "float_2d":
        return torch.randn(L, S, generator=g)
    if kind == "float_inf":
        m = torch.randn(*shape_q[:-3], 1, L, S, generator=g)
        m[..., 0, :] = -math.inf  # a row that sees nothing -> zeros, as torch
        m[..., 1, 2:] = -math.inf
        return m
    raise AssertionError(kind)


@pytest.mark.parametrize("shapes", SDPA_SHAPES[1:4], ids=lambda s: f"{len(s[0])}d")
@pytest.mark.parametrize("kind", ["bool_2d", "bool_full", "float_2d", "float_inf"])
def test_sdpa_masks(shapes, kind, sdpa_spy):
    torch.manual_seed(3)
    q, k, v = (rand(*s) for s in shapes)
    mask = _masks(q.shape, k.shape[-2], kind)
    out = fused_sdpa(q, k, v, attn_mask=mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, torch64(F.scaled_dot_product_attention, q, k, v,
                                            attn_mask=mask), atol=ATOL, rtol=RTOL)
    if kind in ("bool_full", "float_inf"):
        assert expected.isfinite().all() and out.isfinite().all()
    assert len(sdpa_spy.calls) == 1 and sdpa_spy.calls[0]["attn_mask"] is not None


@pytest.mark.parametrize("dims", [(3, 8, 4), (4, 2, 2), (5, 6, 2), (4, 4, 1)])
def test_sdpa_gqa(dims, sdpa_spy):
    rank, H, Hkv = dims
    torch.manual_seed(4)
    lead = {3: (), 4: (2,), 5: (2, 3)}[rank]
    q = rand(*lead, H, 5, 8)
    k, v = rand(*lead, Hkv, 6, 8), rand(*lead, Hkv, 6, 4)
    out = fused_sdpa(q, k, v, enable_gqa=True, is_causal=True)
    torch.testing.assert_close(out, torch64(F.scaled_dot_product_attention, q, k, v,
                                            enable_gqa=True, is_causal=True), atol=ATOL, rtol=RTOL)
    assert len(sdpa_spy.calls) == 1


def test_sdpa_single_kv_head_broadcasts_without_gqa(sdpa_spy):
    """torch broadcasts a key/value head dim of 1 even without enable_gqa."""
    torch.manual_seed(5)
    q, k, v = rand(2, 4, 5, 8), rand(2, 1, 6, 8), rand(2, 1, 6, 8)
    torch.testing.assert_close(fused_sdpa(q, k, v),
                               torch64(F.scaled_dot_product_attention, q, k, v),
                               atol=ATOL, rtol=RTOL)
    assert len(sdpa_spy.calls) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sdpa_half_dtypes(dtype):
    torch.manual_seed(6)
    q, k, v = rand(2, 2, 7, 16, dtype=dtype), rand(2, 2, 9, 16, dtype=dtype), rand(2, 2, 9, 16, dtype=dtype)
    mask = torch.zeros(7, 9, dtype=dtype)
    mask[:, 5:] = -math.inf
    out = fused_sdpa(q, k, v, attn_mask=mask)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), torch64(F.scaled_dot_product_attention, q, k, v,
                                                    attn_mask=mask), atol=tol, rtol=tol)


def test_sdpa_gradients():
    torch.manual_seed(7)
    leaves = [rand(2, 2, 5, 8).requires_grad_(), rand(2, 2, 6, 8).requires_grad_(),
              rand(2, 2, 6, 4).requires_grad_()]
    mask = torch.randn(5, 6)
    grad = torch.randn(2, 2, 5, 4)
    fused_sdpa(*leaves, attn_mask=mask).backward(grad)
    ours = [t.grad for t in leaves]
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    F.scaled_dot_product_attention(*doubles, attn_mask=mask.double()).backward(grad.double())
    for a, b in zip(ours, doubles):
        torch.testing.assert_close(a, b.grad.float(), atol=1e-4, rtol=1e-4)


ERROR_CASES = {
    "causal_and_mask": lambda q, k, v: dict(attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True),
    "heads_without_gqa": lambda q, k, v: dict(key=k[:, :2], value=v[:, :2]),
    "gqa_not_dividing": lambda q, k, v: dict(key=rand(2, 3, 7, 8), value=rand(2, 3, 7, 8), enable_gqa=True),
    "mask_dtype": lambda q, k, v: dict(attn_mask=torch.zeros(5, 7, dtype=torch.float64)),
    "mask_int": lambda q, k, v: dict(attn_mask=torch.zeros(5, 7, dtype=torch.int64)),
    "mask_shape": lambda q, k, v: dict(attn_mask=torch.zeros(3, 5, 7)),
    "mixed_dtypes": lambda q, k, v: dict(key=k.half()),
    "head_dim": lambda q, k, v: dict(key=k[..., :4]),
    "kv_lengths": lambda q, k, v: dict(value=v[:, :, :6]),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_sdpa_errors_where_torch_errors(case):
    # Ev != E: torch's math path, which checks everything (its CPU flash kernel, taken when
    # E == Ev, skips some checks; ours raises there too: test_sdpa_errors_on_every_path)
    q, k, v = rand(2, 4, 5, 8), rand(2, 4, 7, 8), rand(2, 4, 7, 6)
    kwargs = dict(query=q, key=k, value=v)
    kwargs.update(ERROR_CASES[case](q, k, v))
    with pytest.raises(RuntimeError) as torch_error:
        F.scaled_dot_product_attention(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for a call torch rejects
        with pytest.raises(type(torch_error.value)):
            fused_sdpa(**kwargs)


@pytest.mark.parametrize("case", ["causal_and_mask", "kv_lengths"])
def test_sdpa_errors_on_every_path(case):
    """torch documents these as errors; its CPU flash kernel (E == Ev) lets them through."""
    q, k, v = rand(2, 4, 5, 8), rand(2, 4, 7, 8), rand(2, 4, 7, 8)
    kwargs = dict(query=q, key=k, value=v)
    kwargs.update(ERROR_CASES[case](q, k, v))
    with pytest.raises(RuntimeError):
        fused_sdpa(**kwargs)


FALLBACKS = {  # torch accepts these, the fused op does not: torch's result, one warning
    "dropout": (lambda: (rand(2, 2, 5, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8)), dict(dropout_p=0.5), "dropout_p"),
    "head_dim_300": (lambda: (rand(1, 1, 3, 300), rand(1, 1, 4, 300), rand(1, 1, 4, 300)), {}, "head dims above"),
    "float64": (lambda: (rand(2, 2, 5, 8).double(), rand(2, 2, 6, 8).double(), rand(2, 2, 6, 8).double()), {}, "float64"),
    "broadcast_batch": (lambda: (rand(2, 2, 5, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)), {}, "broadcast"),
    "mask_grad": (lambda: (rand(2, 2, 5, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8)),
                  dict(attn_mask=torch.randn(5, 6, requires_grad=True)), "requires grad"),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_sdpa_fallback_warns_once(case, sdpa_spy):
    make, kwargs, words = FALLBACKS[case]
    q, k, v = make()
    torch.manual_seed(8)
    with pytest.warns(UserWarning, match=words):
        out = fused_sdpa(q, k, v, **kwargs)
    torch.manual_seed(8)  # same dropout draws
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(out, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_sdpa(q, k, v, **kwargs)  # no second warning
    assert sdpa_spy.calls == []
    if case == "mask_grad":  # the mask's gradient exists, as with torch
        out.sum().backward()
        assert kwargs["attn_mask"].grad is not None


def test_sdpa_empty_inputs_match_torch(sdpa_spy):
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 0, 8), rand(2, 2, 0, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's exact answer, nothing to warn about
        out = fused_sdpa(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


# ------------------------------------------------------------------ mask -> key_lengths

def _suffix(lengths, S, hidden, visible=0.0):
    pad = torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]
    return torch.full(pad.shape, visible).masked_fill(pad, hidden)


@pytest.mark.parametrize("mask,expected", [
    (_suffix([4, 1, 3], 4, 1.0) == 0, [4, 1, 3]),                    # bool, True = visible
    (_suffix([4, 1, 0], 4, 1.0) == 0, [4, 1, 0]),                    # bool row hiding all keys
    (_suffix([4, 1, 3], 4, -math.inf), [4, 1, 3]),
    (_suffix([4, 1, 0], 4, -math.inf), [4, 1, 0]),
    (_suffix([4, 2, 3], 4, -10000.0), [4, 2, 3]),                    # diffusers' bias
    (_suffix([4, 2, 3], 4, -10000.0).bfloat16(), [4, 2, 3]),         # -9984 in bfloat16
    (_suffix([2, 2, 3], 4, -1000.0)[:, None, None].expand(3, 2, 5, 4), [2, 2, 3]),
    (_suffix([4, 2, 0], 4, -10000.0), None),    # finite bias on every key: softmax unchanged
    (_suffix([4, 2, 3], 4, -5.0), None),        # a soft bias, not padding
    (_suffix([4, 2, 3], 4, -math.inf, visible=0.5), None),           # biased visible keys
    (~(_suffix([2, 2, 3], 4, 1.0) == 0), None),                      # a prefix hidden
    (torch.cat([_suffix([2, 2, 3], 4, -math.inf)[:, None], _suffix([2, 1, 3], 4, -math.inf)[:, None]], 1),
     None),                                      # rows of a batch disagree
    (torch.zeros(3, 4, dtype=torch.int64), None),
])
def test_key_lengths_from_mask(mask, expected):
    from imgtx_fast.nn._masks import key_lengths_from_mask
    lengths = key_lengths_from_mask(mask)
    assert (None if lengths is None else lengths.tolist()) == expected


# ---------------------------------------------------------------------- MultiheadAttention

def mha_pair(embed_dim=16, num_heads=4, seed=0, **kwargs):
    """(torch.nn.MultiheadAttention, ours with its state dict), eval mode, float32."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    if theirs.bias_k is not None:  # they start at zero-ish: make them matter
        nn.init.normal_(theirs.bias_k)
        nn.init.normal_(theirs.bias_v)
    if theirs.in_proj_bias is not None:
        nn.init.normal_(theirs.in_proj_bias)
    ours = MultiheadAttention(embed_dim, num_heads, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def mha_inputs(ours, B=3, L=5, S=7, sharing="self", seed=1):
    """query, key, value in the module's layout; sharing: self (q is k is v), kv (k is v), none."""
    g = torch.Generator().manual_seed(seed)

    def x(n, d):
        t = torch.randn(B, n, d, generator=g)
        return t if ours.batch_first else t.transpose(0, 1).contiguous()

    if sharing == "self":
        q = x(L, ours.embed_dim)
        return q, q, q
    q = x(L, ours.embed_dim)
    k = x(S, ours.kdim)
    return (q, k, k) if sharing == "kv" else (q, k, x(S, ours.vdim))


def theirs64(theirs, *args, **kwargs):
    """torch's module in float64 on float64 copies of the tensor arguments (identity kept)."""
    ref = {}

    def d(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return ref.setdefault(id(t), t.double())

    m64 = nn.MultiheadAttention(theirs.embed_dim, theirs.num_heads, dropout=theirs.dropout,
                                bias=theirs.in_proj_bias is not None,
                                add_bias_kv=theirs.bias_k is not None,
                                add_zero_attn=theirs.add_zero_attn, kdim=theirs.kdim,
                                vdim=theirs.vdim, batch_first=theirs.batch_first,
                                dtype=torch.float64).eval()
    m64.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    out, w = m64(*(d(a) for a in args), **{k: d(v) for k, v in kwargs.items()})
    return out.float(), None if w is None else w.float()


def test_mha_is_a_torch_mha_with_the_same_state_dict():
    for kwargs in (dict(), dict(kdim=6, vdim=10), dict(bias=False), dict(add_bias_kv=True),
                   dict(batch_first=True, add_zero_attn=True)):
        theirs, ours = mha_pair(**kwargs)
        assert isinstance(ours, nn.MultiheadAttention)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    _, ours = mha_pair(kdim=6, vdim=10)
    assert {"q_proj_weight", "k_proj_weight", "v_proj_weight"} <= set(ours.state_dict())


MHA_CONFIGS = {
    "self": (dict(), "self"),
    "cross_kv": (dict(), "kv"),
    "separate": (dict(), "none"),
    "kdim_vdim": (dict(kdim=6, vdim=10), "none"),
    "kdim_vdim_shared": (dict(kdim=6, vdim=6), "kv"),
    "no_bias": (dict(bias=False), "self"),
    "bias_kv": (dict(add_bias_kv=True), "none"),
    "zero_attn": (dict(add_zero_attn=True), "kv"),
    "bias_kv_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), "self"),
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("config", sorted(MHA_CONFIGS))
def test_mha_matches_torch(config, batch_first, mha_spy):
    kwargs, sharing = MHA_CONFIGS[config]
    theirs, ours = mha_pair(batch_first=batch_first, **kwargs)
    S = 5 if sharing == "self" else 7
    q, k, v = mha_inputs(ours, sharing=sharing, S=S)
    out, w = ours(q, k, v, need_weights=False)
    their_out, _ = theirs(q, k, v, need_weights=False)
    assert w is None and out.shape == their_out.shape and out.dtype == their_out.dtype
    if not batch_first:
        assert out.is_contiguous()  # as torch's sequence-first output
    torch.testing.assert_close(out, theirs64(theirs, q, k, v, need_weights=False)[0],
                               atol=ATOL, rtol=RTOL)
    assert len(mha_spy.calls) == 1


def _kpm(B, S, kind):
    """A key_padding_mask (True / -inf = padding) of the given kind."""
    lengths = torch.tensor([S, 2, 5][:B])
    pad = torch.arange(S)[None, :] >= lengths[:, None]
    if kind == "bool_suffix":
        return pad
    if kind == "bool_holes":
        pad = pad.clone()
        pad[0, 1] = True
        return pad
    if kind == "float_suffix":
        return torch.zeros(B, S).masked_fill(pad, -math.inf)
    if kind == "float_finite":  # transformers-style large negative bias
        return torch.zeros(B, S).masked_fill(pad, torch.finfo(torch.float32).min)
    if kind == "float_random":
        return torch.randn(B, S, generator=torch.Generator().manual_seed(3))
    raise AssertionError(kind)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["bool_suffix", "bool_holes", "float_suffix", "float_finite",
                                  "float_random"])
def test_mha_key_padding_mask(kind, batch_first, mha_spy):
    theirs, ours = mha_pair(batch_first=batch_first)
    q, k, v = mha_inputs(ours, sharing="kv")
    kpm = _kpm(3, 7, kind)
    out, _ = ours(q, k, v, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, theirs64(theirs, q, k, v, key_padding_mask=kpm,
                                             need_weights=False)[0], atol=ATOL, rtol=RTOL)
    (call,) = mha_spy.calls
    as_lengths = kind in ("bool_suffix", "float_suffix", "float_finite")
    assert (call["key_lengths"] is not None) == as_lengths
    assert (call["attn_mask"] is None) == as_lengths
    if as_lengths:
        assert call["key_lengths"].tolist() == [7, 2, 5]


def _attn_mask(L, S, kind, B=3, H=4):
    g = torch.Generator().manual_seed(4)
    if kind == "bool_2d":
        m = torch.rand(L, S, generator=g) > 0.6
        m[:, 0] = False
        return m
    if kind == "float_2d":
        return torch.randn(L, S, generator=g)
    if kind == "bool_3d":
        return torch.rand(B * H, L, S, generator=g) > 0.6
    if kind == "float_3d":
        return torch.randn(B * H, L, S, generator=g).masked_fill(torch.rand(B * H, L, S, generator=g) > 0.8, -math.inf)
    raise AssertionError(kind)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask_kind", ["bool_2d", "float_2d", "bool_3d", "float_3d"])
@pytest.mark.parametrize("kpm_kind", [None, "bool_suffix", "bool_holes", "float_random"])
def test_mha_attn_mask(mask_kind, kpm_kind, batch_first):
    theirs, ours = mha_pair(batch_first=batch_first)
    q, k, v = mha_inputs(ours, sharing="none")
    am = _attn_mask(5, 7, mask_kind)
    kwargs = dict(attn_mask=am, need_weights=False)
    if kpm_kind is not None:
        kwargs["key_padding_mask"] = _kpm(3, 7, kpm_kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "mismatched mask types" deprecation
        expected = theirs64(theirs, q, k, v, **kwargs)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = ours(q, k, v, **kwargs)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    mismatched = kpm_kind is not None and kwargs["key_padding_mask"].dtype != am.dtype
    assert any("mismatched" in str(w.message) for w in caught) == mismatched
    assert not any("imgtx_fast" in str(w.message) for w in caught)  # no fallback


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool kpm, float mask
@pytest.mark.parametrize("extra", [dict(), dict(add_bias_kv=True), dict(add_zero_attn=True)])
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_is_causal_hint(extra, with_kpm, batch_first, mha_spy):
    theirs, ours = mha_pair(batch_first=batch_first, **extra)
    q, k, v = mha_inputs(ours, sharing="self", L=6)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    kwargs = dict(attn_mask=causal, is_causal=True, need_weights=False)
    if with_kpm:
        kwargs["key_padding_mask"] = _kpm(3, 6, "bool_suffix")
    out, _ = ours(q, k, v, **kwargs)
    torch.testing.assert_close(out, theirs64(theirs, q, k, v, **kwargs)[0], atol=ATOL, rtol=RTOL)
    (call,) = mha_spy.calls
    uses_offset = not with_kpm or not extra
    assert (call["causal_offset"] == 0) == uses_offset
    assert (call["attn_mask"] is None) == uses_offset


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # bool kpm, float mask
def test_mha_unbatched(mha_spy):
    theirs, ours = mha_pair(add_bias_kv=True)
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    kpm = torch.zeros(7, dtype=torch.bool)
    kpm[5:] = True
    am = _attn_mask(5, 7, "float_3d", B=1)
    out, _ = ours(q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    expected = theirs64(theirs, q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=False)[0]
    assert out.shape == (5, 16)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert len(mha_spy.calls) == 1


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_need_weights_is_torchs(average, batch_first, mha_spy):
    theirs, ours = mha_pair(batch_first=batch_first, add_zero_attn=True)
    q, k, v = mha_inputs(ours, sharing="kv")
    kpm = _kpm(3, 7, "bool_suffix")
    with pytest.warns(UserWarning, match="need_weights"):
        out, w = ours(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
    their_out, their_w = theirs(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
    assert torch.equal(out, their_out) and torch.equal(w, their_w)
    assert w.shape == ((3, 5, 8) if average else (3, 4, 5, 8))
    assert mha_spy.calls == []


def test_mha_training_dropout_falls_back_and_no_dropout_is_fused(mha_spy):
    theirs, ours = mha_pair(dropout=0.5, batch_first=True)
    ours.train()
    q, k, v = mha_inputs(ours)
    torch.manual_seed(9)
    with pytest.warns(UserWarning, match="dropout"):
        out, _ = ours(q, k, v, need_weights=False)
    theirs.train()
    torch.manual_seed(9)
    assert torch.equal(out, theirs(q, k, v, need_weights=False)[0])
    assert mha_spy.calls == []
    ours.eval()
    ours(q, k, v, need_weights=False)  # eval mode: dropout off, fused
    assert len(mha_spy.calls) == 1
    theirs, ours = mha_pair(dropout=0.0)
    ours.train()
    ours(*mha_inputs(ours), need_weights=False)
    assert len(mha_spy.calls) == 2


def test_mha_gradients_match_torch():
    theirs, ours = mha_pair(batch_first=True)
    theirs.train(), ours.train()
    q, k, v = mha_inputs(ours, sharing="kv")
    kpm = _kpm(3, 7, "bool_suffix")
    grad = torch.randn(3, 5, 16)
    ours(q, k, v, key_padding_mask=kpm, need_weights=False)[0].backward(grad)
    theirs(q, k, v, key_padding_mask=kpm, need_weights=False)[0].backward(grad)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)


MHA_ERRORS = {
    "is_causal_without_mask": lambda q: dict(is_causal=True),
    "attn_mask_2d_shape": lambda q: dict(attn_mask=torch.zeros(4, 5)),
    "attn_mask_3d_shape": lambda q: dict(attn_mask=torch.zeros(2, 5, 5)),
    "kpm_shape": lambda q: dict(key_padding_mask=torch.zeros(3, 4, dtype=torch.bool)),
    "kpm_int": lambda q: dict(key_padding_mask=torch.zeros(3, 5, dtype=torch.int64)),
    "embed_dim": lambda q: dict(query=q[..., :8], key=q[..., :8], value=q[..., :8]),
}


@pytest.mark.parametrize("case", sorted(MHA_ERRORS))
def test_mha_errors_where_torch_errors(case):
    theirs, ours = mha_pair(batch_first=True)
    q = torch.randn(3, 5, 16)
    kwargs = dict(query=q, key=q, value=q, need_weights=False)
    kwargs.update(MHA_ERRORS[case](q))
    with pytest.raises(Exception) as torch_error:
        theirs(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(type(torch_error.value)):
            ours(**kwargs)


def test_mha_inside_transformer_encoder_layer(mha_spy):
    """Swapped into nn.TransformerEncoderLayer (which passes need_weights=False)."""
    torch.manual_seed(12)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    ours = MultiheadAttention(16, 4, dropout=0.0, batch_first=True)
    ours.load_state_dict(layer.self_attn.state_dict())
    swapped = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    swapped.load_state_dict(layer.state_dict())
    swapped.self_attn = ours
    x = torch.randn(3, 6, 16)
    kpm = _kpm(3, 6, "bool_suffix")
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for kwargs in (dict(src_key_padding_mask=kpm), dict(src_mask=causal, is_causal=True)):
        torch.testing.assert_close(swapped(x, **kwargs), layer(x, **kwargs), atol=1e-5, rtol=1e-5)
    assert len(mha_spy.calls) == 2


def test_mha_float64_falls_back():
    theirs, ours = mha_pair(dtype=torch.float64)
    q = torch.randn(5, 3, 16, dtype=torch.float64)
    with pytest.warns(UserWarning, match="float64"):
        out, _ = ours(q, q, q, need_weights=False)
    assert torch.equal(out, theirs(q, q, q, need_weights=False)[0])


# ------------------------------------------------------------------- local attention layers

def local_reference(layer, x, pattern):
    """The layer's math in float64 with the reference attention (dense visibility mask)."""
    w, b = layer.qkv_proj.weight.double(), layer.qkv_proj.bias
    qkv = F.linear(x.double(), w, None if b is None else b.double())
    B, N, _ = x.shape
    q, k, v = qkv.view(B, N, 3, layer.num_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    out = reference.attention(q, k, v, pattern=pattern)
    ob = layer.out_proj.bias
    return F.linear(out.transpose(1, 2).reshape(B, N, -1), layer.out_proj.weight.double(),
                    None if ob is None else ob.double()).float()


LAYERS = {
    "1d_causal": lambda: LocalAttention1d(16, 2, block=4),
    "1d_noncausal": lambda: LocalAttention1d(16, 4, block=4, causal=False, filter_width=2),
    "2d_causal": lambda: LocalAttention2d(16, 2, height=6, width=8, query_shape=(2, 4),
                                          memory_flange=(2, 2)),
    "2d_noncausal": lambda: LocalAttention2d(16, 2, height=6, width=8, query_shape=(2, 4),
                                             memory_flange=1, causal=False, bias=False),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_local_layer_matches_reference(name):
    torch.manual_seed(10)
    layer = LAYERS[name]()
    N = 48 if name.startswith("2d") else 13
    x = torch.randn(2, N, 16)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, local_reference(layer, x, layer.pattern), atol=ATOL, rtol=RTOL)
    # the pattern matters: full attention gives something else
    assert not torch.allclose(out, local_reference(layer, x, None), atol=1e-3)


def _chunk_sizes(N, sizes):
    """Cycle through sizes until N positions are covered (the last chunk cut to fit)."""
    chunks = []
    while sum(chunks) < N:
        chunks.append(min(sizes[len(chunks) % len(sizes)], N - sum(chunks)))
    return chunks


def _steps(layer, x, chunks, cache):
    outs, start = [], 0
    for n in chunks:
        outs.append(layer(x[:, start:start + n], cache))
        start += n
        assert cache.length == start
    return torch.cat(outs, 1)


DECODE_LAYERS = {
    "1d": lambda: LocalAttention1d(16, 2, block=4),
    "2d": lambda: LocalAttention2d(16, 2, height=6, width=8, query_shape=(2, 4),
                                   memory_flange=(2, 2)),
    # partial tiles at the image's edges, a left flange wider than a tile
    "2d_ragged": lambda: LocalAttention2d(16, 4, height=5, width=7, query_shape=(2, 3),
                                          memory_flange=(1, 4)),
}


@pytest.mark.parametrize("name", sorted(DECODE_LAYERS))
@pytest.mark.parametrize("chunking", ["tokens", "chunks"])
@pytest.mark.parametrize("max_length", [None, 48])
def test_local_kv_cache_equals_full_forward(name, chunking, max_length):
    torch.manual_seed(11)
    layer = DECODE_LAYERS[name]()
    N = 19 if name == "1d" else layer.pattern.height * layer.pattern.width
    x = torch.randn(2, N, 16)
    full = layer(x)
    # 2D generates tile by tile: feed the image in generation order, compare in that order
    order = torch.arange(N) if name == "1d" else layer.generation_order
    x, full = x[:, order], full[:, order]
    chunks = [1] * N if chunking == "tokens" else _chunk_sizes(N, [3, 1, 5, 2, 8, 4])
    cache = KVCache(max_length=max_length)
    with torch.no_grad():
        stepped = _steps(layer, x, chunks, cache)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    if max_length is not None:
        assert cache.k.shape[2] == (max_length if name == "1d" else N)  # allocated once
    cache.reset()  # a second sample reuses the buffers
    with torch.no_grad():
        again = _steps(layer, x * 0.5, chunks, cache)
    torch.testing.assert_close(again, layer((x * 0.5)[:, order.argsort()])[:, order],
                               atol=1e-5, rtol=1e-5)


def test_local2d_generation_order():
    layer = LocalAttention2d(8, 2, height=4, width=5, query_shape=(2, 3), memory_flange=1)
    assert layer.generation_order.tolist() == [0, 1, 2, 5, 6, 7, 3, 4, 8, 9,
                                               10, 11, 12, 15, 16, 17, 13, 14, 18, 19]


@torch.no_grad()  # a KV cache is inference-only
def test_local_kv_cache_errors_leave_the_cache_intact():
    layer = LAYERS["2d_causal"]()  # 6 x 8 image: 48 positions
    x = torch.randn(1, 50, 16)
    cache = KVCache()
    layer(x[:, :40], cache)
    with pytest.raises(ValueError, match="do not fit"):
        layer(x[:, 40:50], cache)  # past the image
    assert cache.length == 40
    with pytest.raises(ValueError, match="max_length"):
        layer(x[:, :1], KVCache(max_length=47))
    capped = KVCache(max_length=8)
    l1 = LAYERS["1d_causal"]()
    l1(x[:, :6], capped)
    with pytest.raises(ValueError, match="max_length"):
        l1(x[:, 6:9], capped)
    assert capped.length == 6
    with pytest.raises(ValueError, match="causal"):
        LAYERS["1d_noncausal"]()(x[:, :4], KVCache())
    with pytest.raises(ValueError, match="do not match"):
        l1(torch.randn(2, 1, 16), capped)  # another batch size
    with pytest.raises(ValueError):
        KVCache(max_length=0)


def test_local_layers_build_their_patterns():
    assert LocalAttention1d(8, 2, block=16).pattern == Local1d(16)
    assert LocalAttention2d(8, 2, 4, 4, (2, 2), (1, 1)).pattern == Local2d(4, 4, (2, 2), (1, 1))
    with pytest.raises(ValueError):
        LocalAttention1d(10, 3)
