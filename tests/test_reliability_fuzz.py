"""Property-based fuzzing of every op against its float64 reference (issue 9).

The per-op suites sweep small shapes; here hypothesis draws shapes from 1 to a few thousand,
every supported dtype, strided / sliced / transposed / stride-0 views, extreme values (tiny,
huge, -inf logits, all-masked rows, exact ties) and every CPU code path this machine has.

Budgets are fixed and derandomized, so CI runs the same examples every time:
  test_fuzz[op]       the CI budget (BUDGET below: 200 examples, ~5 s on 2 idle cores)
  test_fuzz_slow[op]  10x that, behind the `slow` marker (pytest -m slow)
IMGTX_FUZZ_SCALE=<float> multiplies both (e.g. 0.2 for a quick sanitizer pass).
"""
import math
import os

import pytest
import torch

from attention_helpers import make_mask, run_forward
from reliability_helpers import skip_slow_unless_requested  # noqa: F401 (autouse fixture)
from imgtx_fast import _C, codebook_lookup
from imgtx_fast.diffusion import (MaskAndReplaceSchedule, posterior_log_probs, posterior_sample,
                                  q_sample, vb_terms)
from imgtx_fast.patterns import Local1d
from imgtx_fast.reference import diffusion as ref_diffusion
from imgtx_fast.reference.codebook import codebook_lookup as ref_codebook

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given = hypothesis.given

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISAS = _C.cpu_isas_available()
# examples per op in CI; the slow run uses 10x
BUDGET = {"codebook": 40, "attention": 40, "posterior_log_probs": 40, "posterior_sample": 25,
          "vb_terms": 30, "q_sample": 25}


def _run(prop, examples: int) -> None:
    n = max(1, int(examples * float(os.environ.get("IMGTX_FUZZ_SCALE", "1"))))
    hypothesis.settings(max_examples=n, deadline=None, derandomize=True, database=None,
                        suppress_health_check=list(hypothesis.HealthCheck))(prop)()


class _isa:
    """Runs the body on one CPU code path (portable / avx2 / avx512), then restores the default."""

    def __init__(self, name):
        self.name, self.prev = name, _C.cpu_isa()

    def __enter__(self):
        _C.set_cpu_isa(self.name)

    def __exit__(self, *exc):
        _C.set_cpu_isa(self.prev)


def _cap(n: int, other: int, limit: int) -> int:
    """n clipped so that n * other <= limit (keeps each example to a few milliseconds)."""
    return max(1, min(n, limit // max(1, other)))


# ---- codebook_lookup -------------------------------------------------------------------------
def _z_view(buf_fn, n, d, layout):
    """(n, d) or (b, m, d) view of a fresh buffer in the given layout; values from buf_fn(shape)."""
    if layout == "transposed":  # (d, n) storage
        return buf_fn((d, n)).T
    if layout == "sliced":  # columns of a wider fused projection
        return buf_fn((n, d + 5))[:, 2:2 + d]
    if layout == "expanded":  # one row repeated with stride 0
        return buf_fn((1, d)).expand(n, d)
    if layout == "bchw":  # (B, C, H*W) permuted to (B, H*W, C)
        b = 2 if n % 2 == 0 else 1
        return buf_fn((b, d, n // b)).permute(0, 2, 1)
    return buf_fn((n, d))


@given(n=st.integers(1, 3000), k=st.integers(1, 2000), d=st.integers(1, 300),
       dtype=st.sampled_from(DTYPES), cb_fp32=st.booleans(), metric=st.sampled_from(["l2", "cosine"]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "bchw"]),
       values=st.sampled_from(["normal", "tiny", "large", "huge", "integers", "duplicates"]),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def _fuzz_codebook(n, k, d, dtype, cb_fp32, metric, layout, values, isa, seed):
    k = _cap(k, d, 200_000)
    n = _cap(n, k * d, 3_000_000)
    g = torch.Generator().manual_seed(seed)
    if values == "huge" and dtype == torch.float16:
        values = "large"  # 1e15 is not an fp16 number
    scale = {"tiny": 1e-3, "large": 1e3, "huge": 1e15}.get(values, 1.0)

    def buf(shape, dt=dtype):
        if values == "integers":  # exact float64 distances: many exact ties
            return torch.randint(-2, 3, shape, generator=g).to(dt)
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dt)

    cb_dtype = torch.float32 if cb_fp32 else dtype
    codebook = buf((k, d), cb_dtype)
    if values == "duplicates":  # repeated codes: ties must go to the lowest index
        codebook = codebook[torch.randint(0, max(1, k // 3), (k,), generator=g)]
    z = _z_view(buf, n, d, layout)
    if values == "duplicates":
        z = codebook[torch.randint(0, k, (n,), generator=g)].to(dtype)  # exact hits
    before = z.clone()
    with _isa(isa):
        out = codebook_lookup(z, codebook, metric=metric, return_stats=True)
    assert torch.equal(z, before), "the op modified z"
    want = ref_codebook(z, codebook, metric)
    lead = z.shape[:-1]
    assert out.indices.shape == lead and out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    if values == "integers" and metric == "l2":  # every distance is exact in float64
        assert torch.equal(out.indices, want[0]), "ties must go to the lowest index"
    else:  # the float64 argmin up to float64 rounding of the distances themselves
        z64, c64 = z.reshape(-1, d).double(), codebook.double()
        if metric == "cosine":
            c64 = torch.nn.functional.normalize(c64, dim=1, eps=1e-12)
            dist = -(z64 @ c64.T)
            slack = 1e-12 * z64.norm(dim=1) + 1e-30
        else:
            dist = (z64 * z64).sum(1, keepdim=True) - 2 * z64 @ c64.T + (c64 * c64).sum(1)
            slack = 1e-9 * ((z64 * z64).sum(1) + (c64 * c64).sum(1).max())
        got = dist.gather(1, out.indices.reshape(-1, 1)).squeeze(1)
        assert (got <= dist.min(1).values + slack).all(), "not the float64 argmin"
    if values == "duplicates":  # identical codes tie exactly: the first of them must win
        flat = out.indices.reshape(-1)
        equal = (codebook[flat][:, None, :] == codebook[None]).all(-1)
        assert torch.equal(equal.int().argmax(1), flat), "ties must go to the lowest index"
    same = out.indices == want[0]
    assert torch.equal(out.quantized[same], want[1][same])
    q64 = out.quantized.double().reshape(-1, d)
    sq = ((z.reshape(-1, d).double() - q64) ** 2).sum(1).reshape(lead)
    torch.testing.assert_close(out.sqdist.double(), sq, rtol=1e-4, atol=1e-6 * scale * scale)
    assert torch.equal(out.counts, torch.bincount(out.indices.reshape(-1), minlength=k))


# ---- attention -------------------------------------------------------------------------------
def _attention_layout(t, layout):
    """The same values in another memory layout (the op must not care)."""
    B, H, N, D = t.shape
    if layout == "bnhd":  # (B, N, H, D) memory, what fused projections produce
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":  # a slice of a larger cache
        big = torch.zeros(B, H + 1, N + 3, D, dtype=t.dtype)
        big[:, 1:, 2:N + 2] = t
        return big[:, 1:, 2:N + 2]
    return t


@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3), Nq=st.integers(1, 2000),
       Nk=st.integers(0, 3000), D=st.sampled_from([1, 3, 8, 17, 32, 64, 100, 128, 256]),
       dtype=st.sampled_from(DTYPES), mode=st.sampled_from(["dense", "causal", "local1d"]),
       mask=st.sampled_from([None, "bool", "add_f32", "add_q"]), lengths=st.booleans(),
       layout=st.sampled_from(["contiguous", "bnhd", "sliced", "stride0_keys"]),
       values=st.sampled_from(["normal", "tiny", "large", "tied_keys", "all_masked_rows"]),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def _fuzz_attention(B, Hkv, group, Nq, Nk, D, dtype, mode, mask, lengths, layout, values, isa, seed):
    H = Hkv * group
    Nk = _cap(Nk, B * H * D, 600_000) if Nk else 0
    Nq = _cap(Nq, B * H * max(Nk, 1) * D, 6_000_000)
    if mode == "local1d":
        Nk = max(Nk, Nq)
    g = torch.Generator().manual_seed(seed)
    scale = {"tiny": 1e-3, "large": 30.0}.get(values, 1.0)  # large: |logits| ~ 1e3 * sqrt(D)
    q = (torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    k = (torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64) * scale).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64).to(dtype)
    if values == "tied_keys" and Nk:  # identical keys: uniform weights over the visible ones
        k = k[:, :, :1].repeat(1, 1, Nk, 1)
    if layout == "stride0_keys" and Nk:
        k, v = k[:, :, :1].expand(B, Hkv, Nk, D), v[:, :, :1].expand(B, Hkv, Nk, D)
    else:
        q, k, v = (_attention_layout(t, layout) for t in (q, k, v))
    kw = {"causal": True} if mode == "causal" else {}
    if mode == "local1d":
        kw["pattern"] = Local1d(1 + seed % 64)
    if lengths:
        kw["key_lengths"] = torch.randint(0, Nk + 1, (B,), generator=g)
    if mask is not None:
        m = make_mask(mask, (B, 1, Nq, Nk), g, dtype, p_visible=0.7)
        if values == "all_masked_rows" and Nq:  # every other query sees no key at all
            hide = False if mask == "bool" else -math.inf
            m = m.clone()
            m[:, :, ::2] = hide
        kw["attn_mask"] = m
    with _isa(isa):
        run_forward(q, k, v, **kw)


# ---- discrete diffusion ----------------------------------------------------------------------
def _logits(B, K, N, dtype, layout, values, g):
    x = torch.randn(B, K, N, generator=g, dtype=torch.float64) * 2
    if values == "large":
        x = x * 5e3  # nearly one-hot, |logits| up to ~6e4 (still an fp16 number)
    elif values == "ties":
        x = torch.randint(-1, 2, (B, K, N), generator=g).double()
    elif values == "neg_inf" and K > 1:  # -inf on about half the classes, never on all of a token
        hide = torch.rand(B, K, N, generator=g) < 0.5
        hide[:, 0] = False
        x = x.masked_fill(hide, -math.inf)
    elif values == "one_hot":
        x = torch.full((B, K, N), -math.inf, dtype=torch.float64)
        x.scatter_(1, torch.randint(0, K, (B, 1, N), generator=g), 0.0)
    x = x.to(dtype)
    if layout == "class_contiguous":
        return x.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    if layout == "strided":
        big = torch.zeros(B, K + 3, 2 * N + 1, dtype=dtype)
        big[:, 1:K + 1, 1::2] = x
        return big[:, 1:K + 1, 1::2]
    if layout == "stride0_tokens":
        return x[:, :, :1].expand(B, K, N)
    return x


DIFFUSION_ARGS = dict(B=st.integers(1, 3), K=st.integers(1, 1500), N=st.integers(1, 2500),
                      T=st.integers(2, 100), dtype=st.sampled_from(DTYPES),
                      layout=st.sampled_from(["token_contiguous", "class_contiguous", "strided",
                                              "stride0_tokens"]),
                      values=st.sampled_from(["normal", "large", "ties", "neg_inf", "one_hot"]),
                      isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))


def _diffusion_case(B, K, N, T, dtype, layout, values, seed, limit=400_000):
    N = _cap(N, B * K, limit)
    g = torch.Generator().manual_seed(seed)
    sched = MaskAndReplaceSchedule(K, T)
    logp = _logits(B, K, N, dtype, layout, values, g)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    t = torch.randint(0, T, (B,), generator=g)
    t[0] = [0, T - 1, int(t[0])][seed % 3]  # the edges of the schedule
    return g, sched, logp, x_t, t


def _reference_log_probs(logp, x_t, coefs, r=None, log_p_uncond=None, guidance_scale=None):
    p = torch.softmax(ref_diffusion.guided_log_p(logp, log_p_uncond, guidance_scale), dim=1)
    if r is not None and r < 1:
        p = ref_diffusion.truncate(p, r)  # ties in index order, as the kernels (diffusion.h)
    return ref_diffusion.posterior_probs(p, x_t, coefs).log()


def _finite_absmax(t) -> float:
    if t is None or t.numel() == 0:
        return 0.0
    t = t.double().abs()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else 0.0


def _tv(a, b):
    return float((a.double() - b.double()).abs().sum(1).max()) / 2 if a.numel() else 0.0


@given(**DIFFUSION_ARGS, guided=st.booleans(), r=st.sampled_from([None, 0.3, 0.86, 1.0]))
def _fuzz_posterior_log_probs(B, K, N, T, dtype, layout, values, isa, seed, guided, r):
    g, sched, logp, x_t, t = _diffusion_case(B, K, N, T, dtype, layout, values, seed)
    kw = dict(truncation_rate=r)
    if guided and values in ("normal", "large"):  # guidance of -inf logits is a NaN by design
        kw.update(guidance_scale=1.5 + seed % 3, log_p_x0_uncond=_logits(B, K, logp.shape[2], dtype, layout, values, g))
    with _isa(isa):
        got = posterior_log_probs(logp, x_t, t, sched, **kw)
    want = _reference_log_probs(logp, x_t, sched.coefs(t, B, "cpu"), r, kw.get("log_p_x0_uncond"),
                                kw.get("guidance_scale"))
    assert got.shape == (B, K + 1, logp.shape[2]) and got.dtype == torch.float32
    # fp32 log-sum-exp: the error in log space is ~ ulp(max |logit|) (docs/reliability.md), so
    # the bound grows with the logits' magnitude (1e-5 for ordinary logits)
    span = max(_finite_absmax(logp), _finite_absmax(kw.get("log_p_x0_uncond")) * 4)
    assert _tv(got.exp(), want.exp()) < 1e-5 + 4 * 2.0**-24 * span
    # impossible classes are exactly -inf; the kernel's log-space result stays finite where the
    # float64 reference underflows (|logit gaps| ~ 1e4), so that direction is checked only
    # below such gaps
    assert not (torch.isneginf(got) & torch.isfinite(want)).any(), "a possible class came out -inf"
    if values != "large":
        assert torch.equal(torch.isneginf(got), torch.isneginf(want))


@given(**DIFFUSION_ARGS, r=st.sampled_from([None, 0.5, 0.9]))
def _fuzz_posterior_sample(B, K, N, T, dtype, layout, values, isa, seed, r):
    g, sched, logp, x_t, t = _diffusion_case(B, K, N, T, dtype, layout, values, seed)
    with _isa(isa):
        a = posterior_sample(logp, x_t, t, sched, torch.Generator().manual_seed(seed), truncation_rate=r)
        b = posterior_sample(logp.contiguous(), x_t, t, sched, torch.Generator().manual_seed(seed),
                             truncation_rate=r)
    assert a.shape == x_t.shape and a.dtype == torch.int64
    assert torch.equal(a, b), "samples depend on the memory layout"
    # every sample has nonzero probability under the float64 reference
    probs = _reference_log_probs(logp, x_t, sched.coefs(t, B, "cpu"), r).exp()
    assert ((a >= 0) & (a <= K)).all()
    assert (probs.gather(1, a[:, None]) > 0).all(), "sampled an impossible class"
    if values == "one_hot":  # at t = 0 the answer is certain
        t0 = t == 0
        assert torch.equal(a[t0], logp.float().argmax(1)[t0])


@given(**DIFFUSION_ARGS)
def _fuzz_vb_terms(B, K, N, T, dtype, layout, values, isa, seed):
    g, sched, logits, x_t, t = _diffusion_case(B, K, N, T, dtype, layout, values, seed, limit=150_000)
    if values == "large":
        logits = (logits.float() / 100).to(dtype)  # |logits| ~ 1e2: the loss itself stays O(1e2)
    N = logits.shape[2]
    x0 = logits.float().argmax(1)  # a class that is never -inf
    keep = torch.rand(B, N, generator=g) < 0.3
    x_t = torch.where(keep, x0, x_t)  # x_t == x0 often, as in training
    x = logits.detach().clone().requires_grad_(values != "one_hot" and values != "neg_inf")
    with _isa(isa):
        lv, la = vb_terms(x, x0, x_t, t, sched)
    coefs = sched.coefs(t, B, "cpu")
    xr = logits.double().requires_grad_(x.requires_grad)
    rv, ra = ref_diffusion.vb_terms(xr, x0, x_t, coefs)
    span = float(logits.float().nan_to_num(0, 0, 0).abs().max()) if logits.numel() else 0.0
    tol = 2e-5 * max(1.0, span)
    torch.testing.assert_close(lv.double(), rv.detach(), rtol=2e-5, atol=tol)
    torch.testing.assert_close(la.double(), ra.detach(), rtol=2e-5, atol=tol)
    if x.requires_grad:
        gv = torch.randn(B, N, generator=g)
        gx, = torch.autograd.grad((lv * gv).sum() + la.sum(), x)
        gr, = torch.autograd.grad((rv * gv.double()).sum() + ra.sum(), xr)
        gtol = 2e-5 if dtype == torch.float32 else 1e-2  # half gradients are stored in half
        torch.testing.assert_close(gx.double(), gr, rtol=gtol, atol=gtol * max(1.0, float(gr.abs().max())))


@given(B=st.integers(1, 4), N=st.integers(1, 4000), K=st.integers(1, 5000), T=st.integers(2, 100),
       index_dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31))
def _fuzz_q_sample(B, N, K, T, index_dtype, layout, isa, seed):
    g = torch.Generator().manual_seed(seed)
    K = min(K, 255) if index_dtype == torch.uint8 else min(K, 32767)
    sched = MaskAndReplaceSchedule(K, T)
    x0 = torch.randint(0, K, (B, N), generator=g).to(index_dtype)
    if layout == "transposed":
        x0 = x0.T.contiguous().T
    elif layout == "sliced":
        x0 = torch.cat([x0, x0], 1)[:, N // 2:N // 2 + N] if N > 1 else x0
    elif layout == "expanded":
        x0 = x0[:1].expand(B, N)
    t = torch.randint(0, T, (B,), generator=g)
    with _isa(isa):
        a = q_sample(x0, t, sched, torch.Generator().manual_seed(seed))
        b = q_sample(x0.long().contiguous(), t, sched, torch.Generator().manual_seed(seed))
    assert a.shape == (B, N) and a.dtype == torch.int64
    assert torch.equal(a, b), "samples depend on the layout or index dtype of x0"
    assert ((a >= 0) & (a <= K)).all()
    A = sched.table[t, 3]  # at t = 0 almost nothing moves (A_0 ~ 1): the sampler reads x0 right
    stay = (a == x0.long()).float().mean(1)
    assert (stay[A > 0.999] > 0.9).all()


PROPS = {"codebook": _fuzz_codebook, "attention": _fuzz_attention,
         "posterior_log_probs": _fuzz_posterior_log_probs, "posterior_sample": _fuzz_posterior_sample,
         "vb_terms": _fuzz_vb_terms, "q_sample": _fuzz_q_sample}


@pytest.mark.parametrize("op", list(PROPS))
def test_fuzz(op):
    _run(PROPS[op], BUDGET[op])


@pytest.mark.slow
@pytest.mark.parametrize("op", list(PROPS))
def test_fuzz_slow(op):
    _run(PROPS[op], 10 * BUDGET[op])
