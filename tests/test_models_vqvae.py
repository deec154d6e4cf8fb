"""imgtx_fast.models.vqvae (the tokenizer) and imgtx_fast.datasets (digits, image folders)."""
import os

import pytest
import torch

import imgtx_fast
from imgtx_fast.datasets import digits, image_folder
from imgtx_fast.models import VQVAE, VQVAEConfig, train_vqvae
from imgtx_fast.reference import codebook as reference_codebook

try:
    import sklearn  # noqa: F401
    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False
# digits() reads scikit-learn's bundled copy (the `test` extra installs it)
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="needs scikit-learn")

# Small enough that every test here runs in well under a second (except the training run).
TINY = dict(channels=8, norm_groups=4, embed_dim=8, num_codes=32)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return VQVAE(**{**TINY, **kw})


def spread_codebook(model, seed=1):
    """Distinct, well-separated codes (the init's U(-1/K, 1/K) codes are nearly equal, which
    would make 'same tokens on both backends' a test of tie-breaking, not of the model)."""
    g = torch.Generator().manual_seed(seed)
    q = model.quantizer
    q.embedding.weight.data.copy_(torch.randn(q.num_codes, q.dim, generator=g) * 0.5)
    q.embed_sum.copy_(q.embedding.weight.data)
    return model


# ------------------------------------------------------------------ shapes and token grids

@pytest.mark.parametrize("size,mult,grid", [(16, (1, 2, 2), 4), (32, (1, 2, 2), 8),
                                            (32, (1, 2, 2, 2), 4), (16, (1, 2), 8)])
def test_token_grid_and_shapes(size, mult, grid):
    model = tiny_model(channel_mult=mult).eval()
    assert model.config.downsample_factor == size // grid
    x = torch.rand(3, 1, size, size) * 2 - 1
    tokens = model.encode(x)
    assert tokens.shape == (3, grid, grid) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < model.config.num_codes
    images = model.decode_tokens(tokens)
    assert images.shape == x.shape and images.dtype == torch.float32
    recon, loss, stats = model(x)
    assert recon.shape == x.shape and loss.dim() == 0 and torch.isfinite(loss)
    assert set(stats) == {"recon_loss", "commit_loss", "perplexity", "usage"}
    # eval mode: forward's reconstruction is exactly decode(encode(x))
    torch.testing.assert_close(recon, images)


def test_stats_are_the_loss_terms_and_usage():
    model = spread_codebook(tiny_model(recon_loss="l2")).eval()
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    recon, loss, stats = model(x)
    torch.testing.assert_close(stats["recon_loss"], torch.mean((recon - x) ** 2))
    torch.testing.assert_close(loss, stats["recon_loss"] + stats["commit_loss"])
    tokens = model.encode(x)
    used = tokens.unique().numel()
    assert stats["usage"].item() == pytest.approx(used / model.config.num_codes)
    p = torch.bincount(tokens.flatten(), minlength=model.config.num_codes).float() / tokens.numel()
    expected_ppl = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    torch.testing.assert_close(stats["perplexity"], expected_ppl)
    l1 = tiny_model(recon_loss="l1").eval()
    l1.load_state_dict(model.state_dict())
    torch.testing.assert_close(l1(x)[2]["recon_loss"], torch.mean((recon - x).abs()))


def test_encode_leaves_the_ema_codebook_alone_in_training_mode():
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.encode(torch.rand(2, 1, 16, 16))
    for k, v in model.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
    model(torch.rand(2, 1, 16, 16))  # ...whereas a training forward does move it
    assert not torch.equal(model.quantizer.cluster_size, before["cluster_size"])


# ------------------------------------------------------------------ checkpoints

def test_save_load_round_trip(tmp_path):
    model = tiny_model(recon_loss="l2", decay=0.9)
    model.train()
    model(torch.rand(8, 1, 16, 16) * 2 - 1)  # non-trivial EMA buffers to carry over
    model.eval()
    path = tmp_path / "vq.pt"
    model.save(path)
    loaded = VQVAE.load(path, backend="reference")
    assert loaded.config == model.config and loaded.backend == "reference"
    assert not loaded.training
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(lsd) and "quantizer.cluster_size" in sd
    for k in sd:
        assert torch.equal(sd[k], lsd[k]), k
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(model.encode(x), loaded.encode(x))


def test_load_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a VQVAE checkpoint"):
        VQVAE.load(path)


def test_config_dict_round_trip_and_checks():
    cfg = VQVAEConfig(channels=8, channel_mult=[1, 2], norm_groups=4)
    assert cfg.channel_mult == (1, 2)
    assert VQVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VQVAE(cfg.to_dict()).config == cfg
    with pytest.raises(ValueError, match="unknown VQVAEConfig fields"):
        VQVAEConfig.from_dict({**cfg.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="norm_groups"):
        VQVAEConfig(channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="recon_loss"):
        VQVAEConfig(recon_loss="l3")
    with pytest.raises(ValueError, match="channel_mult"):
        VQVAEConfig(channel_mult=())
    with pytest.raises(ValueError, match="num_codes"):
        VQVAEConfig(num_codes=0)
    with pytest.raises(TypeError, match="config"):
        VQVAE("big")


# ------------------------------------------------------------------ backends

def test_fast_and_reference_backends_agree():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    fast = spread_codebook(tiny_model()).eval()
    fast.backend = "fast"
    ref = tiny_model(backend="reference").eval()
    ref.load_state_dict(fast.state_dict())
    tokens = fast.encode(x)
    assert tokens.unique().numel() > 4  # a real assignment, not one code everywhere
    assert torch.equal(tokens, ref.encode(x))
    rf, lf, sf = fast(x)
    rr, lr, sr = ref(x)
    torch.testing.assert_close(rf, rr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sf["perplexity"], sr["perplexity"])


def test_backend_option_reaches_the_op(monkeypatch):
    calls = []
    real = reference_codebook.codebook_lookup

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    # the reference path of codebook_lookup (both its variants) goes through this function
    monkeypatch.setattr(reference_codebook, "codebook_lookup", spy)
    x = torch.rand(2, 1, 16, 16)
    model = tiny_model(backend="fast").eval()
    with imgtx_fast.backend("reference"):  # the model's own choice wins over the thread's
        model(x), model.encode(x)
    assert calls == []
    model.backend = "reference"
    model(x), model.encode(x)
    assert len(calls) == 2
    model.backend = None  # follows the process/thread setting
    with imgtx_fast.backend("reference"):
        model.encode(x)
    assert len(calls) == 3
    model.encode(x)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="backend"):
        model.backend = "cuda"
    with pytest.raises(ValueError, match="backend"):
        tiny_model(backend="slow")


# ------------------------------------------------------------------ gradients and training

def test_gradients_reach_encoder_and_decoder_not_the_ema_codebook():
    model = spread_codebook(tiny_model()).train()
    _, loss, _ = model(torch.rand(4, 1, 16, 16) * 2 - 1)
    loss.backward()
    for name, p in model.named_parameters():
        if name == "quantizer.embedding.weight":
            assert not p.requires_grad and p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # the encoder's gradient passes the quantizer straight through: it depends on the decoder
    enc_w = model.encoder.conv_in.weight
    g1 = enc_w.grad.clone()
    model.zero_grad()
    model.decoder.conv_out.weight.data.mul_(2.0)
    model(torch.rand(4, 1, 16, 16) * 2 - 1)[1].backward()
    assert not torch.allclose(g1, enc_w.grad)


@needs_sklearn
def test_training_on_digits_reduces_reconstruction_error():
    images, _ = digits(16)
    model = tiny_model(seed=0)
    losses = train_vqvae(model, images, steps=200, batch_size=32, lr=3e-3, log_every=0,
                         progress=False)
    assert len(losses) == 200 and not model.training
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.45 * first, (first, last)  # measured: 0.47 -> 0.14
    test_images, _ = digits(16, "test")
    with torch.no_grad():
        _, _, stats = model(test_images)
    # mean |error| on unseen images; the best constant image (the mean digit) scores 0.30,
    # this run measured 0.12
    assert stats["recon_loss"] < 0.2
    assert stats["usage"] > 0.5  # dead-code restarts keep the codebook in use


def test_train_vqvae_checks_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="steps"):
        train_vqvae(model, torch.zeros(4, 1, 16, 16), steps=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train_vqvae(model, torch.zeros(4, 1, 16, 16), steps=1, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="images"):
        train_vqvae(model, torch.zeros(0, 1, 16, 16), steps=1, progress=False)


# ------------------------------------------------------------------ bad model input

def test_bad_images_and_tokens_are_refused():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        model(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="x must have shape"):
        model.encode(torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="x: .*multiples of the downsampling factor 4"):
        model.encode(torch.zeros(1, 1, 18, 16))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        model(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="x must be a Tensor"):
        model.encode([[0.0]])
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 32\)"):
        model.decode_tokens(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 32\)"):
        model.decode_tokens(torch.full((1, 4, 4), -1))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        model.decode_tokens(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        model.decode_tokens(torch.zeros(16, dtype=torch.int64))
    assert model.decode_tokens(torch.zeros(1, 4, 4, dtype=torch.int32)).shape == (1, 1, 16, 16)


# ------------------------------------------------------------------ digits

@needs_sklearn
@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_and_range(size):
    images, labels = digits(size, "all")
    assert images.shape == (1797, 1, size, size) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(labels.unique().tolist()) == list(range(10))


@needs_sklearn
def test_digits_values_are_sklearns():
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = digits(8, "all")
    expected = torch.as_tensor(d.images, dtype=torch.float32) / 8.0 - 1.0
    assert torch.equal(images[:, 0], expected)
    assert torch.equal(labels, torch.as_tensor(d.target, dtype=torch.int64))
    # the upsampled set is a smooth version of the same images: pooling it back is close,
    # much closer than to the mirrored images (an upsampling that scrambles pixels fails)
    up, _ = digits(16, "all")
    pooled = torch.nn.functional.avg_pool2d(up, 2)
    err = (pooled - images).abs().mean()
    assert err < 0.2 and err < 0.5 * (pooled - images.flip(-1)).abs().mean()


@needs_sklearn
def test_digits_split_is_a_deterministic_stratified_partition():
    (tr, ytr), (te, yte) = digits(8, "train"), digits(8, "test")
    assert torch.equal(tr, digits(8, "train")[0]) and torch.equal(yte, digits(8, "test")[1])
    assert len(tr) + len(te) == 1797 and len(te) == 359
    everything, _ = digits(8, "all")
    as_rows = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
    assert as_rows(torch.cat([tr, te])) == as_rows(everything)  # disjoint and complete
    all_counts = torch.bincount(digits(8, "all")[1])
    assert (torch.bincount(yte) - all_counts * 0.2).abs().max() <= 0.5  # every class in test
    other, _ = digits(8, "test", seed=1)
    assert not torch.equal(other, te)
    assert len(digits(8, "test", test_fraction=0.5)[0]) == 898


@needs_sklearn
def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        digits(4)
    with pytest.raises(ValueError, match="size"):
        digits("16")
    with pytest.raises(ValueError, match="split"):
        digits(16, "val")
    with pytest.raises(ValueError, match="test_fraction"):
        digits(16, test_fraction=1.0)


# ------------------------------------------------------------------ image folders

def write_png(path, size, fill, mode="L"):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, fill).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    write_png(tmp_path / "cat" / "a.png", (12, 12), 255)
    write_png(tmp_path / "cat" / "nested" / "b.png", (12, 12), 0)
    # 20 wide x 10 high: white outer columns, black centre -> the centre crop is all black
    wide = Image.new("L", (20, 10), 255)
    wide.paste(0, (5, 0, 15, 10))
    os.makedirs(tmp_path / "dog")
    wide.save(tmp_path / "dog" / "c.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    write_png(tmp_path / ".hidden" / "d.png", (12, 12), 255)  # ignored
    os.makedirs(tmp_path / "empty")  # no images: not a class

    images, labels, classes = image_folder(tmp_path, 8, return_classes=True)
    assert classes == ["cat", "dog"]
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1] and labels.dtype == torch.int64
    assert torch.all(images[0] == 1.0) and torch.all(images[1] == -1.0)
    assert torch.all(images[2] == -1.0)


def test_image_folder_flat_rgb(tmp_path):
    write_png(tmp_path / "red.png", (6, 6), (255, 0, 0), mode="RGB")
    write_png(tmp_path / "gray.jpg", (6, 6), (128, 128, 128), mode="RGB")
    images, labels = image_folder(str(tmp_path), 4, channels=3)
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [0, 0]
    red = images[1]  # sorted: gray.jpg, red.png
    assert torch.all(red[0] == 1.0) and torch.all(red[1:] == -1.0)
    gray, _ = image_folder(tmp_path, 4)  # grayscale by default
    assert gray.shape == (2, 1, 4, 4)
    assert -1.0 <= gray.min() and gray.max() <= 1.0


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: no such folder"):
        image_folder(tmp_path / "missing", 16)
    write_png(tmp_path / "top.png", (4, 4), 0)
    with pytest.raises(NotADirectoryError, match="path: not a folder"):
        image_folder(tmp_path / "top.png", 16)
    with pytest.raises(ValueError, match="size"):
        image_folder(tmp_path, 0)
    with pytest.raises(ValueError, match="channels"):
        image_folder(tmp_path, 16, channels=2)
    with pytest.raises(TypeError, match="path"):
        image_folder(3, 16)
    write_png(tmp_path / "cls" / "x.png", (4, 4), 0)
    with pytest.raises(ValueError, match="both images and class subfolders"):
        image_folder(tmp_path, 16)
    empty = tmp_path / "empty"
    os.makedirs(empty / "sub")
    with pytest.raises(ValueError, match="path: no images"):
        image_folder(empty, 16)
    broken = tmp_path / "broken"
    os.makedirs(broken)
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        image_folder(broken, 16)
