"""The attention drop-ins against torch's own test corpora and torch's semantics.

* torch's OpInfo for nn.functional.scaled_dot_product_attention (every sample input, the CPU
  dtypes it lists, gradients) through imgtx_fast.nn.functional.scaled_dot_product_attention;
* torch's ModuleInfo for nn.MultiheadAttention through imgtx_fast.nn.MultiheadAttention, with
  torch's state dict loaded into ours;
* fallback to the stock computation where the kernels cannot run (head dim 512, float64,
  AutoencoderKL's mid-block under FusedAttnProcessor);
* the reference backend in float16/bfloat16 and under autocast; autocast itself;
* torch's errors for bad inputs; meta tensors; torch.func (grad, jacrev, vmap, double backward).

Tolerances (the OpInfo draws inputs in [-9, 9]: logits up to ~230, a nearly one-hot softmax).
Outputs against torch's: torch.testing.assert_close's defaults for the dtype, except float32,
where the OpInfo itself declares a looser tolerance for its TestCommon comparisons (read from
the OpInfo, not copied); float16/bfloat16 add one rounding of the output's scale to the atol
(torch's CPU kernel and ours sum in different orders, and an output element that is a
cancelling sum may round one way in one and the other way in the other).
Gradients against the float64 gradient (the dropout samples, which run torch's own function
inside the drop-in, against torch's): attention_helpers.grad_tolerance, the model the fused
attention tests use; for float16/bfloat16 at least twice the error torch's own flash kernel
makes on the sample. torch runs 3-D inputs through its float32 math path but 4-D ones through
that kernel, whose backward (like ours) reads the output rounded to the dtype in
delta = rowsum(dO * O); on these inputs that moves a gradient by up to ~30 eps of its scale.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

import imgtx_fast
from imgtx_fast.nn import MultiheadAttention, VectorQuantizer
from imgtx_fast.nn.functional import scaled_dot_product_attention as sdpa
from imgtx_fast.ops.codebook import codebook_lookup
from imgtx_fast.reference import attention as ref

from attention_helpers import assert_within, grad_tolerance, logit_bound, make_qkv

pytest.importorskip("expecttest", reason="torch's OpInfo/ModuleInfo corpora import expecttest")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402
from torch.testing._internal.common_device_type import toleranceOverride  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SDPA_INFO = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention"
                 and o.variant_test_name == "")
MHA_INFO = next(m for m in module_db if m.module_cls is torch.nn.MultiheadAttention)
CPU_DTYPES = sorted(SDPA_INFO.supported_dtypes("cpu"), key=str)
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7,
       torch.float64: 2.0**-52}


@pytest.fixture(autouse=True)
def _quiet_fallbacks():
    """Fallback warnings (shown once per reason) are expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _opinfo_tolerance(info, dtype):
    """(rtol, atol) the OpInfo declares for dtype in its TestCommon tests, else None."""
    for deco in info.decorators:
        if getattr(deco, "cls_name", None) != "TestCommon":
            continue
        for d in deco.decorators:
            if isinstance(d, toleranceOverride) and dtype in d.d:
                return d.d[dtype].rtol, d.d[dtype].atol
    return None


def _assert_out_close(got, want, dtype, what):
    """See the module docstring."""
    tol = _opinfo_tolerance(SDPA_INFO, dtype)
    rtol, atol = tol if tol is not None else torch.testing._comparison.default_tolerances(dtype)
    if dtype in (torch.float16, torch.bfloat16) and want.numel():
        atol += EPS[dtype] * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _grads(fn, args, kwargs, grad_out):
    leaves = [a.detach().requires_grad_() for a in args]
    torch.manual_seed(0)
    return torch.autograd.grad(fn(*leaves, **kwargs), leaves, grad_out)


def _flash_form(t):
    """A 3-D tensor as the (1, ...) 4-D one that torch's CPU flash kernel takes."""
    return t.unsqueeze(0) if t.dim() == 3 else t


def _sample_args(sample):
    return (sample.input, *sample.args), dict(sample.kwargs)


def _describe(sample):
    shapes = [tuple(t.shape) for t in (sample.input, *sample.args)]
    kw = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sample.kwargs.items()}
    return f"{shapes} {kw}"


def _run_sdpa(fn, args, kwargs, seed=0):
    """fn's output, seeded: the dropout samples (which the drop-in hands to torch's function)
    then draw the same dropout mask in both runs."""
    torch.manual_seed(seed)
    return fn(*args, **kwargs)


# ---- 1. the OpInfo corpus ---------------------------------------------------------------------
def test_opinfo_is_the_installed_torchs():
    """The corpus is torch's own (imported, not copied) and lists what the tests below cover."""
    assert SDPA_INFO.supports_autograd
    assert {torch.float32, torch.float64, torch.bfloat16} <= set(CPU_DTYPES)
    assert len(list(SDPA_INFO.sample_inputs("cpu", torch.float32))) >= 10


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_opinfo_sdpa_forward(dtype):
    n = 0
    for sample in SDPA_INFO.sample_inputs("cpu", dtype, requires_grad=False):
        args, kwargs = _sample_args(sample)
        want = _run_sdpa(F.scaled_dot_product_attention, args, kwargs)
        got = _run_sdpa(sdpa, args, kwargs)
        assert got.shape == want.shape and got.dtype == want.dtype, _describe(sample)
        _assert_out_close(got, want, dtype, _describe(sample))
        n += 1
    assert n > 0


@pytest.mark.parametrize("dtype", sorted(SDPA_INFO.supported_backward_dtypes("cpu"), key=str), ids=str)
def test_opinfo_sdpa_grads(dtype):
    """Gradients of every sample (the OpInfo supports autograd) against torch's, for a random
    upstream gradient."""
    gen = torch.Generator().manual_seed(1)
    for sample in SDPA_INFO.sample_inputs("cpu", dtype, requires_grad=True):
        args, kwargs = _sample_args(sample)
        what = _describe(sample)
        want = _run_sdpa(F.scaled_dot_product_attention, args, kwargs)
        grad_out = torch.randn(want.shape, generator=gen).to(dtype)
        got = _grads(sdpa, args, kwargs, grad_out)
        theirs = _grads(F.scaled_dot_product_attention, args, kwargs, grad_out)
        if kwargs["dropout_p"] > 0 or dtype == torch.float64:  # torch's function in the drop-in
            for name, g, w in zip("qkv", got, theirs):
                torch.testing.assert_close(g, w, msg=lambda m: f"d{name} of {what}: {m}")
            continue
        exact = _grads(F.scaled_dot_product_attention, [a.double() for a in args],
                       {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
                       grad_out.double())
        flash = _grads(F.scaled_dot_product_attention, [_flash_form(a) for a in args], kwargs,
                       _flash_form(grad_out) if args[0].dim() == 3 else grad_out)
        bound = logit_bound(_flash_form(args[0]), _flash_form(args[1]))
        for name, g, e, f in zip("qkv", got, exact, flash):
            assert g.dtype == dtype and g.shape == e.shape
            atol, rtol = grad_tolerance(dtype, e, bound)
            if dtype != torch.float32:
                atol = max(atol, 2 * float((f.reshape(e.shape).double() - e).abs().max()))
            assert_within(g, e, atol, rtol, f"d{name} of {what}")


def test_opinfo_sdpa_error_inputs():
    if SDPA_INFO.error_inputs_func is None:
        pytest.skip("torch's OpInfo for scaled_dot_product_attention lists no error inputs "
                    "(test_sdpa_raises_as_torch covers torch's errors)")
    for err in SDPA_INFO.error_inputs("cpu"):
        s = err.sample_input
        with pytest.raises(err.error_type, match=err.error_regex):
            sdpa(s.input, *s.args, **s.kwargs)


# ---- 2. the ModuleInfo corpus -----------------------------------------------------------------
def _module_inputs(dtype, training):
    return MHA_INFO.module_inputs_func(MHA_INFO, device="cpu", dtype=dtype, requires_grad=False,
                                       training=training)


def _both_modules(module_input, dtype, training):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = torch.nn.MultiheadAttention(*args, **kwargs).to(dtype).train(training)
    ours = MultiheadAttention(*args, **kwargs).to(dtype).train(training)
    state = theirs.state_dict()
    assert list(ours.state_dict()) == list(state)  # same keys, same order
    ours.load_state_dict(state, strict=True)
    return theirs, ours


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", MHA_INFO.dtypes, ids=str)
def test_moduleinfo_multihead_attention(dtype, training):
    """Every forward sample as given (need_weights=True: the weights are torch's too), and
    again with need_weights=False, the fused path."""
    n = 0
    for mi in _module_inputs(dtype, training):
        theirs, ours = _both_modules(mi, dtype, training)
        args, kwargs = mi.forward_input.args, mi.forward_input.kwargs
        what = f"{mi.constructor_input.kwargs} {_describe_forward(args, kwargs)}"
        want, want_w = theirs(*args, **kwargs)
        got, got_w = ours(*args, **kwargs)
        torch.testing.assert_close(got, want, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(got_w, want_w, msg=lambda m: f"weights of {what}: {m}")
        want, want_w = theirs(*args, **kwargs, need_weights=False)
        got, got_w = ours(*args, **kwargs, need_weights=False)
        assert got_w is None and want_w is None
        torch.testing.assert_close(got, want, msg=lambda m: f"need_weights=False, {what}: {m}")
        n += 1
    assert n > 0


def _describe_forward(args, kwargs):
    kw = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return f"{[tuple(a.shape) for a in args]} {kw}"


# ---- 3. fallback to the stock computation -----------------------------------------------------
@pytest.mark.parametrize("dtype,D", [(torch.float32, 512), (torch.float64, 24), (torch.float64, 512)])
def test_sdpa_falls_back_where_the_kernel_cannot_run(dtype, D):
    gen = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(2, 3, n, D, generator=gen, dtype=dtype) for n in (5, 7, 7))
    got = sdpa(q, k, v, is_causal=True)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("dtype,E,H", [(torch.float32, 512, 1), (torch.float64, 48, 2)])
def test_multihead_attention_falls_back_where_the_kernel_cannot_run(dtype, E, H):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True).to(dtype).eval()
    ours = MultiheadAttention(E, H, batch_first=True).to(dtype).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, E, dtype=dtype)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0],
                               theirs(x, x, x, need_weights=False)[0])


def _diffusers_attention(heads, dim_head, dtype):
    from diffusers.models.attention_processor import Attention
    torch.manual_seed(0)
    return Attention(heads * dim_head, heads=heads, dim_head=dim_head).to(dtype).eval()


@pytest.mark.parametrize("dtype,heads,dim_head", [(torch.float32, 1, 512), (torch.float64, 2, 16),
                                                  (torch.float32, 2, 16)])
def test_processor_falls_back_where_the_kernel_cannot_run(dtype, heads, dim_head):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0
    from imgtx_fast.integrations.diffusers import FusedAttnProcessor
    attn = _diffusers_attention(heads, dim_head, dtype)
    x = torch.randn(2, 6, heads * dim_head, dtype=dtype)
    mask = torch.zeros(2, 6, dtype=dtype)
    mask[1, 4:] = -10000.0
    with torch.no_grad():
        for m in (None, mask):
            attn.set_processor(AttnProcessor2_0())
            want = attn(x, attention_mask=m)
            attn.set_processor(FusedAttnProcessor())
            got = attn(x, attention_mask=m)
            torch.testing.assert_close(got, want)


def test_autoencoder_kl_with_the_fused_processor():
    """AutoencoderKL's mid-block attention has one head of 512 channels: the processor runs it
    as AttnProcessor2_0 does (same result), where it used to raise."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor2_0
    from imgtx_fast.integrations.diffusers import FusedAttnProcessor
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(512,), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=8).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        vae.set_attn_processor(AttnProcessor2_0())
        want = vae(x).sample
        vae.set_attn_processor(FusedAttnProcessor())
        got = vae(x).sample
    torch.testing.assert_close(got, want)


# ---- 4. the reference backend in every dtype the fast path runs -------------------------------
HALF = [torch.float16, torch.bfloat16]


def _qkv(dtype, shape=(2, 3, 5, 7, 8), seed=0):
    B, H, Nq, Nk, D = shape
    return make_qkv(B, H, H, Nq, Nk, D, dtype=dtype, gen=torch.Generator().manual_seed(seed))


def _half_tol(dtype):
    return dict(rtol=2 * EPS[dtype], atol=4 * EPS[dtype])


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 8), (1, 2, 9, 4, 17)])
def test_reference_backend_half_dtypes(dtype, shape):
    """A/B: reference and fast in fp16/bf16 (a row that sees no key included: its lse is the
    float32 sentinel), same dtypes, both within the dtype's rounding of the float64 oracle."""
    q, k, v = _qkv(dtype, shape)
    mask = torch.rand(shape[0], 1, shape[2], shape[3], generator=torch.Generator().manual_seed(3)) < 0.7
    mask[0, 0, 0] = False  # a query that sees no key
    fast = imgtx_fast.attention(q, k, v, attn_mask=mask, return_lse=True)
    with imgtx_fast.backend("reference"):
        slow = imgtx_fast.attention(q, k, v, attn_mask=mask, return_lse=True)
        drop_in = sdpa(q, k, v, attn_mask=mask)
    want, want_lse = ref.attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                   return_lse=True)
    assert slow[0].dtype == fast[0].dtype == dtype and slow[1].dtype == fast[1].dtype == torch.float32
    assert drop_in.dtype == dtype
    for out in (fast[0], slow[0], drop_in):
        torch.testing.assert_close(out.double(), want, **_half_tol(dtype))
    assert slow[1][0, :, 0].eq(ref.LSE_EMPTY).all() and slow[0][0, :, 0].eq(0).all()
    torch.testing.assert_close(slow[1], fast[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_reference_backend_half_grads(dtype):
    q, k, v = (t.requires_grad_() for t in _qkv(dtype))
    grad_out = torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(6)).to(dtype)
    grads = []
    for name in ("fast", "reference"):
        with imgtx_fast.backend(name):
            out = imgtx_fast.attention(q, k, v, causal=True)
            grads.append(torch.autograd.grad(out, (q, k, v), grad_out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = torch.autograd.grad(ref.attention(q64, k64, v64, causal=True), (q64, k64, v64),
                                grad_out.double())
    for g_fast, g_ref, e in zip(*grads, exact):
        assert g_ref.dtype == g_fast.dtype == dtype
        atol, rtol = grad_tolerance(dtype, e, logit_bound(q, k))
        assert_within(g_ref, e, atol, rtol, "reference backend gradient")
        assert_within(g_fast, e, atol, rtol, "fast backend gradient")


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_reference_backend_under_autocast(dtype):
    q, k, v = _qkv(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        fast = sdpa(q, k, v)
        with imgtx_fast.backend("reference"):
            slow = sdpa(q, k, v)
    assert fast.dtype == slow.dtype == dtype
    torch.testing.assert_close(slow, fast, **_half_tol(dtype))


# ---- 5. autocast ------------------------------------------------------------------------------
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_follows_autocast(dtype, masked):
    q, k, v = (t.requires_grad_() for t in _qkv(torch.float32))
    mask = torch.randn(5, 7) if masked else None
    with torch.autocast("cpu", dtype=dtype):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = sdpa(q, k, v, attn_mask=mask)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, **_half_tol(dtype))
    grads = torch.autograd.grad(got.float().sum(), (q, k, v))
    assert all(g.dtype == torch.float32 for g in grads)  # back through the casts


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_raw_op_and_attention_follow_autocast(dtype):
    from imgtx_fast.ops.fused_attention import _NO_CAUSAL, pattern_args
    q, k, v = _qkv(torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        out, lse = torch.ops.imgtx.attention_forward(q, k, v, None, None, pattern_args(None),
                                                     _NO_CAUSAL, 0.3)
        fused = imgtx_fast.attention(q, k, v)
        with torch.autocast("cpu", enabled=False):
            plain = imgtx_fast.attention(q, k, v)
    assert out.dtype == fused.dtype == dtype and lse.dtype == torch.float32
    assert plain.dtype == torch.float32
    want = ref.attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double())
    torch.testing.assert_close(fused.double(), want, **_half_tol(dtype))
    # float64 is outside torch's autocast policy: not cast, as torch leaves it
    q64 = q.double()
    with torch.autocast("cpu", dtype=dtype):
        assert sdpa(q64, q64, q64).dtype == torch.float64


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_multihead_attention_follows_autocast(dtype):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ours = MultiheadAttention(16, 2, batch_first=True).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=dtype):
        want = theirs(x, x, x, need_weights=False)[0]
        got = ours(x, x, x, need_weights=False)[0]
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * EPS[dtype], atol=8 * EPS[dtype])


# ---- 6. torch's errors for bad inputs ---------------------------------------------------------
def _bad_sdpa_calls():
    q, k, v = _qkv(torch.float32)
    return {
        "mixed q/k dtypes": ((q, k.half(), v), {}),
        "mixed v dtype": ((q, k, v.bfloat16()), {}),
        "attn_mask 1-D bool": ((q, k, v), dict(attn_mask=torch.ones(7, dtype=torch.bool))),
        "attn_mask 1-D float": ((q, k, v), dict(attn_mask=torch.zeros(7))),
        "attn_mask 0-D": ((q, k, v), dict(attn_mask=torch.tensor(True))),
        "attn_mask int": ((q, k, v), dict(attn_mask=torch.ones(5, 7, dtype=torch.int64))),
        "attn_mask float64": ((q, k, v), dict(attn_mask=torch.zeros(5, 7, dtype=torch.float64))),
        "attn_mask 5-D": ((q, k, v), dict(attn_mask=torch.zeros(1, 2, 3, 5, 7))),
        "attn_mask shape": ((q, k, v), dict(attn_mask=torch.zeros(4, 7))),
        "query 1-D": ((torch.randn(8), k, v), {}),
        "int64 inputs": ((q.long(), k.long(), v.long()), {}),
        "key head dim": ((q, torch.randn(2, 3, 7, 9), v), {}),
        "heads": ((q, torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)), {}),
        "gqa heads": ((q, torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)), dict(enable_gqa=True)),
        "batch": ((q, torch.randn(3, 3, 7, 8), torch.randn(3, 3, 7, 8)), {}),
        "scale str": ((q, k, v), dict(scale="a")),
        "dropout 1.5": ((q, k, v), dict(dropout_p=1.5)),
        "query list": (([1.0], k, v), {}),
        "attn_mask list": ((q, k, v), dict(attn_mask=[[True]])),
    }


@pytest.mark.parametrize("case", list(_bad_sdpa_calls()))
def test_sdpa_raises_as_torch(case):
    args, kwargs = _bad_sdpa_calls()[case]
    with pytest.raises(Exception) as theirs:
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        sdpa(*args, **kwargs)
    assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)
    if "attn_mask" in case:
        assert "attn_mask" in str(ours.value)
    if "dtype" in case:
        assert "query" in str(ours.value) and "key" in str(ours.value)


# ---- 7. meta tensors --------------------------------------------------------------------------
def test_sdpa_on_meta_matches_torchs_meta_result():
    for shape, kw in [((2, 3, 5, 7, 8), {}), ((1, 4, 3, 6, 16), dict(is_causal=True))]:
        q, k, v = (t.to("meta") for t in _qkv(torch.bfloat16, shape))
        got = sdpa(q, k, v, **kw)
        want = F.scaled_dot_product_attention(q, k, v, **kw)
        assert got.device.type == "meta"
        assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride())
    q = torch.empty(2, 3, 5, 8, device="meta")
    out, lse = imgtx_fast.attention(q, q, q, return_lse=True)
    assert out.shape == (2, 3, 5, 8) and lse.shape == (2, 3, 5) and lse.dtype == torch.float32


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_built_on_meta(batch_first):
    with torch.device("meta"):
        mha = MultiheadAttention(32, 4, batch_first=batch_first, kdim=24, vdim=20)
    assert mha.in_proj_weight is None and mha.q_proj_weight.device.type == "meta"
    shape = (2, 5) if batch_first else (5, 2)
    q = torch.empty(*shape, 32, device="meta")
    k = torch.empty(shape[0] + 1, 2, 24, device="meta") if not batch_first else torch.empty(2, 6, 24, device="meta")
    v = torch.empty(*k.shape[:2], 20, device="meta")
    kpm = torch.zeros(2, 6, dtype=torch.bool, device="meta")
    for kwargs in ({}, dict(key_padding_mask=kpm)):
        out, w = mha(q, k, v, need_weights=False, **kwargs)
        assert out.device.type == "meta" and out.shape == (*shape, 32) and w is None


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("ema", [False, True])
def test_vector_quantizer_built_on_meta(training, ema):
    with torch.device("meta"):
        vq = VectorQuantizer(64, 8, ema=ema, dead_code_threshold=1.0 if training else 0).train(training)
    z = torch.empty(2, 8, 4, 5, device="meta")
    z_q, loss, (perplexity, _, indices) = vq(z)
    assert z_q.shape == z.shape and z_q.device.type == "meta"
    assert loss.shape == () and perplexity.shape == () and indices.shape == (40,)
    assert indices.dtype == torch.int64
    out = codebook_lookup(torch.empty(3, 7, 8, device="meta", dtype=torch.bfloat16),
                          torch.empty(64, 8, device="meta", dtype=torch.bfloat16), return_stats=True)
    assert out.indices.shape == (3, 7) and out.quantized.dtype == torch.bfloat16
    assert out.sqdist.dtype == torch.float32 and out.counts.shape == (64,)


# ---- 8. torch.func ----------------------------------------------------------------------------
def _loss(fn, mask=None):
    def f(q, k, v):
        return (fn(q, k, v, attn_mask=mask) * torch.linspace(-1, 1, v.shape[-1], dtype=q.dtype)).sum()
    return f


def _fused_scalar_cases():
    q, k, v = _qkv(torch.float32, (1, 2, 3, 5, 4), seed=5)
    return q, k, v


@pytest.mark.parametrize("fn_name", ["sdpa", "attention"])
def test_torch_func_grad_and_jacrev(fn_name):
    fn = sdpa if fn_name == "sdpa" else (lambda q, k, v, attn_mask=None: imgtx_fast.attention(q, k, v, attn_mask=attn_mask))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) < 0.8
    mask[:, 0] = True
    q, k, v = _fused_scalar_cases()
    want = torch.func.grad(_loss(F.scaled_dot_product_attention, mask), argnums=(0, 1, 2))(
        q.double(), k.double(), v.double())
    # float32 through the fused op against torch's float64
    got = torch.func.grad(_loss(fn, mask), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    jac = torch.func.jacrev(lambda q: fn(q, k, v, attn_mask=mask).sum(-1))(q)
    jac_want = torch.func.jacrev(lambda q: F.scaled_dot_product_attention(
        q, k.double(), v.double(), attn_mask=mask).sum(-1))(q.double())
    torch.testing.assert_close(jac.double(), jac_want, rtol=1e-4, atol=1e-5)
    if fn_name == "sdpa":  # float64 runs torch's own function inside the drop-in: same result
        got64 = torch.func.grad(_loss(fn, mask), argnums=(0, 1, 2))(q.double(), k.double(), v.double())
        for g, w in zip(got64, want):
            torch.testing.assert_close(g, w)


def test_torch_func_vmap():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(3, 2, 2, 5, 8, generator=gen)  # vmapped over dim 0
    k = torch.randn(2, 2, 7, 8, generator=gen)      # shared
    v = torch.randn(2, 7, 2, 8, generator=gen).transpose(1, 2)  # shared, strided
    lengths = torch.tensor([[7, 3], [1, 7], [4, 4]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.func.vmap(sdpa, in_dims=(0, None, None))(q, k, v)
    # the op's vmap rule runs, not torch's per-sample loop (which warns of its cost)
    assert not [w for w in caught if "performance drop" in str(w.message)]
    want = torch.stack([F.scaled_dot_product_attention(q[i], k, v) for i in range(3)])
    torch.testing.assert_close(got, want)
    got = torch.func.vmap(lambda q, n: imgtx_fast.attention(q, k, v, key_lengths=n, causal=True),
                          in_dims=(1, 0), out_dims=1)(q.transpose(0, 1), lengths)
    want = torch.stack([ref.attention(q[i].double(), k.double(), v.double(), key_lengths=lengths[i],
                                      causal=True) for i in range(3)], 1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # per-sample gradients: vmap(grad), the classic use
    grads = torch.func.vmap(torch.func.grad(_loss(sdpa)), in_dims=(0, None, None))(q, k, v)
    for i in range(3):
        torch.testing.assert_close(grads[i], torch.func.grad(_loss(F.scaled_dot_product_attention))(q[i], k, v),
                                   rtol=1e-4, atol=1e-5)


def test_double_backward():
    """Gradients of gradients through the fused op match the float64 reference's (the
    reference is plain torch ops, which autograd differentiates twice)."""
    q, k, v = _qkv(torch.float32, (1, 2, 4, 6, 8), seed=7)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(8)) < 0.8

    def second_order(fn, q, k, v):
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = fn(q, k, v)
        gq, gk, gv = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(gq.square().sum() + (gk * gv).sum(), (q, k, v))

    def refn(q, k, v):
        return ref.attention(q, k, v, attn_mask=mask, causal=True)

    got = second_order(lambda q, k, v: imgtx_fast.attention(q, k, v, attn_mask=mask, causal=True), q, k, v)
    want = second_order(refn, q.double(), k.double(), v.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
    # the drop-in (torch's CPU SDPA has no double backward to compare with)
    got = second_order(lambda q, k, v: sdpa(q, k, v, attn_mask=mask), q, k, v)
    want = second_order(lambda q, k, v: ref.attention(q, k, v, attn_mask=mask),
                        q.double(), k.double(), v.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)
