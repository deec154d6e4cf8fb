"""KVCache across samples (reset, then another batch size / dtype / device) and under autograd
(inference-only: backward through a cached call raises a clear error, not an in-place one).

Cached decoding is checked against the full sequence in float64: the layer's projections around
the reference attention."""
import pytest
import torch
import torch.nn.functional as F

from imgtx_fast.nn import KVCache, LocalAttention1d, LocalAttention2d
from imgtx_fast.reference import attention as reference

LAYERS = {
    "1d": lambda: LocalAttention1d(16, 2, block=4),
    # partial tiles at the image's edges
    "2d": lambda: LocalAttention2d(16, 2, height=5, width=7, query_shape=(2, 3),
                                   memory_flange=(1, 2)),
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def _length(layer):
    return 19 if isinstance(layer, LocalAttention1d) else layer.pattern.height * layer.pattern.width


def _order(layer, N):
    return torch.arange(N) if isinstance(layer, LocalAttention1d) else layer.generation_order


@torch.no_grad()
def _decode(layer, x, cache, chunk=3):
    """x (B, N, E) in raster order, fed in generation order `chunk` positions at a time; the
    outputs back in raster order."""
    order = _order(layer, x.shape[1])
    xs = x[:, order]
    out = torch.cat([layer(xs[:, i:i + chunk], cache) for i in range(0, xs.shape[1], chunk)], 1)
    return out[:, order.argsort()]


@torch.no_grad()
def _want(layer, x):
    """The full-sequence forward in float64: the layer's projections around the reference
    attention with its pattern."""
    B, N, E = x.shape
    H, hd = layer.num_heads, layer.head_dim
    w = {name: p.double() for name, p in layer.named_parameters()}
    qkv = F.linear(x.double(), w["qkv_proj.weight"], w.get("qkv_proj.bias"))
    q, k, v = qkv.unflatten(-1, (3, H, hd)).unbind(2)
    out = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              pattern=layer.pattern)
    return F.linear(out.transpose(1, 2).reshape(B, N, E), w["out_proj.weight"],
                    w.get("out_proj.bias"))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_reset_takes_another_batch_size_and_dtype(name):
    torch.manual_seed(5)
    layer = LAYERS[name]()
    N = _length(layer)
    cache = KVCache()
    for B, dtype in ((2, torch.float32), (3, torch.float32), (1, torch.bfloat16), (4, torch.float32)):
        layer = layer.to(dtype)
        x = torch.randn(B, N, 16).to(dtype)
        cache.reset()
        with torch.no_grad():  # an abandoned sample of another size, inside a 2D tile
            layer(torch.randn(B + 1, 5, 16).to(dtype), cache)
        cache.reset()
        got = _decode(layer, x, cache)
        assert cache.length == N and cache.k.shape[0] == B and cache.k.dtype == dtype
        torch.testing.assert_close(got.double(), _want(layer, x), **TOL[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reset_takes_another_device():
    torch.manual_seed(7)
    layer = LAYERS["1d"]()
    x = torch.randn(2, 19, 16)
    cache = KVCache()
    _decode(layer, x, cache)
    cache.reset()
    got = _decode(layer.cuda(), x.cuda(), cache)
    assert cache.k.device.type == "cuda"
    torch.testing.assert_close(got.double().cpu(), _want(layer.cpu(), x), **TOL[torch.float32])


def test_mismatch_without_reset_says_reset_and_reset_fixes_it():
    torch.manual_seed(8)
    layer = LAYERS["1d"]()
    cache = KVCache(max_length=32)
    with torch.no_grad():
        layer(torch.randn(2, 4, 16), cache)
        for bad in (torch.randn(3, 1, 16), torch.randn(2, 1, 16).to(torch.bfloat16)):
            with pytest.raises(ValueError, match=r"call reset\(\)"):
                layer.to(bad.dtype)(bad, cache)
            assert cache.length == 4  # the error left the cache as it was
            layer.float()
    cache.reset()  # what the error advises
    x = torch.randn(3, 19, 16)
    torch.testing.assert_close(_decode(layer, x, cache).double(), _want(layer, x),
                               **TOL[torch.float32])
    assert cache.k.shape[2] == 32  # max_length still preallocates


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("max_length", [None, 64])  # grown by reallocation / written in place
def test_backward_through_the_cache_raises_clearly(name, input_grad, max_length):
    """Cached calls run under grad mode (forward only, as before); backward through them raises
    the cache's own error, not autograd's in-place one, however many steps the loss spans."""
    torch.manual_seed(9)
    layer = LAYERS[name]()
    layer.requires_grad_(not input_grad)
    x = torch.randn(2, _length(layer), 16, requires_grad=input_grad)
    order = _order(layer, x.shape[1])
    with torch.no_grad():
        want = _decode(layer, x.detach(), KVCache())[:, order]
    cache, outs = KVCache(max_length), []
    for i in range(0, 9, 3):  # grad mode on
        outs.append(layer(x[:, order][:, i:i + 3], cache))
    assert all(o.requires_grad for o in outs)
    torch.testing.assert_close(torch.cat(outs, 1), want[:, :9], atol=1e-6, rtol=1e-6)
    for loss in (outs[-1].sum(), torch.cat(outs, 1).square().sum()):
        with pytest.raises(RuntimeError, match="KVCache is inference-only.*torch.no_grad"):
            loss.backward(retain_graph=True)


def test_training_runs_the_full_sequence_without_a_cache():
    torch.manual_seed(10)
    layer = LAYERS["1d"]()
    x = torch.randn(2, 19, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.qkv_proj.weight.grad is not None
