"""imgtx_fast.models.image_transformer: causality, KV-cache decoding, backends, sampling law."""
import math

import pytest
import torch

from imgtx_fast.models.image_transformer import (ImageTransformer, ImageTransformerConfig,
                                                 from_sequence, to_sequence)
from imgtx_fast.nn.local_attention import KVCache

CONFIGS = {
    # odd sizes: partial query tiles at the right and bottom edges, a flange wider than a tile
    "1d": dict(height=5, width=7, channels=3, attention="local1d", block=16),
    "1d-gray": dict(height=6, width=6, channels=1, attention="local1d", block=8),
    "2d": dict(height=7, width=9, channels=1, attention="local2d", query_shape=(3, 4),
               memory_flange=(2, 5)),
    "2d-rgb": dict(height=6, width=5, channels=3, attention="local2d", query_shape=(2, 6),
                   memory_flange=(1, 3)),
}


def make(name, num_classes=3, seed=0, **over):
    torch.manual_seed(seed)
    cfg = ImageTransformerConfig(**{**CONFIGS[name], "num_classes": num_classes, "dim": 32,
                                    "heads": 4, "depth": 2, **over})
    return ImageTransformer(cfg).eval()


def images(cfg, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, cfg.channels, cfg.height, cfg.width), generator=g).to(torch.uint8)


def labels(model, B):
    return torch.arange(B) % model.config.num_classes if model.config.num_classes else None


def decode_logits(model, seq, y, prefill):
    """Logits (B, N, 256) from the KV-cache path: `prefill` positions as one chunk, then one
    position per step, in generation order."""
    caches = [KVCache() for _ in model.blocks]
    out = torch.empty(seq.shape + (256,))
    order = model.order
    with model._backend():
        if prefill:
            out[:, order[:prefill]] = model._step(seq, order[:prefill], y, caches)
        for g in range(prefill, len(order)):
            out[:, order[g:g + 1]] = model._step(seq, order[g:g + 1], y, caches)
    return out


def test_sequence_layout_interleaves_channels():
    x = torch.arange(2 * 3 * 2 * 2).view(2, 3, 2, 2)
    s = to_sequence(x)
    assert s[0, :3].tolist() == [x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 2, 0, 0]]
    assert torch.equal(from_sequence(s, 3, 2, 2), x)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("prefill", [0, 11])
def test_kv_cache_decoding_equals_full_forward(name, backend, prefill):
    model = make(name)
    model.backend = backend
    x = images(model.config, 3)
    y = labels(model, 3)
    full = model(x, y)
    dec = decode_logits(model, to_sequence(x.long()), y, prefill)
    torch.testing.assert_close(dec, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal_in_generation_order(name):
    """A pixel changes no logit at or before its own generation step; it changes later ones iff
    it is some position's input (2D: the last pixel of a tile is nobody's input -- the paper's
    per-block shift drops it)."""
    model = make(name)
    x = images(model.config, 2)
    y = labels(model, 2)
    seq = to_sequence(x.long())
    order = model.order
    base = model._logits(seq, y)
    N = len(order)
    for g in (0, N // 3, N - 2, N - 1):
        p = order[g]
        s2 = seq.clone()
        s2[:, p] = (s2[:, p] + 101) % 256
        diff = (model._logits(s2, y) - base).abs().amax(dim=(0, 2))
        assert diff[order[:g + 1]].max() == 0
        is_input = bool((model.prev == p).any())
        later = diff[order[g + 1:]]
        assert (later.numel() > 0 and later.max() > 1e-4) == is_input


def test_local2d_shift_is_per_tile():
    """The input of a tile's first pixel is the start vector, never the previous tile's pixel."""
    model = make("2d")
    cfg = model.config
    qh, qw = cfg.query_shape
    rows, cols = cfg.grid
    order, prev = model.order.tolist(), model.prev.tolist()
    for g, p in enumerate(order):
        r, c = divmod(p, cols)
        first = r % qh == 0 and c % qw == 0
        assert prev[p] == (-1 if first else order[g - 1])
    assert sum(v == -1 for v in prev) == math.ceil(rows / qh) * math.ceil(cols / qw)


@pytest.mark.parametrize("name", ["1d", "2d-rgb"])
def test_backends_agree_on_loss_and_gradients(name):
    model = make(name)
    x = images(model.config, 4)
    y = labels(model, 4)
    grads = {}
    for be in ("fast", "reference"):
        model.backend = be
        model.zero_grad()
        loss = model.loss(x, y)
        loss.backward()
        grads[be] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["fast"][0], grads["reference"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["fast"][1], grads["reference"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bits_per_dim_is_the_mean_nll_in_bits():
    model = make("1d")
    x = images(model.config, 5)
    y = labels(model, 5)
    with torch.no_grad():
        logp = model(x, y).log_softmax(-1)
    nll = -logp.gather(-1, to_sequence(x.long())[..., None]).mean()
    assert model.bits_per_dim(x, y, batch_size=2) == pytest.approx(float(nll) / math.log(2), rel=1e-5)


@pytest.mark.parametrize("name", ["1d", "2d"])
def test_cached_and_recomputed_sampling_draw_the_same_images(name):
    model = make(name)
    y = labels(model, 3)
    a = model.sample(y, generator=torch.Generator().manual_seed(5))
    b = model.sample(y, generator=torch.Generator().manual_seed(5), use_cache=False)
    assert a.dtype == torch.uint8 and a.shape == (3, model.config.channels, model.config.height,
                                                  model.config.width)
    assert torch.equal(a, b)
    c = model.sample(y, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)


def chi_square_pvalue(counts, probs, min_expected=5.0):
    """Pearson's test with low-expectation bins merged."""
    n = counts.sum()
    expected = probs * n
    order = torch.argsort(expected, descending=True)
    obs, exp = [], []
    acc_o = acc_e = 0.0
    for i in order.tolist():
        acc_o += float(counts[i])
        acc_e += float(expected[i])
        if acc_e >= min_expected:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        obs[-1] += acc_o
        exp[-1] += acc_e
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    # survival function of chi-square via the regularized gamma function
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_sampled_pixels_follow_the_model_distribution(temperature, backend):
    """The first sampled pixel after a fixed prefix follows softmax(logits / T) exactly."""
    model = make("2d", num_classes=0, seed=3)
    model.backend = backend
    # sharpen the output so the law is not close to uniform over 256 levels
    with torch.no_grad():
        model.to_logits.weight.mul_(20.0)
    B, k = 20000, 5
    prefix = images(model.config, 1).expand(B, -1, -1, -1)
    s = model.sample(batch_size=B, prefix=prefix, prefix_len=k, steps=1, temperature=temperature,
                     generator=torch.Generator().manual_seed(11))
    p = model.order[k]
    drawn = to_sequence(s.long())[:, p]
    with torch.no_grad():
        logits = model(prefix[:1])[0, p]
    probs = torch.softmax(logits.double() / temperature, -1)
    counts = torch.bincount(drawn, minlength=256).double()
    assert chi_square_pvalue(counts, probs) > 1e-4
    # the known prefix is copied, the positions after the sampled one stay 0
    seq = to_sequence(s.long())
    assert torch.equal(seq[:, model.order[:k]], to_sequence(prefix.long())[:, model.order[:k]])
    assert seq[:, model.order[k + 1:]].abs().sum() == 0


def test_training_reduces_the_loss():
    model = make("2d", seed=4)
    model.train()
    x = images(model.config, 8)
    y = labels(model, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = model.loss(x, y)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first


def test_save_load_round_trip(tmp_path):
    model = make("2d-rgb")
    path = tmp_path / "it.pt"
    model.save(path)
    loaded = ImageTransformer.load(path, backend="reference")
    assert loaded.config == model.config and loaded.backend == "reference"
    x = images(model.config, 2)
    torch.testing.assert_close(loaded(x, labels(model, 2)), model(x, labels(model, 2)), atol=1e-5, rtol=1e-5)
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        ImageTransformer.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(attention="global"), ValueError, "attention"),
    (dict(dim=30, heads=4), ValueError, "heads"),
    (dict(height=0), ValueError, "height"),
    (dict(num_classes=-1), ValueError, "num_classes"),
    (dict(dropout=1.0), ValueError, "dropout"),
])
def test_bad_config(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        ImageTransformerConfig(**kwargs)


def test_bad_inputs():
    model = make("2d")
    cfg = model.config
    x = images(cfg, 2)
    y = labels(model, 2)
    with pytest.raises(TypeError, match="images"):
        model.loss(x.float(), y)
    with pytest.raises(ValueError, match="images"):
        model.loss(x[:, :, :-1], y)
    with pytest.raises(ValueError, match="images"):
        model.loss(x.long() + 200, y)
    with pytest.raises(ValueError, match="labels"):
        model.loss(x, y[:1])
    with pytest.raises(ValueError, match="labels"):
        model.loss(x, y + 5)
    with pytest.raises(TypeError, match="labels"):
        model.loss(x, None)
    with pytest.raises(ValueError, match="temperature"):
        model.sample(y, temperature=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        model.sample(y, batch_size=5)
    with pytest.raises(ValueError, match="prefix"):
        model.sample(y, prefix_len=3)
    with pytest.raises(ValueError, match="prefix_len"):
        model.sample(y, prefix=x, prefix_len=10 ** 6)
    uncond = make("2d", num_classes=0)
    with pytest.raises(ValueError, match="batch_size"):
        uncond.sample()
    with pytest.raises(ValueError, match="unconditional"):
        uncond.loss(x, y)
    with pytest.raises(ValueError, match="backend"):
        model.backend = "gpu"
