"""The one-call CPU forward (ops.fused_attention.eager_forward over
_C.attention_forward_cpu_call): plain eager CPU calls of imgtx_fast.attention, attention_op and
the SDPA drop-in take it. It must give bitwise the general path's result, decline (never raise,
never write) every call the general path must decide, and be the path such calls actually take.
"""
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import imgtx_fast
import imgtx_fast.nn.functional as nnf
import imgtx_fast.ops.fused_attention as fa
from imgtx_fast import _C, attention
from imgtx_fast.ops import _launch
from imgtx_fast.ops.fused_attention import _NO_CAUSAL, attention_op
from imgtx_fast.testing import emulated_cuda, emulator_available

from attention_helpers import gen_for, make_mask, make_qkv, run_forward

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Counting:
    """Stands in for the module's _C: counts the one-call entry point's calls and whether each
    ran the kernel (True) or declined (False)."""

    def __init__(self):
        self.results = []

    def __getattr__(self, name):
        attr = getattr(_C, name)
        if name != "attention_forward_cpu_call":
            return attr

        def counted(*args):
            r = attr(*args)
            self.results.append(r is not None)
            return r
        return counted


@pytest.fixture
def counting(monkeypatch):
    c = Counting()
    monkeypatch.setattr(fa, "_C", c)
    return c


def general(fn, monkeypatch):
    """fn() with the one-call path switched off: the general path's result."""
    with monkeypatch.context() as m:
        m.setattr(fa, "eager_forward", lambda *a, **k: None)
        m.setattr(nnf, "eager_forward", lambda *a, **k: None)
        return fn()


def assert_same(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype and x.stride() == y.stride()
        assert torch.equal(x, y)


# Calls the one-call path takes: (name, kwargs builder). Odd sizes, GQA, masks of every
# broadcast rank and kind, key_lengths, both causal alignments, strided (non-contiguous) inputs.
def _cases():
    out = []
    for dtype in DTYPES:
        for B, H, Hkv, Nq, Nk, D, Dv in ((1, 1, 1, 1, 1, 1, 1), (2, 4, 2, 7, 13, 8, 5),
                                         (3, 6, 1, 33, 17, 40, 24), (1, 2, 2, 130, 70, 64, 64)):
            for extra in ("none", "causal", "key_lengths", "bool_b11k", "add_q_qk", "bool_full",
                          "add_f32_hqk", "strided"):
                out.append((dtype, (B, H, Hkv, Nq, Nk, D, Dv), extra))
    return out


def _build(dtype, sizes, extra, gen):
    B, H, Hkv, Nq, Nk, D, Dv = sizes
    q, k, v = make_qkv(B, H, Hkv, Nq, Nk, D, Dv, dtype=dtype, gen=gen)
    kw = {}
    if extra == "causal":
        kw["causal"] = True
    elif extra == "key_lengths":
        kw["key_lengths"] = torch.randint(0, Nk + 1, (B,), generator=gen)
    elif extra == "bool_b11k":
        kw["attn_mask"] = make_mask("bool", (B, 1, 1, Nk), gen)
    elif extra == "add_q_qk":
        kw["attn_mask"] = make_mask("add_q", (Nq, Nk), gen, dtype)
    elif extra == "bool_full":
        kw["attn_mask"] = make_mask("bool", (B, H, Nq, Nk), gen)
    elif extra == "add_f32_hqk":
        kw["attn_mask"] = make_mask("add_f32", (H, Nq, Nk), gen)
    elif extra == "strided":  # head-major rows of a fused projection, and a transposed view
        qkv = torch.randn(B, Nq, 3, H, D, generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
        q = qkv[0]
        k = torch.randn(B, Nk, Hkv, D, generator=gen).to(dtype).transpose(1, 2)
    return q, k, v, kw


@pytest.mark.parametrize("dtype,sizes,extra", _cases(), ids=str)
def test_one_call_path_matches_the_general_path_and_the_oracle(dtype, sizes, extra, monkeypatch,
                                                               counting):
    gen = gen_for("eager", dtype, sizes, extra)
    q, k, v, kw = _build(dtype, sizes, extra, gen)
    fast = attention(q, k, v, return_lse=True, **kw)
    assert counting.results == [True], "the call did not take the one-call path"
    assert_same(fast, general(lambda: attention(q, k, v, return_lse=True, **kw), monkeypatch))
    assert_same(fast[0], attention(q, k, v, **kw))  # without the lse: the same output
    run_forward(q, k, v, **kw)  # against the float64 oracle


@pytest.mark.parametrize("offset", [-5, 0, 3, 2**40])
def test_attention_op_causal_offset(offset, monkeypatch, counting):
    q, k, v = make_qkv(2, 3, 3, 9, 12, 16, dtype=torch.float32, gen=gen_for("op", offset))
    fast = attention_op(q, k, v, causal_offset=offset)
    assert counting.results == [True]
    assert_same(fast, general(lambda: attention_op(q, k, v, causal_offset=offset), monkeypatch))
    run_forward(q, k, v, api="op", causal_offset=offset)


SDPA_CALLS = {
    "plain": lambda q, k, v, m: dict(),
    "is_causal": lambda q, k, v, m: dict(is_causal=True),
    "bool_mask": lambda q, k, v, m: dict(attn_mask=m),
    "float_mask": lambda q, k, v, m: dict(attn_mask=torch.zeros(m.shape, dtype=q.dtype).masked_fill(~m, -math.inf)),
    "scale": lambda q, k, v, m: dict(scale=0.3),
    "int_scale": lambda q, k, v, m: dict(scale=2),
}


@pytest.mark.parametrize("name", sorted(SDPA_CALLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_drop_in_matches_torch(name, dtype, counting):
    gen = gen_for("sdpa", name, dtype)
    q, k, v = make_qkv(2, 4, 4, 11, 19, 32, dtype=dtype, gen=gen)
    mask = torch.rand(2, 1, 1, 19, generator=gen) < 0.8
    mask[..., 0] = True  # every query sees a key (torch's CPU kernels give NaN rows otherwise)
    kw = SDPA_CALLS[name](q, k, v, mask)
    got = nnf.scaled_dot_product_attention(q, k, v, **kw)
    assert counting.results == [True]
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          **{n: (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a)
                                             for n, a in kw.items()})
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_sdpa_heads_follow_enable_gqa(counting):
    q, k, v = make_qkv(1, 4, 2, 5, 6, 8, gen=gen_for("gqa"))
    with pytest.raises(RuntimeError):  # torch's own error: heads differ without enable_gqa
        nnf.scaled_dot_product_attention(q, k, v)
    assert counting.results == [False]
    got = nnf.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert counting.results == [False, True]


# Calls the one-call path must decline: the entry point returns False or is never reached, and
# the public function behaves as before (its result or its error).
def _declined():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    return {
        "k of other batch": (q, k[:1], v[:1], {}),
        "k/v lengths differ": (q, k, v[:, :, :5], {}),
        "heads do not divide": (q, k[:, :2], v[:, :2], {}),
        "head dims differ": (q, k[..., :4], v, {}),
        "3-D q": (q[0], k, v, {}),
        "head dim above 256": (torch.randn(1, 1, 2, 257), torch.randn(1, 1, 2, 257), torch.randn(1, 1, 2, 257), {}),
        "no keys": (q, k[:, :, :0], v[:, :, :0], {}),
        "no queries": (q[:, :, :0], k, v, {}),
        "last dim strided": (q[..., ::2], k[..., ::2], v, {}),
        "dtypes differ": (q, k.double(), v, {}),
        "float64": (q.double(), k.double(), v.double(), {}),
        "mask does not broadcast": (q, k, v, {"attn_mask": torch.ones(3, 6, 5, dtype=torch.bool)}),
        "1-D mask": (q, k, v, {"attn_mask": torch.ones(6, dtype=torch.bool)}),
        "int mask": (q, k, v, {"attn_mask": torch.ones(6, 6, dtype=torch.int32)}),
        "key_lengths out of range": (q, k, v, {"key_lengths": torch.tensor([3, 7])}),
        "negative key_lengths": (q, k, v, {"key_lengths": torch.tensor([-1, 2])}),
        "key_lengths of other batch": (q, k, v, {"key_lengths": torch.tensor([3])}),
        "int32 key_lengths": (q, k, v, {"key_lengths": torch.tensor([3, 6], dtype=torch.int32)}),
        # read as int64, (3, 0) would become (3, 5): in range, so only the dtype check declines it
        "int32 key_lengths, in range as int64": (
            q, k, v, {"key_lengths": torch.tensor([3, 0, 5, 0], dtype=torch.int32)[:2]}),
        "NaN scale": (q, k, v, {"scale": float("nan")}),
        "numpy scale": (q, k, v, {"scale": __import__("numpy").float32(0.5)}),
    }


@pytest.mark.parametrize("name", sorted(_declined()))
def test_declined_calls_take_the_general_path(name, monkeypatch, counting):
    q, k, v, kw = _declined()[name]
    try:
        want = general(lambda: attention(q, k, v, return_lse=True, **kw), monkeypatch)
    except Exception as e:  # the general path's error, type and message
        with pytest.raises(type(e)) as got:
            attention(q, k, v, return_lse=True, **kw)
        assert str(got.value) == str(e)
    else:
        assert_same(attention(q, k, v, return_lse=True, **kw), want)
    assert True not in counting.results


def call_entry(q, k, v, key_lengths=None, attn_mask=None, scale=None, causal_offset=_NO_CAUSAL,
               align_end=False, gqa=True, contiguous=False, want_lse=True):
    return _C.attention_forward_cpu_call(q, k, v, causal_offset, align_end, key_lengths, attn_mask,
                                         scale, gqa, contiguous, want_lse)


def test_a_declined_call_allocates_nothing_and_junk_is_declined():
    q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
    bad = torch.tensor([9])  # key_lengths beyond Nk

    class NoEmpty:
        """Stands in for torch.empty_strided: the entry point must not allocate for a call it
        declines."""
        def __call__(self, *a, **kw):
            raise AssertionError("allocated for a declined call")
    try:
        torch_empty = torch.empty_strided
        hooks = _launch_hooks(empty_strided=NoEmpty())
        _C.set_torch_hooks(*hooks)
        assert call_entry(q, k, v, key_lengths=bad) is None
        assert call_entry(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool)) is None
        assert call_entry(q, k, v, scale=float("nan")) is None
        # non-tensor arguments and flags are declined too, never a crash
        for junk in (3, "q", object()):
            assert call_entry(junk, k, v) is None
            assert call_entry(q, k, v, attn_mask=junk) is None
            assert call_entry(q, k, v, key_lengths=junk) is None
        for junk in ("q", object(), 2.5, None):
            assert call_entry(q, k, v, causal_offset=junk) is None
        assert call_entry(None, k, v) is None
    finally:
        _launch.install_torch_hooks()
    assert torch.empty_strided is torch_empty
    with pytest.raises(TypeError, match="11 arguments"):
        _C.attention_forward_cpu_call(q, k, v)


def _launch_hooks(**replace):
    """set_torch_hooks' arguments as _launch installs them, some replaced."""
    names = ("tensor_type", "is_tracing", "peek_interpreter_stack", "dispatch_stack_len",
             "is_grad_enabled", "any_autocast_enabled", "emulator", "get_num_threads",
             "empty_strided", "float_dtypes", "bool_dtype", "int64_dtype")
    values = (torch.Tensor, _launch._is_tracing, _launch._peek_interpreter_stack,
              _launch._dispatch_stack_len, _launch._is_grad_enabled, _launch.any_autocast_enabled,
              _launch.EMULATOR, torch.get_num_threads, torch.empty_strided,
              (torch.float32, torch.float16, torch.bfloat16), torch.bool, torch.int64)
    hooks = dict(zip(names, values))
    assert set(replace) <= set(names)
    hooks.update(replace)
    return tuple(hooks[n] for n in names)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("want_lse", [False, True])
def test_the_entry_allocates_the_output_as_asked(contiguous, want_lse):
    """out (B, H, Nq, Dv) contiguous, or over (B, Nq, H, Dv) memory; lse (B, H, Nq) float32 or
    None; align_end adds Nk - Nq to the causal offset; the thread count is torch's."""
    gen = gen_for("entry alloc", contiguous, want_lse)
    q, k, v = make_qkv(2, 4, 2, 5, 9, 16, 8, dtype=torch.bfloat16, gen=gen)
    out, lse = call_entry(q, k, v, causal_offset=0, align_end=True, contiguous=contiguous,
                          want_lse=want_lse)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 5, 8)
    want_strides = (160, 40, 8, 1) if contiguous else (160, 8, 32, 1)
    assert out.stride() == want_strides
    assert (lse is None) == (not want_lse)
    if want_lse:
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, 5) and lse.is_contiguous()
    want, want_lse_ = attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out, want)
    if want_lse:
        assert torch.equal(lse, want_lse_)


def test_the_backward_entry_takes_plain_calls_and_declines_the_rest(monkeypatch):
    """_C.attention_backward_cpu_call: autograd's backward of a plain eager call runs it (the
    op's body never runs), with gradients equal to the op's body's; a call it cannot take
    (wrong shapes, dtypes or layouts, junk, the emulator or the reference backend) returns
    False and writes nothing."""
    gen = gen_for("eager backward")
    q, k, v = (t.requires_grad_() for t in make_qkv(2, 4, 2, 9, 13, 16, 8, gen=gen))
    mask = make_mask("bool", (2, 1, 9, 13), gen)
    g = torch.randn(2, 4, 9, 8, generator=gen)
    out = attention(q, k, v, attn_mask=mask, causal=True)
    want = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)

    def op_body(*args):
        raise AssertionError("the op's body ran")
    monkeypatch.setattr(fa, "_backward_impl", op_body)
    got = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    monkeypatch.undo()

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    o, lse = attention(qd, kd, vd, return_lse=True)
    go = torch.randn_like(o)
    grads = [torch.full_like(t, 7.0) for t in (qd, kd, vd)]

    def call(grad_out=go, grad_lse=None, q_=qd, lse_=lse, dq=grads[0], mask_=None, lengths=None):
        return _C.attention_backward_cpu_call(grad_out, grad_lse, q_, kd, vd, o, lse_, dq, grads[1],
                                              grads[2], mask_, lengths, None, _NO_CAUSAL)
    assert call(grad_out=go[:, :, :5]) is False                     # grad_out shaped unlike out
    assert call(grad_out=go.double()) is False                      # another dtype
    assert call(grad_lse=torch.zeros(2, 4, 8)) is False             # grad_lse shaped unlike lse
    assert call(grad_lse=torch.zeros(2, 9, 4).transpose(1, 2)) is False  # not contiguous
    assert call(lse_=None) is False                                  # the backward needs lse
    assert call(lse_=lse.double()) is False                          # lse must be float32
    assert call(dq=torch.empty(2, 4, 9, 17)) is False                # dq shaped unlike q
    assert call(q_=qd.double()) is False                             # no kernel for float64
    assert call(mask_=torch.ones(2, 1, 9, 13, dtype=torch.int32)) is False  # an int mask
    lengths32 = torch.tensor([9, 0, 5, 0], dtype=torch.int32)[:2]  # (9, 5) if read as int64
    assert call(lengths=lengths32) is False                          # int32 key_lengths
    for junk in (None, 3, "g", object()):
        assert call(grad_out=junk) is False
        assert call(q_=junk) is False
    if emulator_available():
        with emulated_cuda():  # CPU tensors then run the emulated CUDA kernels: not this entry
            assert call() is False
    with imgtx_fast.backend("reference"):
        assert call() is False
    assert all((t == 7).all() for t in grads)
    assert call(mask_=torch.ones(2, 1, 9, 13, dtype=torch.bool)) is True
    want = fa._backward_impl(go, None, qd, kd, vd, o, lse, None, None, fa.pattern_args(None),
                             _NO_CAUSAL, 1 / math.sqrt(16))
    for a, b in zip(grads, want):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="14 arguments"):
        _C.attention_backward_cpu_call(go, None, qd)


def _gates():
    yield "autograd", lambda f: (f(requires_grad=True))
    yield "reference backend", lambda f: _in(imgtx_fast.backend("reference"), f)
    yield "autocast", lambda f: _in(torch.autocast("cpu", dtype=torch.bfloat16), f)
    yield "emulator", lambda f: _in(emulated_cuda(), f)
    yield "dispatch mode", lambda f: _in(FlopCounterMode(display=False), f)
    yield "vmap", lambda f: torch.func.vmap(lambda x: attention(x, x, x))(torch.randn(2, 1, 1, 3, 4))


def _in(ctx, f):
    with ctx:
        return f()


@pytest.mark.parametrize("name,run", list(_gates()), ids=[n for n, _ in _gates()])
def test_what_the_dispatcher_must_see_never_takes_the_one_call_path(name, run, counting):
    if name == "emulator" and not emulator_available():
        pytest.skip("imgtx_fast._C_simt (the CUDA emulator) is not built")

    def f(requires_grad=False):
        q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=requires_grad) for _ in range(3))
        return attention(q, k, v)
    run(f)
    assert True not in counting.results
    f()
    assert counting.results[-1] is True  # and outside the gate, the same call takes it


def test_a_reference_block_in_another_thread_sends_calls_to_the_general_path(counting):
    """backend('reference') is per thread; while one is open anywhere, every call asks
    get_backend() on the general path, and this thread's calls still run the kernels."""
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with imgtx_fast.backend("reference"):
            inside.set()
            leave.wait()

    t = threading.Thread(target=hold)
    t.start()
    inside.wait()
    try:
        q, k, v = (torch.randn(1, 2, 3, 4) for _ in range(3))
        got = attention(q, k, v)
        assert True not in counting.results
        torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v))
    finally:
        leave.set()
        t.join()
    attention(q, k, v)
    assert counting.results[-1] is True


def test_threads_share_the_entry_point():
    """Calls from several Python threads at once (the GIL is released in the kernel)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g) for _ in range(3))
    want = attention(q, k, v)
    errors = []

    def run():
        try:
            for _ in range(20):
                assert torch.equal(attention(q, k, v), want)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
