"""VQ-Diffusion's diffusion transformer: layout, backends, loss/gradients, overfitting, sampling
(determinism, guidance, truncation, exact skip-step jumps), text padding, checkpoints, errors."""
import pytest
import torch

from imgtx_fast import backend
from imgtx_fast.diffusion import TimestepSampler, vb_loss
from imgtx_fast.models.vq_diffusion import (VQDiffusionConfig, VQDiffusionTransformer,
                                            sampling_timesteps)
from imgtx_fast.reference import attention as ref_attention

K, H, W = 12, 3, 4
N = H * W


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors here are tiny: with 2 intra-op threads on a shared 2-core machine torch's OpenMP
    barriers cost up to 100x the work. Threading is tested with the kernels, not here."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _model(condition="class", position="2d", seed=0, **kw):
    args = dict(num_codes=K, height=H, width=W, dim=32, depth=2, heads=4, condition=condition,
                num_classes=3, text_dim=10, position=position, num_timesteps=10)
    args.update(kw)
    torch.manual_seed(seed)
    return VQDiffusionTransformer(VQDiffusionConfig(**args))


def _cond(model, B, gen):
    """A condition for `model`: labels, or padded text embeddings with lengths."""
    cfg = model.config
    if cfg.condition == "class":
        return torch.randint(0, cfg.num_classes, (B,), generator=gen), None
    text = torch.randn(B, 5, cfg.text_dim, generator=gen)
    return text, torch.randint(1, 6, (B,), generator=gen)


def _x_t(B, gen, mask_frac=0.5):
    x = torch.randint(0, K, (B, H, W), generator=gen)
    return torch.where(torch.rand(B, H, W, generator=gen) < mask_frac, torch.full_like(x, K), x)


@pytest.mark.parametrize("condition,position", [("class", "2d"), ("text", "1d")])
def test_forward_is_log_probs_over_k_laid_out_class_contiguous(condition, position):
    gen = torch.Generator().manual_seed(1)
    model = _model(condition, position)
    x, (cond, lengths) = _x_t(3, gen), _cond(model, 3, gen)
    t = torch.tensor([0, 4, 9])
    logp = model(x, t, cond, lengths)
    assert logp.shape == (3, K, N) and logp.dtype == torch.float32
    assert logp.stride(1) == 1  # a (B, N, K) buffer viewed as (B, K, N): what the kernels read
    torch.testing.assert_close(logp.logsumexp(1), torch.zeros(3, N), atol=1e-5, rtol=0)
    torch.testing.assert_close(model(x.flatten(1), t, cond, lengths), logp)  # (B, N) tokens too
    # the timestep and the tokens matter
    assert not torch.allclose(model(x, torch.tensor([9, 4, 0]), cond, lengths), logp)
    assert not torch.allclose(model(x.roll(1, dims=2), t, cond, lengths), logp)


def _count_reference_attention(monkeypatch):
    calls = []
    real = ref_attention.attention
    monkeypatch.setattr(ref_attention, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("condition", ["class", "text"])
def test_fast_and_reference_backends_agree_on_logits_loss_and_grads(condition, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    model = _model(condition)
    x0 = torch.randint(0, K, (4, H, W), generator=gen)
    x_t = torch.where(torch.rand(4, H, W, generator=gen) < 0.5, torch.full_like(x0, K), x0)
    t = torch.tensor([0, 3, 6, 9])
    cond, lengths = _cond(model, 4, gen)
    calls = _count_reference_attention(monkeypatch)
    out = {}
    for name in ("fast", "reference"):
        model.backend = name
        model.zero_grad(set_to_none=True)
        before = len(calls)
        logp = model(x_t, t, cond, lengths)
        with backend(name):
            loss = vb_loss(logp, x0.flatten(1), x_t.flatten(1), t, model.schedule)
        loss.backward()
        used_reference = len(calls) > before
        assert used_reference == (name == "reference")  # the model honours its backend
        out[name] = logp.detach(), loss.detach().float(), [p.grad for p in model.parameters()]
    (lf, sf, gf), (lr, sr, gr) = out["fast"], out["reference"]
    torch.testing.assert_close(lf, lr, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sf, sr, atol=1e-5, rtol=1e-5)
    for a, b in zip(gf, gr):  # None: the null condition, unused without dropout
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3)


def test_backend_none_follows_the_enclosing_backend_block(monkeypatch):
    model = _model()
    gen = torch.Generator().manual_seed(3)
    x, (cond, _) = _x_t(2, gen), _cond(model, 2, gen)
    calls = _count_reference_attention(monkeypatch)
    with torch.no_grad():
        model(x, 5, cond)
        assert not calls
        with backend("reference"):
            model(x, 5, cond)
    assert len(calls) == 2 * model.config.depth  # self + cross attention per block
    model.backend = "fast"
    with torch.no_grad(), backend("reference"):
        model(x, 5, cond)  # an explicit model backend wins
    assert len(calls) == 2 * model.config.depth


@pytest.mark.parametrize("condition,backend_name", [("class", "fast"), ("text", "fast"),
                                                    ("class", "reference")])
def test_loss_is_finite_and_gradients_reach_every_parameter(condition, backend_name):
    model = _model(condition, cond_drop_prob=0.5)
    model.backend = backend_name
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, K, (8, H, W), generator=gen)
    cond, lengths = _cond(model, 8, gen)
    sampler = TimestepSampler(model.config.num_timesteps)
    loss = model.training_loss(x0, cond, sampler, cond_lengths=lengths, generator=gen)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 1e-6, name  # null condition included (dropout p = 0.5)
    if condition == "class":  # the null class row, trained through the condition dropout
        assert model.class_emb.weight.grad[-1].abs().max() > 1e-6
    assert float(sampler.count.sum()) == 8  # the importance sampler saw this batch


def test_training_loss_is_reproducible_and_runs_through_the_given_network():
    model = _model()
    x0 = torch.randint(0, K, (4, H, W), generator=torch.Generator().manual_seed(5))
    cond = torch.tensor([0, 1, 2, 0])
    seen = []

    def network(*args):
        seen.append(args[0].shape)
        return model(*args)

    a = model.training_loss(x0, cond, generator=torch.Generator().manual_seed(6), network=network)
    b = model.training_loss(x0, cond, generator=torch.Generator().manual_seed(6))
    c = model.training_loss(x0, cond, generator=torch.Generator().manual_seed(7))
    assert seen == [(4, N)]
    assert a.item() == b.item() and a.item() != c.item()


def _toy_data():
    """Two classes, each one fixed token grid."""
    gen = torch.Generator().manual_seed(8)
    templates = torch.randint(0, K, (2, H, W), generator=gen)
    return templates


def test_overfits_a_toy_two_class_data_set_and_samples_it():
    templates = _toy_data()
    model = _model(num_classes=2, depth=2, dim=32, cond_drop_prob=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(9)
    sampler = TimestepSampler(model.config.num_timesteps)
    losses = []
    for _ in range(300):
        y = torch.randint(0, 2, (16,), generator=gen)
        loss = model.training_loss(templates[y], y, sampler, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.1 * first, (first, last)
    y = torch.tensor([0, 1] * 8)
    samples = model.sample(y, num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    accuracy = (samples == templates[y]).float().mean()
    assert accuracy > 0.95, accuracy  # the class's own grid, in 4 skip-steps


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_sampling_gives_valid_tokens_and_is_deterministic_given_the_generator(backend_name):
    model = _model("text")
    model.backend = backend_name
    cond, lengths = _cond(model, 3, torch.Generator().manual_seed(10))

    def run(seed, **kw):
        return model.sample(cond, num_steps=5, generator=torch.Generator().manual_seed(seed),
                            cond_lengths=lengths, **kw)

    a = run(0)
    assert a.shape == (3, H, W) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < K  # never MASK
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))
    g = run(0, guidance_scale=3.0, truncation_rate=0.9)
    assert torch.equal(g, run(0, guidance_scale=3.0, truncation_rate=0.9))


def _all_mask_logp(model, cond, drop=None):
    B = cond.shape[0]
    x = torch.full((B, N), K)
    with torch.no_grad():
        return model(x, model.config.num_timesteps - 1, cond, drop_cond=drop)


def test_truncation_and_guidance_reach_the_sampler():
    """One step from all-MASK jumps to x0 ~ p(x0 | x_T): with truncation r -> 0 only the top
    code survives, so the sample is the argmax of the (guided) log-probs for any seed."""
    model = _model(num_classes=3, seed=11)
    with torch.no_grad():  # make the condition matter at init
        model.class_emb.weight.mul_(20)
    y = torch.tensor([0, 1, 2, 1])
    lc = _all_mask_logp(model, y)
    lu = _all_mask_logp(model, y, drop=torch.ones(4, dtype=torch.bool))
    plain = lc.argmax(1).view(4, H, W)
    guided = (lu + 5.0 * (lc - lu)).argmax(1).view(4, H, W)
    assert not torch.equal(plain, guided)  # the check below can tell them apart
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        assert torch.equal(model.sample(y, num_steps=1, truncation_rate=1e-6, generator=gen), plain)
        got = model.sample(y, num_steps=1, guidance_scale=5.0, truncation_rate=1e-6, generator=gen)
        assert torch.equal(got, guided)
    free = [model.sample(y, num_steps=1, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert not torch.equal(free[0], free[1])  # without truncation the step is random


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_skip_step_sampling_calls_the_network_once_per_step(guidance_scale, monkeypatch):
    model = _model(num_timesteps=20)
    calls = []
    real = model._logp
    monkeypatch.setattr(model, "_logp", lambda x, t, *a: calls.append((x.shape[0], t.tolist())) or real(x, t, *a))
    y = torch.tensor([0, 2])
    rows = 2 if guidance_scale == 1.0 else 4  # guidance: condition + null in one batch
    for num_steps, want in ((None, 20), (5, 5), (1, 1)):
        calls.clear()
        model.sample(y, num_steps=num_steps, guidance_scale=guidance_scale,
                     generator=torch.Generator().manual_seed(0))
        assert len(calls) == want
        assert all(r == rows for r, _ in calls)
        assert [t[0] for _, t in calls] == sampling_timesteps(20, want)
    assert sampling_timesteps(20, 5) == [19, 14, 9, 5, 0]


def test_sampling_jumps_exactly_between_visited_timesteps(monkeypatch):
    """Each network call samples x_{t_prev} ~ p(x_{t_prev} | x_t) through posterior_sample's
    exact t_prev jump (tests/test_diffusion_skip_step.py checks the jump itself), between the
    visited timesteps and from the last one straight to x0."""
    import imgtx_fast.models.vq_diffusion as mod

    model = _model(num_timesteps=10)
    calls = []
    real = mod.posterior_sample

    def spy(logp, x, t, sched, generator, **kw):
        calls.append((t, kw["t_prev"]))
        assert sched is model.schedule
        return real(logp, x, t, sched, generator, **kw)

    monkeypatch.setattr(mod, "posterior_sample", spy)
    y = torch.tensor([1, 2])
    model.sample(y, num_steps=4, generator=torch.Generator().manual_seed(0))
    steps = sampling_timesteps(10, 4)
    assert calls == list(zip(steps, steps[1:] + [-1])) == mod.reverse_jumps(steps)
    calls.clear()
    model.sample(y, generator=torch.Generator().manual_seed(0))
    assert calls == [(t, t - 1) for t in range(9, -1, -1)]  # every step: the plain reverse step
    # truncation_rate = 0 (only the most likely code) is accepted, as by posterior_sample
    tokens = model.sample(y, num_steps=2, truncation_rate=0.0, generator=torch.Generator().manual_seed(0))
    assert int(tokens.max()) < K


@pytest.mark.parametrize("backend_name", ["fast", "reference"])
def test_text_padding_equals_the_unpadded_prefix(backend_name):
    model = _model("text")
    model.backend = backend_name
    gen = torch.Generator().manual_seed(13)
    x = _x_t(3, gen)
    text = torch.randn(3, 6, 10, generator=gen) * 3
    lengths = torch.tensor([2, 6, 4])
    t = torch.tensor([1, 5, 8])
    with torch.no_grad():
        padded = model(x, t, text, lengths)
        for b in range(3):
            alone = model(x[b:b + 1], t[b:b + 1], text[b:b + 1, :int(lengths[b])])
            torch.testing.assert_close(padded[b:b + 1], alone, atol=2e-6, rtol=1e-5)
        assert not torch.allclose(padded, model(x, t, text))  # the padding would matter


def test_save_load_round_trip(tmp_path):
    model = _model("text", position="1d", seed=14)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = VQDiffusionTransformer.load(path, backend="reference")
    assert loaded.config == model.config and loaded.backend == "reference"
    gen = torch.Generator().manual_seed(15)
    x, (text, lengths) = _x_t(2, gen), _cond(model, 2, gen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3, text, lengths), model(x, 3, text, lengths),
                                   atol=2e-6, rtol=1e-5)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        VQDiffusionTransformer.load(tmp_path / "other.pt")


def _bad_calls():
    m = _model()
    mt = _model("text")
    x = torch.zeros(2, H, W, dtype=torch.int64)
    y = torch.tensor([0, 1])
    text = torch.zeros(2, 4, 10)
    return [
        (lambda: m(x.float(), 0, y), TypeError, "x_t"),
        (lambda: m(torch.zeros(2, 5, dtype=torch.int64), 0, y), ValueError, "x_t"),
        (lambda: m(x + K + 1, 0, y), ValueError, "x_t"),
        (lambda: m(x, 10, y), ValueError, "t must be"),
        (lambda: m(x, 0, torch.tensor([0, 3])), ValueError, "cond"),
        (lambda: m(x, 0, torch.tensor([0])), ValueError, "cond"),
        (lambda: m(x, 0, y, torch.tensor([1, 1])), ValueError, "cond_lengths"),
        (lambda: m(x, 0, y, drop_cond=torch.tensor([1, 0])), ValueError, "drop_cond"),
        (lambda: mt(x, 0, torch.zeros(2, 4, 9)), ValueError, "cond"),
        (lambda: mt(x, 0, text, torch.tensor([0, 4])), ValueError, "cond_lengths"),
        (lambda: mt(x, 0, text, torch.tensor([1, 5])), ValueError, "cond_lengths"),
        (lambda: mt(x, 0, text, torch.tensor([1.0, 2.0])), TypeError, "cond_lengths"),
        (lambda: m.training_loss(x + K, y), ValueError, "x0_tokens"),  # MASK is not data
        (lambda: m.training_loss(x, y, sampler="uniform"), TypeError, "sampler"),
        (lambda: m.training_loss(x, y, sampler=TimestepSampler(5)), ValueError, "sampler"),
        (lambda: m.sample(y, num_steps=0), ValueError, "num_steps"),
        (lambda: m.sample(y, num_steps=11), ValueError, "num_steps"),
        (lambda: m.sample(y, guidance_scale=float("nan")), ValueError, "guidance_scale"),
        (lambda: m.sample(y, truncation_rate=-0.1), ValueError, "truncation_rate"),
        (lambda: m.sample(torch.tensor([], dtype=torch.int64)), ValueError, "cond"),
        (lambda: setattr(m, "backend", "cuda"), ValueError, "backend"),
        (lambda: VQDiffusionConfig(num_codes=8, height=2, width=2, dim=30, heads=4), ValueError, "heads"),
        (lambda: VQDiffusionConfig(num_codes=0, height=2, width=2), ValueError, "num_codes"),
        (lambda: VQDiffusionConfig(num_codes=8, height=2, width=2, condition="image"), ValueError, "condition"),
        (lambda: VQDiffusionConfig(num_codes=8, height=2, width=2, cond_drop_prob=1.0), ValueError, "cond_drop_prob"),
        (lambda: VQDiffusionConfig(num_codes=8, height=2, width=2, num_timesteps=1), ValueError, "num_timesteps"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_errors_naming_the_argument(case):
    call, exc, name = _bad_calls()[case]
    with pytest.raises(exc, match=name):
        call()
