"""The end-to-end demo (imgtx_fast.demos.vq_diffusion, `imgtx-fast demo`): the whole pipeline with
tiny models and a handful of steps (not the quality target: scripts/train_demo.py measures
that), the PNG grid, the report's fields, checkpoints, and `--data` with an image folder."""
import argparse
import dataclasses
import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from imgtx_fast import __main__ as cli  # noqa: E402
from imgtx_fast import demos  # noqa: E402
from imgtx_fast.demos import common, kernels  # noqa: E402
from imgtx_fast.demos import vq_diffusion as demo  # noqa: E402

TINY = demo.DemoConfig(image_size=16, vq_channels=8, vq_embed_dim=8, vq_num_codes=16, vq_steps=4,
                       vq_batch=16, dim=32, depth=1, heads=2, mlp_ratio=2.0, num_timesteps=10,
                       diffusion_steps=4, diffusion_batch=16, classifier_width=4,
                       classifier_steps=4, classifier_batch=32)
FAST_ARGS = ["--steps", "3", "--per-class", "2", "--eval-per-class", "2", "--timing-batch", "4",
             "--quiet"]
TABLE_FIELDS = ["time per image, fast", "time per image, reference", "speed-up",
                "reconstruction error", "codebook usage", "classifier accuracy", "sample accuracy",
                "sample grid"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_default(monkeypatch):
    """Make the CLI build TINY models when it trains (the defaults take minutes)."""
    monkeypatch.setattr(demo, "default_config", lambda: TINY)


def _check_png(path, size):
    from PIL import Image

    assert os.path.isfile(path)
    with Image.open(path) as im:
        assert im.size == size


def test_demo_train_end_to_end_through_the_cli(tmp_path, capsys, tiny_default):
    out = tmp_path / "out"
    assert cli.main(["demo", "--train", "--out", str(out), *FAST_ARGS]) == 0
    text = capsys.readouterr().out
    for name in TABLE_FIELDS:
        assert name in text, name
    # the grid: 10 classes as rows, 2 samples per class, 16x16 images at scale 4, 2 px gaps
    w, h = common.grid_size(10, 2, 16)
    assert (w, h) == (2 + 2 * (64 + 2), 2 + 10 * (64 + 2))
    _check_png(out / "samples.png", (w, h))
    _check_png(out / "reconstructions.png", common.grid_size(2, 4, 16))  # 2 * per_class per row
    # --train saves the models next to the grids, and the demo can load them back
    ckpt = out / "demo.pt"
    assert ckpt.is_file()
    capsys.readouterr()
    assert cli.main(["demo", "--checkpoint", str(ckpt), "--out", str(tmp_path / "again"),
                     "--no-reference", *FAST_ARGS]) == 0
    text = capsys.readouterr().out
    assert "loaded" in text and "skipped" in text
    _check_png(tmp_path / "again" / "samples.png", (w, h))


def test_report_values_are_sane(tmp_path):
    xtr, ytr, xte, yte, classes, _ = common.load_data(None, 16)
    models = demo.train_models(TINY, xtr[:64], ytr[:64], classes, progress=False, log=lambda *a: None)
    res = demo.evaluate(models, xte[:40], yte[:40], out=str(tmp_path), per_class=1, eval_per_class=2,
                        num_steps=2, timing_batch=3, progress=False)
    assert res["samples"] == 20 and len(res["sample_acc_per_class"]) == 10
    for key in ("sample_acc", "classifier_test_acc", "classifier_recon_acc", "reference_sample_acc"):
        assert 0.0 <= res[key] <= 1.0
    assert 1 <= res["codes_used"] <= res["num_codes"] == 16
    assert 1.0 <= res["perplexity"] <= 16.0 + 1e-6
    assert res["recon_l1"] > 0 and res["recon_mse"] > 0
    assert res["fast_s_per_image"] > 0 and res["reference_s_per_image"] > 0
    assert res["speedup"] == pytest.approx(res["reference_s_per_image"] / res["fast_s_per_image"])
    table = demo.format_report(res, models)
    for name in TABLE_FIELDS:
        assert name in table


@pytest.mark.parametrize("half", [False, True])
def test_checkpoint_round_trip(tmp_path, half):
    xtr, ytr, _, _, classes, _ = common.load_data(None, 16)
    models = demo.train_models(TINY, xtr[:64], ytr[:64], classes, progress=False, log=lambda *a: None)
    models.info["note"] = "x"
    path = str(tmp_path / "m.pt")
    demo.save_checkpoint(models, path, half=half)
    back = demo.load_checkpoint(path)
    assert back.config == TINY and back.classes == classes and back.info["note"] == "x"
    for a, b in ((models.vqvae, back.vqvae), (models.diffusion, back.diffusion),
                 (models.classifier, back.classifier)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sb[k].dtype == sa[k].dtype
            if half and sa[k].is_floating_point():
                torch.testing.assert_close(sb[k], sa[k].half().to(sa[k].dtype), rtol=0, atol=0)
            else:
                assert torch.equal(sb[k], sa[k]), k
    if not half:  # same weights, same generator -> same samples
        labels = torch.arange(4)
        s1 = models.diffusion.sample(labels, 3, 2.0, 0.9, torch.Generator().manual_seed(5))
        s2 = back.diffusion.sample(labels, 3, 2.0, 0.9, torch.Generator().manual_seed(5))
        assert torch.equal(s1, s2)


def test_load_checkpoint_refuses_other_files(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="not an imgtx_fast demo checkpoint"):
        demo.load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError):
        demo.load_checkpoint(str(tmp_path / "missing.pt"))


def test_data_folder(tmp_path, capsys, tiny_default):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data"
    for name, value in (("circle", 200), ("dark", 30), ("stripes", 120)):
        (data / name).mkdir(parents=True)
        for i in range(5):
            arr = (torch.rand(20, 20, generator=g) * 60 + value).clamp(0, 255).to(torch.uint8)
            Image.fromarray(arr.numpy(), mode="L").save(data / name / f"{i}.png")
    out = tmp_path / "out"
    assert cli.main(["demo", "--data", str(data), "--image-size", "8", "--out", str(out), *FAST_ARGS]) == 0
    text = capsys.readouterr().out
    assert "3 classes" in text and "12 train / 3 test" in text
    _check_png(out / "samples.png", common.grid_size(3, 2, 8))
    back = demo.load_checkpoint(str(out / "demo.pt"))
    assert back.classes == ["circle", "dark", "stripes"]
    assert back.diffusion.config.height == back.diffusion.config.width == 2  # 8x8 -> 2x2 tokens


def test_save_grid_layout(tmp_path):
    from PIL import Image

    images = torch.linspace(-1, 1, 6).view(6, 1, 1, 1).expand(6, 1, 4, 4)
    path = str(tmp_path / "g.png")
    assert common.save_grid(images, 2, path, scale=3, pad=1) == (1 + 3 * 13, 1 + 2 * 13)
    with Image.open(path) as im:
        assert im.getpixel((1, 1)) == 0 and im.getpixel((1 + 2 * 13, 1 + 13)) == 255
        assert im.getpixel((0, 0)) == 128
    with pytest.raises(ValueError, match="do not fill"):
        common.save_grid(images[:5], 2, path)


def test_missing_checkpoint_falls_back_to_training(tmp_path, capsys, tiny_default):
    out = tmp_path / "out"
    assert cli.main(["demo", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out),
                     "--no-reference", *FAST_ARGS]) == 0
    assert "training from scratch" in capsys.readouterr().out
    # it wrote the trained models where the checkpoint was asked for
    assert (tmp_path / "none.pt").is_file()


def test_kernel_demos_run(capsys, monkeypatch):
    """`demo --kernels` reaches each kernel demo; each runs (at small sizes) and prints its line."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert parser.parse_args([]).out == "imgtx_fast_demo"
    kernels.codebook(n=64, k=32, d=8)
    kernels.diffusion_step(b=1, k=16, n=8)
    kernels.local_attention(b=1, h=2, n=64, d=16)
    out = capsys.readouterr().out
    for line in ("VQ codebook lookup", "VQ-Diffusion reverse step", "causal dense"):
        assert line in out
    called = []
    for name in ("codebook", "diffusion_step", "local_attention"):
        monkeypatch.setattr(kernels, name, lambda name=name: called.append(name))
    assert cli.main(["demo", "--kernels"]) == 0
    assert called == ["codebook", "diffusion_step", "local_attention"]


def test_demo_models_are_modules_of_the_package():
    import importlib

    for name, module in demos.MODELS.items():
        mod = importlib.import_module(f"imgtx_fast.demos.{module}")
        assert callable(mod.add_arguments) and callable(mod.run) and callable(mod.main), name
        assert os.path.isfile(mod.default_checkpoint()), name


def test_training_is_reproducible():
    xtr, ytr, _, _, classes, _ = common.load_data(None, 16)
    a, b = (demo.train_models(TINY, xtr[:64], ytr[:64], classes, progress=False, log=lambda *a: None)
            for _ in range(2))
    for ma, mb in ((a.vqvae, b.vqvae), (a.diffusion, b.diffusion), (a.classifier, b.classifier)):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
            assert torch.equal(va, vb), k


def test_config_checks():
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(TINY, image_size=18)
    d = TINY.to_dict()
    assert demo.DemoConfig.from_dict(d) == TINY
    with pytest.raises(ValueError, match="unknown"):
        demo.DemoConfig.from_dict({**d, "bogus": 1})
