"""Oracles and tolerances for the fused-attention tests (tests/test_attention.py).

The oracle is imgtx_fast.reference.attention run on float64 copies of the (already rounded)
inputs. The tolerances follow from how the kernel computes (fp32 math, inputs converted exactly,
output rounded once to the input dtype):

* fp32 output. Each logit is a D-term fp32 dot product; its rounding error is a few ulp of the
  logit bound S = |scale| * max_i |q_i| * max_j |k_j| (+ max |additive mask|), i.e. typically
  below 1e-6 * S. A logit error d changes the softmax weights by a relative d, so the output
  moves by at most ~d * max|v|; exp/log, the online-softmax rescaling and the P.V sums add a
  few float32 eps. Hence atol = max|v| * (2e-5 + 1e-6 * S), rtol = 1e-4 (slack of ~10x over
  what an fp32 kernel reaches; a wrong mask, a lost key or a mis-scaled row is orders of
  magnitude larger).
* fp16/bf16 output. The same fp32 error, then one rounding to the dtype: |round(y) - x| <=
  0.5 ulp(y) + |y - x| <= 0.5 eps |x| + (1 + eps) * atol32. We allow rtol = eps (1 ulp, a
  factor 2 over correct rounding) and atol = 2 * atol32 (+ the fp16 subnormal spacing).
* lse (always float32): error ~ the logit error plus a few eps of |lse|: atol = 1e-5 + 1e-6 * S,
  rtol = 1e-5. A query with no visible key must give exactly LSE_EMPTY and exact zeros.
* fp32 gradients: every gradient is a sum of P-weighted products, so its error relative to
  the gradient's own scale is ~ the relative error of P (the logit error) plus a few eps per
  sum: atol = max|grad| * (5e-5 + 2e-6 * S), rtol = 1e-4.
* fp16/bf16 gradients: grad_out is rounded to the dtype, the backward may use the rounded
  output O in delta = rowsum(dO * O) (an error of eps/2 * |dO||O|), and each gradient is
  rounded once: atol = 2 * eps * max|grad|, rtol = 2 * eps.
"""
import math
import zlib

import torch

from imgtx_fast import attention
from imgtx_fast.ops.fused_attention import attention_op
from imgtx_fast.reference import attention as ref

LSE_EMPTY = ref.LSE_EMPTY
HALF_EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
FP16_SUBNORMAL = 2.0**-24
_SATURATED = 1e30  # additive mask entries at least this large (-inf, finfo.min) only hide keys


# ---- inputs -----------------------------------------------------------------------------------
def gen_for(*params) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across runs and processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def randn(shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_qkv(B, H, Hkv, Nq, Nk, D, Dv=None, *, dtype=torch.float32, gen, scale=1.0):
    Dv = D if Dv is None else Dv
    return (randn((B, H, Nq, D), gen, dtype, scale), randn((B, Hkv, Nk, D), gen, dtype, scale),
            randn((B, Hkv, Nk, Dv), gen, dtype))


def make_mask(kind, shape, gen, q_dtype=torch.float32, p_visible=0.7):
    """bool (True = visible), or additive float (random biases with ~1/4 of the entries -inf)
    in float32 ("add_f32") or in the queries' dtype ("add_q")."""
    visible = torch.rand(shape, generator=gen) < p_visible
    if kind == "bool":
        return visible
    dtype = torch.float32 if kind == "add_f32" else q_dtype
    bias = randn(shape, gen, torch.float64, 2.0)
    hidden = torch.rand(shape, generator=gen) < 0.25
    return bias.masked_fill(hidden, -math.inf).to(dtype)


# ---- oracle -----------------------------------------------------------------------------------
def _with_causal_offset(mask, Nq, Nk, offset):
    """Fold `query i sees keys j <= i + offset` into attn_mask (attention_op's causal_offset)."""
    vis = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + offset
    if mask is None:
        return vis
    if mask.dtype == torch.bool:
        return mask & vis
    return torch.where(vis, mask, torch.tensor(-math.inf, dtype=mask.dtype))


def oracle(q, k, v, *, causal=False, causal_offset=None, key_lengths=None, attn_mask=None,
           pattern=None, scale=None):
    """(out, lse) in float64 from the reference on float64 copies of the inputs."""
    q64, k64, v64 = (t.double() for t in (q, k, v))  # keeps the graph (gradcheck, oracle_grads)
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    if causal_offset is not None:
        mask = _with_causal_offset(mask, q.shape[2], k.shape[2], causal_offset)
    B, H, Nq, _ = q.shape
    if k.shape[2] == 0:  # the reference's amax cannot reduce an empty key axis: no key is seen
        return (q64.new_zeros(B, H, Nq, v.shape[3]),
                q64.new_full((B, H, Nq), LSE_EMPTY))
    return ref.attention(q64, k64, v64, causal=causal, key_lengths=key_lengths, attn_mask=mask,
                         pattern=pattern, scale=scale, return_lse=True)


def visibility(q, k, *, causal=False, causal_offset=None, key_lengths=None, attn_mask=None,
               pattern=None, scale=None):
    """(B, H, Nq, Nk) bool: which logits take part in the softmax (a -inf bias hides a key; a
    finite one, even finfo.min, does not)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    vis = ref.visible_mask(Nq, Nk, causal=causal, pattern=pattern).expand(B, H, Nq, Nk)
    if causal_offset is not None:
        vis = vis & _with_causal_offset(None, Nq, Nk, causal_offset)
    if key_lengths is not None:
        vis = vis & (torch.arange(Nk)[None, :] < key_lengths.long()[:, None])[:, None, None, :]
    if attn_mask is not None:
        vis = vis & (attn_mask if attn_mask.dtype == torch.bool else attn_mask != -math.inf)
    return vis


def oracle_grads(q, k, v, grad_out, **kw):
    """float64 autograd through the reference: (dq, dk, dv)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, _ = oracle(*leaves, **kw)
    return torch.autograd.grad(out, leaves, grad_out.detach().double(), allow_unused=True)


# ---- tolerances -------------------------------------------------------------------------------
def _finite_absmax(t) -> float:
    if t is None or t.numel() == 0:
        return 0.0
    t = t.detach().double().abs()
    t = t[torch.isfinite(t) & (t < _SATURATED)]
    return float(t.max()) if t.numel() else 0.0


def logit_bound(q, k, scale=None, attn_mask=None) -> float:
    """S = |scale| * max_i |q_i|_2 * max_j |k_j|_2 (+ max |finite additive mask|): bounds every
    logit (Cauchy-Schwarz) and sets the size of its fp32 rounding error."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qn = q.detach().double().nan_to_num(0.0, 0.0, 0.0).norm(dim=-1).max()
    kn = k.detach().double().nan_to_num(0.0, 0.0, 0.0).norm(dim=-1).max()
    bound = abs(scale) * float(qn) * float(kn)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        bound += _finite_absmax(attn_mask)
    return bound


def out_tolerance(dtype, v, bound):
    atol = _finite_absmax(v) * (2e-5 + 1e-6 * bound)
    if dtype == torch.float32:
        return atol, 1e-4
    eps = HALF_EPS[dtype]
    return 2 * atol + (FP16_SUBNORMAL if dtype == torch.float16 else 0.0), eps


def lse_tolerance(bound):
    return 1e-5 + 1e-6 * bound, 1e-5


def grad_tolerance(dtype, want, bound):
    scale = _finite_absmax(want)
    if dtype == torch.float32:
        return scale * (5e-5 + 2e-6 * bound), 1e-4
    eps = HALF_EPS[dtype]
    return 2 * eps * scale + (FP16_SUBNORMAL if dtype == torch.float16 else 0.0), 2 * eps


def assert_within(got, want, atol, rtol, what):
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# ---- forward / backward checks ----------------------------------------------------------------
def check_outputs(out, lse, want_out, want_lse, q, k, v, *, empty, scale=None, attn_mask=None,
                  allow_nan=False):
    """Shape/dtype, exact zeros and LSE_EMPTY on the `empty` rows (which see no key), then the
    tolerances."""
    B, H, Nq, _ = q.shape
    assert out.shape == (B, H, Nq, v.shape[3]) and out.dtype == q.dtype, (out.shape, out.dtype)
    assert lse.shape == (B, H, Nq) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    if not allow_nan:
        assert not torch.isnan(out).any(), "NaN in the output"
        assert not torch.isnan(lse).any(), "NaN in the lse"
    assert torch.all(lse[empty] == LSE_EMPTY), "rows that see no key must have lse == LSE_EMPTY"
    assert torch.all(out[empty] == 0), "rows that see no key must be exactly zero"
    bound = logit_bound(q, k, scale, attn_mask)
    atol, rtol = out_tolerance(q.dtype, v, bound)
    assert_within(out, want_out, atol, rtol, "out")
    atol, rtol = lse_tolerance(bound)
    assert_within(lse, want_lse, atol, rtol, "lse")


def call(api, q, k, v, **kw):
    """(out, lse) through imgtx_fast.attention ("attention") or attention_op ("op")."""
    if api == "op":
        return attention_op(q, k, v, **kw)
    return attention(q, k, v, return_lse=True, **kw)


def run_forward(q, k, v, *, api="attention", allow_nan=False, **kw):
    """Runs the op, checks that it left its inputs alone and matches the oracle."""
    before = [t.clone() for t in (q, k, v)]
    mask_before = kw["attn_mask"].clone() if kw.get("attn_mask") is not None else None
    out, lse = call(api, q, k, v, **kw)
    for t, b in zip((q, k, v), before):
        assert torch.equal(t.nan_to_num(), b.nan_to_num()), "the op modified an input"
    if mask_before is not None:
        assert torch.equal(kw["attn_mask"], mask_before), "the op modified attn_mask"
    want_out, want_lse = oracle(q, k, v, **kw)
    empty = ~visibility(q, k, **kw).any(-1)
    check_outputs(out, lse, want_out, want_lse, q, k, v, empty=empty, scale=kw.get("scale"),
                  attn_mask=kw.get("attn_mask"), allow_nan=allow_nan)
    return out, lse


def run_backward(q, k, v, *, gen, api="attention", wrt="qkv", **kw):
    """Gradients of <out, g> for a random g, w.r.t. the tensors named in wrt, vs float64."""
    leaves = {n: t.detach().clone().requires_grad_(n in wrt) for n, t in zip("qkv", (q, k, v))}
    out, _ = call(api, leaves["q"], leaves["k"], leaves["v"], **kw)
    g = randn(out.shape, gen, q.dtype)
    names = [n for n in "qkv" if n in wrt]
    got = torch.autograd.grad(out, [leaves[n] for n in names], g)
    want = dict(zip("qkv", oracle_grads(q, k, v, g, **kw)))
    bound = logit_bound(q, k, kw.get("scale"), kw.get("attn_mask"))
    for n, gr in zip(names, got):
        assert gr.shape == leaves[n].shape and gr.dtype == q.dtype, (n, gr.shape, gr.dtype)
        assert torch.isfinite(gr).all(), f"d{n} is not finite"
        atol, rtol = grad_tolerance(q.dtype, want[n], bound)
        assert_within(gr, want[n], atol, rtol, f"d{n}")
    return dict(zip(names, got))


# ---- an independent statement of the patterns (checks the oracle itself) ------------------------
def spec_visible(q_len, k_len, *, causal=False, pattern=None):
    """(Nq, Nk) bool built key set by key set from docs/specs/local_attention.md, in plain
    Python: query i sits at position p = i + Nk - Nq; keys outside the sequence/image never
    count."""
    from imgtx_fast.patterns import Local1d, Local2d

    vis = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        p = i + k_len - q_len
        if pattern is None:
            keys = range(0, min(p, k_len - 1) + 1) if causal else range(k_len)
        elif isinstance(pattern, Local1d):
            L, b = pattern.block, p // pattern.block
            if pattern.causal:  # own block up to itself + the whole previous block
                keys = range(max(0, (b - 1) * L), p + 1)
            else:
                f = pattern.filter_width
                keys = range(max(0, b * L - f), min(k_len, (b + 1) * L + f))
        else:
            assert isinstance(pattern, Local2d)
            W, Hgt = pattern.width, pattern.height
            (qh, qw), (fh, fw) = pattern.query_shape, pattern.memory_flange
            r, c = divmod(p, W)
            r0, c0 = r // qh * qh, c // qw * qw
            pixels = []
            if pattern.causal:
                pixels += [(rr, cc) for rr in range(r0 - fh, r0)
                           for cc in range(c0 - fw, c0 + qw + fw)]
                pixels += [(rr, cc) for rr in range(r0, r0 + qh) for cc in range(c0 - fw, c0)]
                own = [(rr, cc) for rr in range(r0, r0 + qh) for cc in range(c0, c0 + qw)]
                pixels += own[:own.index((r, c)) + 1]  # tile raster order, up to the query
            else:
                pixels += [(rr, cc) for rr in range(r0 - fh, r0 + qh + fh)
                           for cc in range(c0 - fw, c0 + qw + fw)]
            keys = [rr * W + cc for rr, cc in pixels if 0 <= rr < Hgt and 0 <= cc < W]
        for j in keys:
            if 0 <= j < k_len:
                vis[i, j] = True
    return vis
