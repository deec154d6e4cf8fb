"""The Imagen-style model (imgtx_fast.models.imagen): backends agree (outputs and gradients),
text padding is never read, guidance, dynamic thresholding, noise augmentation, the diffusion
math against closed forms, sampling, the cascade, checkpoints, errors, and the demo's command."""
import math

import numpy as np
import pytest
import torch

from imgtx_fast.models.imagen import (GaussianSchedule, ImagenConfig, ImagenDenoiser, ImagenPipeline,
                                      aug_alpha_bar, dynamic_threshold, noise_augment)
from imgtx_fast.models.text_encoder import TextEncoder, WordTokenizer

TEXT_DIM, L = 16, 6
PROMPTS = ["a digit seven", "the number one", "a handwritten zero please now", "nine"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(sr=False, seed=0, **kw):
    args = dict(image_size=8, channels=2, patch_size=2, dim=32, depth=2, heads=4, text_dim=TEXT_DIM,
                num_timesteps=50, low_res_size=4 if sr else 0)
    args.update(kw)
    torch.manual_seed(seed)
    m = ImagenDenoiser(ImagenConfig(**args))
    # the output layer starts at zero (training stability); randomise it so tests see the network
    torch.nn.init.normal_(m.patch_out.weight, std=0.2)
    torch.nn.init.normal_(m.patch_out.bias, std=0.2)
    return m


def _inputs(model, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(B, c.channels, c.image_size, c.image_size, generator=g)
    t = torch.randint(0, c.num_timesteps, (B,), generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    lengths = torch.tensor([L, 2, 4, 1, 5, 3][:B])
    kw = {}
    if c.is_super_resolution:
        kw = dict(low_res=torch.randn(B, c.channels, c.image_size, c.image_size, generator=g),
                  aug_level=torch.rand(B, generator=g))
    return x, t, text, lengths, kw


def _encoder(seed=0):
    return TextEncoder.random(WordTokenizer.from_texts(PROMPTS), d_model=TEXT_DIM, num_layers=1, num_heads=2,
                              max_length=L, seed=seed)


# ----------------------------------------------------------------------------- backends

@pytest.mark.parametrize("sr", [False, True])
def test_fast_and_reference_agree_forward_and_gradients(sr):
    model = _model(sr)
    x, t, text, lengths, kw = _inputs(model)
    drop = torch.tensor([False, True, False])
    res = {}
    for be in ("fast", "reference"):
        model.zero_grad(set_to_none=True)
        model.backend = be
        out = model(x, t, text, lengths, drop_cond=drop, **kw)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        res[be] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (of, gf), (orf, gr) = res["fast"], res["reference"]
    torch.testing.assert_close(of, orf, atol=1e-5, rtol=1e-5)
    assert gf.keys() == gr.keys() and len(gf) == len(list(model.parameters()))  # every weight is used
    for name in gf:
        torch.testing.assert_close(gf[name], gr[name], atol=1e-5, rtol=1e-4, msg=lambda s: f"{name}: {s}")


def test_backend_argument_scopes_the_ops(monkeypatch):
    """model.backend really routes the attention op (the reference twin is called only then)."""
    import imgtx_fast.ops.fused_attention as fa
    calls = []
    real = fa._reference.attention
    monkeypatch.setattr(fa._reference, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model()
    x, t, text, lengths, _ = _inputs(model)
    with torch.no_grad():
        model.backend = "fast"
        model(x, t, text, lengths)
        assert calls == []
        model.backend = "reference"
        model(x, t, text, lengths)
    assert len(calls) == 2 * model.config.depth  # self- and cross-attention per block
    with pytest.raises(ValueError, match="backend"):
        model.backend = "gpu"


# ----------------------------------------------------------------------------- text padding

@pytest.mark.parametrize("be", ["fast", "reference"])
def test_padded_text_is_ignored(be):
    model = _model()
    model.backend = be
    x, t, text, lengths, _ = _inputs(model)
    junk = text.clone()
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    junk[pad] = torch.randn(int(pad.sum()), TEXT_DIM) * 100
    with torch.no_grad():
        a, b = model(x, t, text, lengths), model(x, t, junk, lengths)
        # and the lengths matter: the same junk read as real tokens changes the output
        c = model(x, t, junk, torch.full_like(lengths, L))
    torch.testing.assert_close(a, b, atol=0, rtol=0) if be == "fast" else torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3


def test_padded_keys_are_never_read_by_the_fast_kernel():
    """NaN in the padding: the fused kernel never reads those keys/values (key_lengths), so the
    output stays finite and identical."""
    model = _model()
    model.backend = "fast"
    x, t, text, lengths, _ = _inputs(model)
    nan = text.clone()
    nan[torch.arange(L)[None, :] >= lengths[:, None]] = float("nan")
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, nan, lengths), model(x, t, text, lengths), atol=0, rtol=0)


def test_text_encoder_padding_and_lengths():
    enc = _encoder()
    emb, lengths = enc(PROMPTS)
    assert emb.shape == (4, L, TEXT_DIM) and emb.dtype == torch.float32
    assert lengths.tolist() == [4, 4, L, 2]  # words + eos, the long prompt truncated to L (eos kept)
    ids, mask = enc.tokenize(PROMPTS)
    assert ids[2, -1].item() == WordTokenizer.eos_token_id and ids[3, 2:].eq(0).all()
    # a prompt's embeddings do not depend on what else is in the batch (padding is masked in T5)
    one, _ = enc(PROMPTS[3:])
    torch.testing.assert_close(one[0, :2], emb[3, :2], atol=1e-5, rtol=1e-5)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training  # frozen: no dropout either
    assert WordTokenizer(["a"]).encode("a zebra") == [3, 2, 1]  # unknown word -> unk


def test_text_encoder_from_pretrained_with_a_hugging_face_tokenizer(tmp_path):
    """The real-weights path, offline: a T5 encoder and a (word-level) Hugging Face tokenizer
    saved to a local folder and loaded back with from_pretrained."""
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "digit": 4, "seven": 5}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    T5EncoderModel(TextEncoder.t5_config(len(vocab), TEXT_DIM, 1, 2)).save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    enc = TextEncoder.from_pretrained(str(tmp_path), max_length=5)
    emb, lengths = enc(["a digit seven", "seven"])
    assert emb.shape == (2, 5, TEXT_DIM) and lengths.tolist() == [3, 1]
    model = _model()
    x, t, _, _, _ = _inputs(model, B=2)
    with torch.no_grad():
        assert model(x, t, emb, lengths).shape == x.shape
    with pytest.raises(TypeError, match="WordTokenizer"):
        enc.state()  # pretrained encoders are reloaded from their folder, not stored


def test_changing_padded_prompt_tokens_changes_nothing():
    """Prompts of different batches pad differently; the denoiser output of a prompt does not care."""
    enc = _encoder()
    model = _model()
    emb, lengths = enc(PROMPTS)
    ids, mask = enc.tokenize(PROMPTS)
    ids2 = ids.masked_fill(mask == 0, 5)  # padded token ids changed (attention mask unchanged)
    emb2 = enc.model(input_ids=ids2, attention_mask=mask).last_hidden_state
    x, t, _, _, _ = _inputs(model, B=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, emb, lengths), model(x, t, emb2, lengths), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- guidance

@pytest.mark.parametrize("sr", [False, True])
def test_guidance(sr):
    model = _model(sr)
    x, t, text, lengths, kw = _inputs(model)
    B = x.shape[0]
    with torch.no_grad():
        c = model(x, t, text, lengths, **kw)
        u = model(x, t, text, lengths, drop_cond=torch.ones(B, dtype=torch.bool), **kw)
        torch.testing.assert_close(model.guided_output(x, t, text, lengths, 1.0, **kw), c, atol=0, rtol=0)
        torch.testing.assert_close(model.guided_output(x, t, text, lengths, 0.0, **kw), u, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.guided_output(x, t, text, lengths, 4.0, **kw), u + 4.0 * (c - u),
                                   atol=1e-4, rtol=1e-4)
    assert (c - u).abs().max() > 1e-3  # the null condition is a different condition
    # the null condition does not read the text at all
    with torch.no_grad():
        u2 = model(x, t, torch.randn_like(text), lengths, drop_cond=torch.ones(B, dtype=torch.bool), **kw)
    torch.testing.assert_close(u, u2, atol=0, rtol=0)


# ----------------------------------------------------------------------------- math

def _dynamic_threshold_direct(x0: np.ndarray, p: float) -> np.ndarray:
    out = np.empty_like(x0)
    for i in range(len(x0)):
        s = max(np.quantile(np.abs(x0[i]).ravel(), p), 1.0)
        out[i] = np.clip(x0[i], -s, s) / s
    return out


@pytest.mark.parametrize("p", [0.5, 0.9, 0.995, 1.0])
def test_dynamic_threshold_matches_direct(p):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 2, 7, 7, generator=g, dtype=torch.float64) * torch.tensor([0.3, 1, 2, 5, 20.0]).view(5, 1, 1, 1)
    got = dynamic_threshold(x0, p)
    np.testing.assert_allclose(got.numpy(), _dynamic_threshold_direct(x0.numpy(), p), rtol=1e-6, atol=1e-6)
    assert got.abs().max() <= 1.0 + 1e-6
    small = x0[:1] * 0.1  # every |x| < 1: s = 1, untouched
    torch.testing.assert_close(dynamic_threshold(small, p), small)
    with pytest.raises(ValueError, match="percentile"):
        dynamic_threshold(x0, 0.0)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_closed_forms(kind):
    T = 40
    s = GaussianSchedule(T, kind)
    if kind == "cosine":
        f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        want = torch.tensor([min(f(t + 1) / f(0), 1.0) for t in range(T)], dtype=torch.float64)
        torch.testing.assert_close(s.abar[:-1], want[:-1])  # the last beta is clipped at 0.999
    else:
        torch.testing.assert_close(s.betas, torch.linspace(25 * 1e-4, 0.5, T, dtype=torch.float64))
        torch.testing.assert_close(s.abar, torch.cumprod(1 - s.betas, 0))
    assert bool((s.abar[1:] < s.abar[:-1]).all()) and s.abar[-1] < 1e-3
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, T - 1])
    a = s.abar[t].view(3, 1, 1, 1)
    x_t = s.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    for pred in ("eps", "v"):  # the network's target inverts to x0
        torch.testing.assert_close(s.predict_x0(x_t, s.target(x0, noise, t, pred), t, pred), x0)
    torch.testing.assert_close(s.target(x0, noise, t, "v"), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_posterior_closed_forms():
    T = 30
    s = GaussianSchedule(T, "cosine")
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 29, 5])
    # one step: DDPM's posterior (Ho et al. eq. 7)
    mean, var = s.posterior(x0, x_t, t, t - 1)
    b, al, a, ap = s.betas[t], s.alphas[t], s.abar[t], s.abar[t - 1]
    v = lambda z: z.view(-1, 1, 1, 1)  # noqa: E731
    torch.testing.assert_close(mean, v(ap.sqrt() * b / (1 - a)) * x0 + v(al.sqrt() * (1 - ap) / (1 - a)) * x_t)
    torch.testing.assert_close(var, v(b * (1 - ap) / (1 - a)))
    # a jump t -> s: Gaussian conditioning of x_s on x_t given x0 (derived independently)
    sj = torch.tensor([0, 3, 12, -1])
    mean, var = s.posterior(x0, x_t, t, sj)
    A_s = torch.cat([torch.ones(1, dtype=torch.float64), s.abar])[sj + 1]
    ratio = a / A_s
    cov, var_t = ratio.sqrt() * (1 - A_s), 1 - a
    want_mean = v(A_s.sqrt()) * x0 + v(cov / var_t) * (x_t - v(a.sqrt()) * x0)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, v((1 - A_s) - cov ** 2 / var_t))
    torch.testing.assert_close(mean[3], x0[3])  # s = -1: x0 itself, no variance
    assert float(var[3].abs().max()) < 1e-12


def test_noise_augmentation():
    g = torch.Generator().manual_seed(2)
    x, n = torch.randn(4, 1, 6, 6, generator=g), torch.randn(4, 1, 6, 6, generator=g)
    lv = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = noise_augment(x, lv, n)
    gg = torch.cos((lv.double() + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(aug_alpha_bar(lv), gg.clamp(0, 1))
    torch.testing.assert_close(out[0], x[0])  # level 0: clean
    torch.testing.assert_close(out[3], n[3], atol=1e-6, rtol=0)  # level 1: pure noise
    gm = gg[1:3].float().view(2, 1, 1, 1)
    torch.testing.assert_close(out[1:3], gm.sqrt() * x[1:3] + (1 - gm).sqrt() * n[1:3])
    # variance preserving: unit-variance inputs stay unit variance at any level
    big = noise_augment(torch.randn(2000, 64), torch.full((2000,), 0.4), torch.randn(2000, 64))
    assert abs(float(big.var()) - 1.0) < 0.02


def test_sr_stage_uses_the_augmented_low_res_image():
    model = _model(sr=True)
    B = 2
    low = torch.randn(B, 2, 4, 4)
    up = model.upsample(low)
    assert up.shape == (B, 2, 8, 8)
    torch.testing.assert_close(model.augment(low, torch.zeros(B)), up)  # level 0: just upsampled
    noisy = model.augment(low, torch.full((B,), 0.5), torch.Generator().manual_seed(0))
    assert (noisy - up).abs().max() > 0.1
    x, t, text, lengths, _ = _inputs(model, B)
    with torch.no_grad():  # the conditioning image and the level both reach the output
        a = model(x, t, text, lengths, low_res=up, aug_level=0.0)
        b = model(x, t, text, lengths, low_res=noisy, aug_level=0.0)
        c = model(x, t, text, lengths, low_res=up, aug_level=0.5)
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    # training augments the low-res batch itself (levels drawn in [0, max_aug_level])
    loss = model.training_loss(torch.randn(B, 2, 8, 8), text, lengths, low_res=low,
                               generator=torch.Generator().manual_seed(3))
    assert loss.ndim == 0 and torch.isfinite(loss)


# ----------------------------------------------------------------------------- training / sampling

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_reduces_the_loss(prediction):
    model = _model(prediction=prediction, cond_drop_prob=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 8, 8, generator=g) * 2 - 1
    text, lengths = torch.randn(4, L, TEXT_DIM, generator=g), torch.tensor([6, 2, 3, 4])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at(seed):
        return model.training_loss(x0, text, lengths, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        before = sum(float(loss_at(100 + i)) for i in range(8))
    for i in range(40):
        loss = loss_at(i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(loss_at(100 + i)) for i in range(8))
    assert after < 0.8 * before
    # same generator -> the same loss (t, noise, dropout all drawn from it)
    with torch.no_grad():
        assert float(loss_at(5)) == float(loss_at(5))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_shapes_and_determinism(sampler):
    model = _model().eval()
    _, _, text, lengths, _ = _inputs(model)

    def draw(seed, **kw):
        return model.sample(text, lengths, num_steps=5, guidance_scale=2.0, sampler=sampler,
                            generator=torch.Generator().manual_seed(seed), **kw)
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (3, 2, 8, 8) and a.dtype == torch.float32
    assert a.abs().max() <= 1.0
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3
    for th in ("static", "none"):
        assert draw(0, thresholding=th).shape == a.shape
    assert model.sample(text, lengths, num_steps=1).shape == a.shape
    assert model.sample(text, lengths, num_steps=model.config.num_timesteps).shape == a.shape


def test_ddim_is_deterministic_given_the_start_noise_and_backends_agree():
    model = _model().eval()
    _, _, text, lengths, _ = _inputs(model)
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(9))
    outs = {}
    for be in ("fast", "reference"):
        model.backend = be
        outs[be] = model.sample(text, lengths, 6, 3.0, sampler="ddim", noise=noise,
                                generator=torch.Generator().manual_seed(int(be == "fast")))
    torch.testing.assert_close(outs["fast"], outs["reference"], atol=1e-4, rtol=1e-4)


def test_cascade_end_to_end():
    enc = _encoder()
    torch.manual_seed(0)
    base = ImagenDenoiser(ImagenConfig(image_size=4, channels=1, dim=16, depth=1, heads=2, text_dim=TEXT_DIM,
                                       num_timesteps=20))
    sr = ImagenDenoiser(ImagenConfig(image_size=8, channels=1, patch_size=2, low_res_size=4, dim=16, depth=1,
                                     heads=2, text_dim=TEXT_DIM, num_timesteps=20))
    pipe = ImagenPipeline(enc, base, sr).eval()
    seen = {}
    real_sample = ImagenDenoiser.sample

    def spy(self, *a, **kw):
        out = real_sample(self, *a, **kw)
        seen.setdefault("sr" if self is sr else "base", (kw.get("low_res"), out))
        return out
    ImagenDenoiser.sample = spy
    try:
        out = pipe(PROMPTS[:3], num_steps=4, guidance_scale=2.0, sr_aug_level=0.2,
                   generator=torch.Generator().manual_seed(0))
    finally:
        ImagenDenoiser.sample = real_sample
    assert out["base"].shape == (3, 1, 4, 4) and out["sr"].shape == (3, 1, 8, 8)
    assert seen["sr"][0] is seen["base"][1]  # the SR stage is conditioned on the base samples
    again = pipe(PROMPTS[:3], num_steps=4, guidance_scale=2.0, sr_aug_level=0.2,
                 generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["sr"], again["sr"], atol=0, rtol=0)
    pipe.backend = "reference"
    assert base.backend == sr.backend == "reference"
    assert set(ImagenPipeline(enc, base)(PROMPTS[:1], num_steps=2)) == {"base"}


# ----------------------------------------------------------------------------- checkpoints

def test_denoiser_save_load_round_trip(tmp_path):
    model = _model(sr=True)
    path = tmp_path / "sr.pt"
    model.save(path)
    loaded = ImagenDenoiser.load(path, backend="reference")
    assert loaded.config == model.config and loaded.backend == "reference"
    x, t, text, lengths, kw = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, text, lengths, **kw), model(x, t, text, lengths, **kw),
                                   atol=1e-6, rtol=1e-6)
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        ImagenDenoiser.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("half", [False, True])
def test_pipeline_save_load_round_trip(tmp_path, half):
    enc = _encoder()
    base = _model(channels=1, image_size=4, patch_size=1)
    sr = _model(sr=True, channels=1)
    pipe = ImagenPipeline(enc, base, sr)
    pipe.save(tmp_path / "p.pt", half=half)
    loaded = ImagenPipeline.load(tmp_path / "p.pt")
    e1, l1 = enc(PROMPTS)
    e2, l2 = loaded.text_encoder(PROMPTS)
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    assert torch.equal(l1, l2)
    tol = dict(atol=2e-2, rtol=2e-2) if half else dict(atol=0, rtol=0)
    kw = dict(num_steps=3, guidance_scale=2.0, sampler="ddim")
    a = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kw)
    b = loaded(PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(a["sr"], b["sr"], **tol)


# ----------------------------------------------------------------------------- errors

def test_bad_inputs():
    model = _model()
    x, t, text, lengths, _ = _inputs(model)
    with pytest.raises(ValueError, match="x_t must have shape"):
        model(x[:, :1], t, text, lengths)
    with pytest.raises(TypeError, match="x_t must be a floating-point"):
        model(x.long(), t, text, lengths)
    with pytest.raises(ValueError, match="text holds 2 prompts but the images have batch size 3"):
        model(x, t, text[:2], lengths[:2])
    with pytest.raises(ValueError, match="text must be float embeddings"):
        model(x, t, text[..., :3], lengths)
    with pytest.raises(ValueError, match="text_lengths must be in"):
        model(x, t, text, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="text_lengths must be in"):
        model(x, t, text, torch.tensor([1, 1, L + 1]))
    with pytest.raises(TypeError, match="text_lengths"):
        model(x, t, text, lengths.float())
    with pytest.raises(ValueError, match="t must be in"):
        model(x, 50, text, lengths)
    with pytest.raises(ValueError, match="drop_cond"):
        model(x, t, text, lengths, drop_cond=torch.zeros(3))
    with pytest.raises(ValueError, match="only for super-resolution"):
        model(x, t, text, lengths, low_res=x)
    with pytest.raises(ValueError, match="guidance_scale must be >= 0"):
        model.sample(text, lengths, 4, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite"):
        model.sample(text, lengths, 4, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="num_steps"):
        model.sample(text, lengths, 0)
    with pytest.raises(ValueError, match="sampler"):
        model.sample(text, lengths, 2, sampler="euler")
    with pytest.raises(ValueError, match="thresholding"):
        model.sample(text, lengths, 2, thresholding="soft")
    with pytest.raises(ValueError, match="percentile"):
        model.sample(text, lengths, 2, percentile=1.5)
    with pytest.raises(ValueError, match="noise has batch size"):
        model.sample(text, lengths, 2, noise=x[:1])
    sr = _model(sr=True)
    with pytest.raises(ValueError, match="needs low_res"):
        sr(x, t, text, lengths)
    with pytest.raises(ValueError, match=r"low_res must have shape \(B, 2, 4, 4\)"):
        sr.training_loss(x, text, lengths, low_res=x)
    with pytest.raises(ValueError, match="aug_level must be in"):
        sr.sample(text, lengths, 2, low_res=torch.zeros(3, 2, 4, 4), aug_level=1.5)
    with pytest.raises(ValueError, match="low_res has batch size"):
        sr.sample(text, lengths, 2, low_res=torch.zeros(2, 2, 4, 4))
    for bad in (dict(image_size=7, patch_size=2), dict(dim=30, heads=4), dict(prediction="x0"),
                dict(beta_schedule="sqrt"), dict(cond_drop_prob=1.0), dict(low_res_size=16), dict(depth=0)):
        with pytest.raises(ValueError, match="ImagenConfig"):
            ImagenConfig(**{**dict(image_size=8, dim=32, heads=4), **bad})
    with pytest.raises(TypeError, match="config"):
        ImagenDenoiser({"image_size": 8})
    enc = _encoder()
    with pytest.raises(TypeError, match="prompts"):
        enc("a digit seven")
    with pytest.raises(TypeError, match="prompts"):
        enc([1, 2])
    with pytest.raises(ValueError, match="text_dim"):
        ImagenPipeline(enc, _model(text_dim=8))
    with pytest.raises(ValueError, match="low_res_size"):
        ImagenPipeline(enc, _model(channels=2), _model(sr=True, low_res_size=2))
    with pytest.raises(TypeError, match="base"):
        ImagenPipeline(enc, _model(sr=True))


# ----------------------------------------------------------------------------- the demo

def test_demo_train_save_and_main(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("PIL")
    import argparse

    from imgtx_fast.demos import imagen as demo_imagen

    tiny = demo_imagen.ImagenDemoConfig(text_dim=16, text_layers=1, text_heads=2, num_timesteps=50, base_dim=16,
                                        base_depth=1, base_heads=2, base_steps=3, base_batch=8, sr_dim=16,
                                        sr_depth=1, sr_heads=2, sr_steps=2, sr_batch=8, classifier_width=4,
                                        classifier_steps=2, classifier_batch=16)
    parser = argparse.ArgumentParser()
    demo_imagen.add_arguments(parser)
    ckpt = str(tmp_path / "im.pt")
    small = ["--steps", "2", "--per-class", "1", "--eval-per-class", "1", "--timing-batch", "2", "--quiet",
             "--out", str(tmp_path)]
    res = demo_imagen.run(parser.parse_args(["--train", "--checkpoint", ckpt] + small), config=tiny,
                          log=lambda *a: None)
    assert res["samples"] == 10 and 0.0 <= res["sample_acc"] <= 1.0
    assert res["backend_max_abs_diff"] < 1e-2 and res["speedup"] > 0
    assert (tmp_path / "imagen_samples.png").is_file() and (tmp_path / "imagen_base_samples.png").is_file()
    loaded = demo_imagen.load_checkpoint(ckpt)
    assert loaded.config == tiny
    capsys.readouterr()
    assert demo_imagen.main(["--checkpoint", ckpt, "--no-reference"] + small) == 0
    text = capsys.readouterr().out
    for field in ("cascade time, fast", "sample accuracy", "classifier accuracy", "sample grid"):
        assert field in text
    with pytest.raises(FileNotFoundError):
        demo_imagen.load_checkpoint(str(tmp_path / "missing.pt"))


def test_shipped_demo_checkpoint_loads():
    from imgtx_fast.demos import imagen as demo_imagen
    import os

    path = demo_imagen.default_checkpoint()
    if not os.path.isfile(path):
        pytest.skip("no shipped checkpoint (scripts/train_imagen_demo.py writes it)")
    assert os.path.getsize(path) < 5e6
    m = demo_imagen.load_checkpoint(path)
    text, lengths = m.pipeline.text_encoder([demo_imagen.prompt(7), demo_imagen.prompt(1, 3)])
    assert text.shape[0] == 2 and lengths.tolist() == [4, 7]  # words + eos
    assert m.info.get("sample_acc", 0) > 0.5
