"""The public functions call their op's implementation directly for plain CPU tensors without
autograd (ops._launch.eager_fast_path: the custom-op dispatcher costs ~20-40 us per call);
attention with autograd records its kernels as one autograd.Function node of its own (the
custom op's autograd wrapper costs ~100 us a forward and ~150 us a backward). Both routes must
give identical results and gradients, and anything the dispatcher must see (dispatch modes,
functorch transforms, torch.compile) must still take the registered op."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import imgtx_fast
import imgtx_fast.diffusion.sampling as sampling_module
import imgtx_fast.ops.codebook as codebook_module
import imgtx_fast.ops.fused_attention as attention_module
from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_log_probs, posterior_sample, q_sample
from imgtx_fast.ops import _launch

MODULES = (sampling_module, codebook_module, attention_module)


def calls(seed=0):
    """Each public function on small random CPU inputs, with a fresh generator per call."""
    g = torch.Generator().manual_seed(seed)
    sched = MaskAndReplaceSchedule(num_classes=33, num_timesteps=20)
    logp = torch.randn(2, 33, 17, generator=g).log_softmax(1)
    x_t = torch.randint(0, 34, (2, 17), generator=g)
    x0 = torch.randint(0, 33, (2, 17), generator=g)
    z, cb = torch.randn(5, 7, 9, generator=g), torch.randn(13, 9, generator=g)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))
    return {
        "posterior_sample": lambda: posterior_sample(logp, x_t, 7, sched, torch.Generator().manual_seed(1),
                                                     truncation_rate=0.8),
        "posterior_log_probs": lambda: posterior_log_probs(logp, x_t, 7, sched, guidance_scale=2.0,
                                                           log_p_x0_uncond=logp.flip(2)),
        "q_sample": lambda: q_sample(x0, 9, sched, torch.Generator().manual_seed(2)),
        "codebook_lookup": lambda: imgtx_fast.codebook_lookup(z, cb, return_stats=True),
        "attention": lambda: imgtx_fast.attention(q, k, v, causal=True),
    }


def as_tuple(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", sorted(calls()))
def test_fast_path_equals_the_registered_op(name, monkeypatch):
    fast = as_tuple(calls()[name]())
    for module in MODULES:
        monkeypatch.setattr(module, "eager_fast_path", lambda *tensors, **kw: False)
    monkeypatch.setattr(attention_module, "eager_forward", lambda *args, **kwargs: None)  # one-call path
    slow = as_tuple(calls()[name]())
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", ["out", "lse", "both"])
def test_attention_with_autograd_records_one_node_with_the_ops_gradients(loss, monkeypatch):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g).requires_grad_() for _ in range(3))
    mask = torch.rand(11, 11, generator=g) < 0.7
    go, gl = torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, generator=g)

    def run():
        out, lse = imgtx_fast.attention(q, k, v, attn_mask=mask, causal=True, return_lse=True)
        # only the lse, only the output, or both reach the loss (unused gradients are None)
        value = {"out": (out * go).sum(), "lse": (lse * gl).sum(),
                 "both": (out * go).sum() + (lse * gl).sum()}[loss]
        return out, type(out.grad_fn).__name__, torch.autograd.grad(value, (q, k, v))

    out, node, grads = run()
    assert node == "_EagerAttentionBackward"
    assert _launch.eager_fast_path(q, k, v, autograd=True)
    assert not _launch.eager_fast_path(q, k, v)
    for module in MODULES:
        monkeypatch.setattr(module, "eager_fast_path", lambda *tensors, **kw: False)
    out_op, node_op, grads_op = run()
    assert node_op != node  # the registered op's autograd node
    assert out.stride() == out_op.stride() and torch.equal(out, out_op)
    for a, b in zip(grads, grads_op):
        assert torch.equal(a, b)


def test_the_fast_path_is_taken_only_when_nothing_needs_the_dispatcher():
    x = torch.randn(3)
    assert _launch.eager_fast_path(x, None)
    assert not _launch.eager_fast_path(x.requires_grad_())  # autograd
    with torch.no_grad():
        assert _launch.eager_fast_path(x)
    assert not _launch.eager_fast_path(torch.randn(3, device="meta"))
    with FlopCounterMode(display=False):  # a dispatch mode must see the op
        assert not _launch.eager_fast_path(torch.randn(3))
    assert _launch.eager_fast_path(x.detach(), torch.randn(2).requires_grad_(False))
    with torch.no_grad():  # grad mode alone, without an input that requires grad, changes nothing
        assert _launch.eager_fast_path(x.detach())
    assert _launch.eager_fast_path(x, autograd=True)  # a caller that records autograd itself
    with FlopCounterMode(display=False):
        assert not _launch.eager_fast_path(x, autograd=True)


def test_jit_tracing_records_the_registered_op():
    """Under torch.jit.trace the fast path is off, so the trace holds the op (a bypass would leave
    a graph that replays constants)."""
    seen = []

    def f(q, k, v):
        seen.append(_launch.eager_fast_path(q, k, v))
        return imgtx_fast.attention(q, k, v, causal=True)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    traced = torch.jit.trace(f, (q, k, v), check_trace=False)
    assert seen == [False]
    assert "attention_forward" in str(traced.graph)
    q2, k2, v2 = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    assert torch.equal(traced(q2, k2, v2), imgtx_fast.attention(q2, k2, v2, causal=True))


def test_dispatch_modes_still_see_the_ops():
    """Under a dispatch mode the registered ops run (a FlopCounterMode would miss a bypass)."""
    seen = []

    class Record(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        for fn in calls().values():
            fn()
    for op in ("mr_posterior_sample", "mr_posterior_log_probs", "mr_q_sample", "codebook_lookup",
               "attention_forward"):
        assert any(op in s for s in seen), op


@pytest.mark.parametrize("missing", ["_dispatch_stack_len", "_peek_interpreter_stack"])
def test_a_torch_without_a_private_api_takes_the_registered_op(missing, monkeypatch):
    """The fast path's check reads private torch APIs, looked up when the module loads (None
    where torch lacks one); without one of them every call runs through the registered op (the
    public path), with the same results."""
    want = {name: as_tuple(fn()) for name, fn in calls().items()}
    monkeypatch.setattr(_launch, missing, None)
    try:
        _launch.install_torch_hooks()  # the compiled checks read the functions from here
        assert not _launch.eager_fast_path(torch.randn(3))
        for name, fn in calls().items():
            for a, b in zip(as_tuple(fn()), want[name]):
                assert torch.equal(a, b), name
    finally:
        monkeypatch.undo()
        _launch.install_torch_hooks()
    assert _launch.eager_fast_path(torch.randn(3))
