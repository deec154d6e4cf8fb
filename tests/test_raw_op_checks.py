"""Every raw op (torch.ops.imgtx.*) checks every tensor it reads before any pointer reaches the
kernels: torch.compile and export graphs call the raw ops directly, past the public functions'
checks.

For each op a valid call (checked against the reference twin in float64) and a table built
from it by changing one thing: each dim of each tensor, its dtype, its device (meta: the fake
impl then runs, and must refuse the mix), its layout (sparse), its rank and its strides.
A change must raise TypeError/ValueError naming the argument, or, where the op accepts it (a
free dim, another accepted dtype, strides the kernels take), give the same result. The table
also runs under scripts/sanitize.sh (ASan + UBSan), so a check that is missing shows up as an
out-of-bounds read even where the garbage would look plausible.
"""
import importlib
import math
import pkgutil
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import imgtx_fast.ops
from imgtx_fast import _C, attention
from imgtx_fast.diffusion import MaskAndReplaceSchedule
from imgtx_fast.patterns import Local1d, Local2d
from imgtx_fast.reference import attention as ref_attention
from imgtx_fast.reference import codebook as ref_codebook
from imgtx_fast.reference import diffusion as ref_diffusion

for _mod in pkgutil.iter_modules(imgtx_fast.ops.__path__):  # every op file registers its ops
    importlib.import_module(f"imgtx_fast.ops.{_mod.name}")

NO_CAUSAL = _C.ATTN_NO_CAUSAL
DENSE = [0] * 10
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPES = FLOATS + (torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64)
INT32_MAX = 2**31 - 1


def registered_ops() -> List[str]:
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("imgtx::"))


@dataclass
class Spec:
    """A valid call of one op and what its table may change."""
    args: Dict[str, object]                      # in the op's argument order
    check: Callable[[object, Dict[str, object]], None]  # the valid call's result vs the reference
    dtypes: Dict[str, Tuple[torch.dtype, ...]]   # per tensor argument: the dtypes it accepts alone
    free_dims: Set[Tuple[str, int]] = field(default_factory=set)  # sizes the op leaves free
    free_rank: Set[str] = field(default_factory=set)     # arguments of any rank
    contiguous: Set[str] = field(default_factory=set)    # arguments read as contiguous memory
    extra: List[tuple] = field(default_factory=list)     # (id, arg, new value, exception, match)


def call(op: str, args: Dict[str, object]):
    return getattr(torch.ops.imgtx, op)(*args.values())


def close(got, want, tol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True)


# ---- attention -------------------------------------------------------------------------------
def _attention_inputs(g):
    q = torch.randn(2, 4, 5, 8, generator=g)
    k = torch.randn(2, 2, 6, 8, generator=g)
    v = torch.randn(2, 2, 6, 3, generator=g)  # Dv != D
    key_lengths = torch.tensor([6, 3])
    mask = torch.randn(1, 1, 5, 6, generator=g).expand(2, 4, 5, 6)  # expanded: strides 0
    return q, k, v, key_lengths, mask


def _attention_reference(q, k, v, key_lengths, mask, scale):
    """float64 twin of the causal_offset = Nk - Nq = 1 call (bottom-right causal)."""
    return ref_attention.attention(q.double(), k.double(), v.double(), causal=True,
                                   key_lengths=key_lengths, attn_mask=mask.double(), scale=scale,
                                   return_lse=True)


def attention_forward_spec(g) -> Spec:
    q, k, v, key_lengths, mask = _attention_inputs(g)
    args = dict(q=q, k=k, v=v, key_lengths=key_lengths, attn_mask=mask, pattern=DENSE,
                causal_offset=1, scale=0.3)

    def check(res, a):
        out, lse = _attention_reference(a["q"], a["k"], a["v"], a["key_lengths"], a["attn_mask"], 0.3)
        close(res[0], out)
        close(res[1], lse)

    same = ("q", "k", "v")
    dtypes = {n: (torch.float32,) for n in same}  # q, k and v share one of FLOATS
    dtypes.update(key_lengths=(torch.int64,), attn_mask=FLOATS + (torch.bool,))
    A = args
    extra = [
        ("pattern_short", "pattern", [1, 2], ValueError, r"attention: pattern must be the kernels' list of 10"),
        ("pattern_kind", "pattern", [3] + [0] * 9, ValueError, r"pattern\[0\] \(kind\)"),
        ("pattern_causal_flag", "pattern", [1, 2, 0, 2, 0, 0, 0, 0, 0, 0], ValueError, r"pattern\[3\] \(causal\)"),
        ("local1d_block_0", "pattern", [1, 0, 0, 1, 0, 0, 0, 0, 0, 0], ValueError, r"attention: pattern .*block must be > 0"),
        ("local1d_block_2p31", "pattern", [1, 2**31, 0, 1, 0, 0, 0, 0, 0, 0], ValueError,
         r"attention: pattern .*block must be <= 2\^31 - 1"),
        ("local1d_width_causal", "pattern", [1, 2, 1, 1, 0, 0, 0, 0, 0, 0], ValueError, r"filter_width applies"),
        ("local2d_field_negative", "pattern", [2, 0, 0, 1, 2, 3, 2, 2, -1, 0], ValueError,
         r"attention: pattern .*memory_flange\[0\] must be >= 0"),
        ("local2d_too_small", "pattern", [2, 0, 0, 1, 1, 5, 1, 1, 0, 0], ValueError, r"6 keys do not fit"),
        ("pattern_with_offset", "pattern", [1, 2, 0, 1, 0, 0, 0, 0, 0, 0], ValueError, r"causal_offset"),
        ("mask_broadcastable_only", "attn_mask", A["attn_mask"][:1, :1], ValueError, r"attn_mask expanded"),
        ("scale_nan", "scale", math.nan, ValueError, r"scale is NaN"),
    ]
    return Spec(args, check, dtypes, free_dims={("v", 3)}, contiguous={"key_lengths"}, extra=extra)


def attention_backward_spec(g) -> Spec:
    q, k, v, key_lengths, mask = _attention_inputs(g)
    out, lse = torch.ops.imgtx.attention_forward(q, k, v, key_lengths, mask, DENSE, 1, 0.3)
    grad_out, grad_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    args = dict(grad_out=grad_out, grad_lse=grad_lse, q=q, k=k, v=v, out=out, lse=lse,
                key_lengths=key_lengths, attn_mask=mask, pattern=DENSE, causal_offset=1, scale=0.3)

    def check(res, a):
        leaves = [a[n].double().requires_grad_() for n in ("q", "k", "v")]
        o, l = _attention_reference(*leaves, a["key_lengths"], a["attn_mask"], 0.3)
        loss = (o * a["grad_out"].double()).sum() + (l * a["grad_lse"].double()).sum()
        for got, want in zip(res, torch.autograd.grad(loss, leaves)):
            close(got, want, 1e-4)

    dtypes = {n: (torch.float32,) for n in ("q", "k", "v", "out", "lse")}
    dtypes.update(grad_out=FLOATS, grad_lse=FLOATS, key_lengths=(torch.int64,),
                  attn_mask=FLOATS + (torch.bool,))
    extra = [("pattern_kind", "pattern", [7] + [0] * 9, ValueError, r"pattern\[0\] \(kind\)"),
             ("pattern_with_offset", "pattern", [1, 2, 0, 1, 0, 0, 0, 0, 0, 0], ValueError, r"causal_offset")]
    return Spec(args, check, dtypes, contiguous={"key_lengths"}, extra=extra)


# ---- codebook --------------------------------------------------------------------------------
def codebook_spec(g) -> Spec:
    args = dict(z=torch.randn(3, 4, 8, generator=g), codebook=torch.randn(5, 8, generator=g), metric="l2")

    def check(res, a):
        quantized, sqdist, indices, counts = res
        want = ref_codebook.codebook_lookup(a["z"], a["codebook"], "l2")
        assert torch.equal(indices, want[0]) and torch.equal(counts, want[3])
        assert torch.equal(quantized, want[1])
        close(sqdist, want[2])

    extra = [("metric", "metric", "l1", ValueError, r"metric"),
             ("codebook_empty", "codebook", torch.randn(0, 8), ValueError, r"codebook is empty")]
    return Spec(args, check, {"z": FLOATS, "codebook": FLOATS}, free_dims={("z", 0), ("z", 1), ("codebook", 0)},
                free_rank={"z"}, extra=extra)


# ---- mask-and-replace diffusion --------------------------------------------------------------
K, T, B, N = 6, 10, 2, 5


def _diffusion_inputs(g):
    sched = MaskAndReplaceSchedule(K, T)
    coefs = sched.coefs(torch.tensor([3, 0]), B, torch.device("cpu"))  # t = 0 rows too
    logits = torch.randn(B, K, N, generator=g)
    x0 = torch.randint(0, K, (B, N), generator=g)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    return logits, x0, x_t, coefs


_DIFFUSION_DTYPES = dict(logp=FLOATS, logp_uncond=FLOATS, logits=FLOATS, x0=(torch.int64,),
                         x_t=(torch.int64,), coefs=(torch.float64,), seed=(torch.int64,),
                         grad_vb=FLOATS + (torch.float64,), grad_aux=FLOATS + (torch.float64,),
                         saved=(torch.float64,))


def _class_count_cases(name, t):
    """K outside the kernels' [1, 2^30] (the second with no memory behind it)."""
    huge = torch.zeros(1, 1, 1, dtype=t.dtype).expand(t.shape[0], 2**30 + 1, t.shape[2])
    return [(f"{name}_K0", name, t[:, :0], ValueError, rf"\b{name} must have K in \[1, 2\^30\]"),
            (f"{name}_K_2p30_1", name, huge, ValueError, rf"\b{name} must have K in \[1, 2\^30\]")]


def _posterior_probs(a):
    return ref_diffusion.posterior_log_probs(a["logp"].double(), a["x_t"], a["coefs"],
                                             log_p_uncond=a["logp_uncond"].double(),
                                             guidance_scale=2.0).exp()


def posterior_sample_spec(g) -> Spec:
    logits, _, x_t, coefs = _diffusion_inputs(g)
    args = dict(logp=logits, logp_uncond=torch.randn(B, K, N, generator=g), x_t=x_t, coefs=coefs,
                seed=torch.tensor([1234]), guidance_scale=2.0, truncation_rate=1.0)

    def check(res, a):  # a sample: possible under the float64 posterior, and seeded
        assert res.shape == (B, N) and res.dtype == torch.int64
        assert _posterior_probs(a).gather(1, res[:, None]).gt(0).all()
        assert torch.equal(res, call("mr_posterior_sample", a))

    return Spec(args, check, _DIFFUSION_DTYPES, contiguous={"coefs"},
                extra=_class_count_cases("logp", logits) + _class_count_cases("logp_uncond", logits))


def posterior_log_probs_spec(g) -> Spec:
    logits, _, x_t, coefs = _diffusion_inputs(g)
    args = dict(logp=logits, logp_uncond=torch.randn(B, K, N, generator=g), x_t=x_t, coefs=coefs,
                guidance_scale=2.0, truncation_rate=1.0)

    def check(res, a):
        close(res.exp(), _posterior_probs(a))

    return Spec(args, check, _DIFFUSION_DTYPES, contiguous={"coefs"}, extra=_class_count_cases("logp", logits))


def q_sample_spec(g) -> Spec:
    _, x0, _, coefs = _diffusion_inputs(g)
    args = dict(x0=x0, coefs=coefs, seed=torch.tensor([99]), num_classes=K)

    def check(res, a):
        probs = ref_diffusion.q_sample_probs(a["x0"], a["coefs"], K)
        assert res.shape == a["x0"].shape and probs.gather(1, res[:, None]).gt(0).all()

    extra = [("num_classes_0", "num_classes", 0, ValueError, r"mr_q_sample: num_classes must be in \[1, 2\^30\]"),
             ("num_classes_2p30_1", "num_classes", 2**30 + 1, ValueError, r"num_classes must be in")]
    return Spec(args, check, _DIFFUSION_DTYPES, free_dims={("x0", 1)}, contiguous={"coefs"}, extra=extra)


def _vb_reference(a, logits):
    return ref_diffusion.vb_terms(logits, a["x0"], a["x_t"], a["coefs"])


def vb_terms_spec(g) -> Spec:
    logits, x0, x_t, coefs = _diffusion_inputs(g)
    args = dict(logits=logits, x0=x0, x_t=x_t, coefs=coefs)

    def check(res, a):
        for got, want in zip(res[:2], _vb_reference(a, a["logits"].double())):
            close(got, want, 1e-4)

    return Spec(args, check, _DIFFUSION_DTYPES, free_dims={("logits", 1)}, contiguous={"coefs"},
                extra=_class_count_cases("logits", logits))


def vb_terms_backward_spec(g) -> Spec:
    logits, x0, x_t, coefs = _diffusion_inputs(g)
    _, _, saved = torch.ops.imgtx.mr_vb_terms(logits, x0, x_t, coefs)
    args = dict(grad_vb=torch.randn(B, N, generator=g), grad_aux=torch.randn(B, N, generator=g),
                logits=logits, x0=x0, x_t=x_t, coefs=coefs, saved=saved)

    def check(res, a):
        leaf = a["logits"].double().requires_grad_()
        vb, aux = _vb_reference(a, leaf)
        loss = (vb * a["grad_vb"].double()).sum() + (aux * a["grad_aux"].double()).sum()
        close(res, torch.autograd.grad(loss, leaf)[0], 1e-4)

    return Spec(args, check, _DIFFUSION_DTYPES, free_dims={("logits", 1)},
                contiguous={"coefs", "saved"}, extra=_class_count_cases("logits", logits))


SPECS = {
    "attention_forward": attention_forward_spec,
    "attention_backward": attention_backward_spec,
    "codebook_lookup": codebook_spec,
    "mr_posterior_sample": posterior_sample_spec,
    "mr_posterior_log_probs": posterior_log_probs_spec,
    "mr_q_sample": q_sample_spec,
    "mr_vb_terms": vb_terms_spec,
    "mr_vb_terms_backward": vb_terms_backward_spec,
}


def spec(op: str) -> Spec:
    return SPECS[op](torch.Generator().manual_seed(sum(map(ord, op))))


# ---- the one-change table --------------------------------------------------------------------
def _resized(t, dim, n):
    """t with size n along dim, values taken cyclically from t (so indices stay valid)."""
    return t.index_select(dim, torch.arange(n) % t.shape[dim])


def _restrided(t, how):
    """t's values in another memory layout: 'gapped' (every other element of the last dim of a
    larger buffer) or 'permuted' (dims stored in reverse order)."""
    if how == "gapped":
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]
    dims = list(range(t.dim()))[::-1]
    return t.permute(dims).contiguous().permute(dims)


@dataclass
class Case:
    op: str
    id: str
    arg: str
    change: Callable[[object], object]  # old value -> new value
    expect: Optional[type]              # exception type, or None: the call must succeed
    match: str = ""
    same_result: bool = False           # success must also reproduce the valid call's result

    def __str__(self):
        return f"{self.op}-{self.id}"


def _tensor_cases(op: str, s: Spec) -> List[Case]:
    cases = []
    for name, t in s.args.items():
        if not isinstance(t, torch.Tensor):
            continue
        word = rf"\b{name}\b"
        for d in range(t.dim()):
            free = (name, d) in s.free_dims
            cases.append(Case(op, f"{name}-dim{d}", name, lambda x, d=d: _resized(x, d, x.shape[d] + 1),
                              None if free else ValueError, word))
        for dt in DTYPES:
            if dt != t.dtype:
                ok = dt in s.dtypes[name]
                cases.append(Case(op, f"{name}-{str(dt)[6:]}", name, lambda x, dt=dt: x.to(dt),
                                  None if ok else TypeError, word))
        cases.append(Case(op, f"{name}-meta", name, lambda x: x.to("meta"), ValueError, word))
        cases.append(Case(op, f"{name}-sparse", name, lambda x: x.to_sparse(), TypeError,
                          rf"{word} must be a dense \(strided\) tensor"))
        free = name in s.free_rank
        cases.append(Case(op, f"{name}-rank+1", name, lambda x: x[None], None if free else ValueError, word))
        cases.append(Case(op, f"{name}-rank-1", name, lambda x: x[0], None if free else ValueError, word))
        for how in ("gapped", "permuted"):
            # A (1,)-shaped tensor is contiguous whatever its stride: nothing to refuse.
            refuse = name in s.contiguous and not _restrided(t, how).is_contiguous()
            cases.append(Case(op, f"{name}-{how}", name, lambda x, how=how: _restrided(x, how),
                              ValueError if refuse else None, rf"{word} must be contiguous",
                              same_result=not refuse))
    for cid, name, value, exc, match in s.extra:
        cases.append(Case(op, cid, name, lambda x, value=value: value, exc, match))
    return cases


ALL_CASES = [c for op in SPECS for c in _tensor_cases(op, spec(op))]


def _same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_every_raw_op_has_a_table():
    """A new op without a table fails here."""
    assert registered_ops() == sorted(SPECS)
    assert {c.op for c in ALL_CASES} == set(SPECS)


@pytest.mark.parametrize("op", sorted(SPECS))
def test_valid_call_matches_reference(op):
    s = spec(op)
    s.check(call(op, s.args), s.args)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_one_change(case):
    s = spec(case.op)
    valid = call(case.op, s.args)  # the table's base call succeeds: the cases are not vacuous
    args = dict(s.args)
    args[case.arg] = case.change(args[case.arg])
    if case.expect is None:
        got = call(case.op, args)
        if case.same_result:
            _same(got, valid)
        return
    with pytest.raises(case.expect) as info:
        call(case.op, args)
    assert re.search(case.match, str(info.value)), str(info.value)


def _fake_args(mode, args):
    return {n: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for n, t in args.items()}


@pytest.mark.parametrize("op", sorted(SPECS))
def test_fake_impl_gives_the_real_shapes(op):
    s = spec(op)
    real = call(op, s.args)
    with FakeTensorMode() as mode:
        fake = call(op, _fake_args(mode, s.args))
    for r, f in zip(real if isinstance(real, tuple) else (real,), fake if isinstance(fake, tuple) else (fake,)):
        assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride())


FAKE_CASES = [c for c in ALL_CASES if c.expect is not None and not c.id.endswith(("-sparse", "-meta"))
              and c.id not in ("scale_nan",)]  # NaN is a value: only the kernels see it


@pytest.mark.parametrize("case", FAKE_CASES, ids=str)
def test_fake_impl_refuses_alike(case):
    """The fake impls (what torch.compile traces) run the same checks on shapes and dtypes."""
    s = spec(case.op)
    args = dict(s.args)
    args[case.arg] = case.change(args[case.arg])
    with FakeTensorMode() as mode:
        fake = _fake_args(mode, args)
        with pytest.raises(case.expect) as info:
            call(case.op, fake)
    assert re.search(case.match, str(info.value)), str(info.value)


# ---- sizes past the kernels' int range -------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: Local1d(block=2**63), r"Local1d: block must be <= 2\^31 - 1"),
    (lambda: Local1d(block=2**31), r"Local1d: block must be <= 2\^31 - 1"),
    (lambda: Local1d(block=4, causal=False, filter_width=2**64), r"Local1d: filter_width must be <= 2\^31 - 1"),
    (lambda: Local2d(2**40, 4), r"Local2d: height must be <= 2\^31 - 1"),
    (lambda: Local2d(4, 2**31), r"Local2d: width must be <= 2\^31 - 1"),
    (lambda: Local2d(4, 4, query_shape=(2, 2**63)), r"Local2d: query_shape\[1\] must be <= 2\^31 - 1"),
    (lambda: Local2d(4, 4, memory_flange=2**31), r"Local2d: memory_flange\[0\] must be <= 2\^31 - 1"),
])
def test_pattern_fields_past_the_kernels_range_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_pattern_fields_at_the_kernels_range_match_the_reference():
    """The largest fields the patterns take, including a query tile far wider than the image
    (its in-tile positions would overflow 32 bits unless the tile is cut to the image)."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    for pattern in (Local1d(block=INT32_MAX), Local1d(block=INT32_MAX, causal=False, filter_width=INT32_MAX),
                    Local2d(4, 3, query_shape=(4, 2**30), memory_flange=(0, 0)),
                    Local2d(4, 3, query_shape=(INT32_MAX, INT32_MAX), memory_flange=INT32_MAX),
                    Local2d(4, 3, query_shape=(INT32_MAX, 1), memory_flange=(0, INT32_MAX), causal=False)):
        want = ref_attention.attention(q.double(), k.double(), v.double(), pattern=pattern)
        close(attention(q, k, v, pattern=pattern), want)
        if isinstance(pattern, Local2d):  # the raw op given the fields as they are
            raw = [2, 0, 0, int(pattern.causal), pattern.height, pattern.width,
                   *pattern.query_shape, *pattern.memory_flange]
            out, _ = torch.ops.imgtx.attention_forward(q, k, v, None, None, raw, NO_CAUSAL, 8**-0.5)
            close(out, want)


@pytest.mark.parametrize("offset, keys", [(2**63 - 1, "all"), (2**31 + 5, "all"), (-2**63, "none"),
                                          (NO_CAUSAL - 1, "none"), (-2**31 - 5, "none")])
def test_causal_offsets_past_the_kernels_range(offset, keys):
    """Query i sees keys j <= i + causal_offset: past +-2^31 every offset means all keys or none
    (the kernels' i + offset would overflow int64 near its ends)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    out, lse = torch.ops.imgtx.attention_forward(q, k, v, None, None, DENSE, offset, 0.5)
    if keys == "all":
        close(out, ref_attention.attention(q.double(), k.double(), v.double(), scale=0.5))
    else:
        assert out.eq(0).all() and lse.eq(ref_attention.LSE_EMPTY).all()
