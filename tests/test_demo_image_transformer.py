"""`python -m imgtx_fast demo --model image-transformer`: training, checkpoint, report, CLI
dispatch, with a tiny model (scripts/train_image_transformer_demo.py measures the quality)."""
import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("PIL")

from imgtx_fast import __main__ as cli  # noqa: E402
from imgtx_fast.demos import image_transformer as itdemo  # noqa: E402
from imgtx_fast.models.image_transformer import ImageTransformerConfig  # noqa: E402

TINY = ImageTransformerConfig(height=16, width=16, channels=1, num_classes=10, attention="local2d",
                              query_shape=(4, 8), memory_flange=(4, 8), dim=16, heads=2, depth=1)
FAST_ARGS = ["--per-class", "1", "--timing-batch", "2", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_default(monkeypatch):
    monkeypatch.setattr(itdemo, "default_config", lambda: TINY)


def test_intensities_cover_the_range():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5])
    assert itdemo.to_intensities(x).tolist() == [0, 0, 128, 255, 255]


def test_train_and_report_through_the_cli(tmp_path, capsys, tiny_default):
    ckpt = tmp_path / "it.pt"
    assert cli.main(["demo", "--model", "image-transformer", "--train", "--train-steps", "3",
                     "--checkpoint", str(ckpt), "--out", str(tmp_path), *FAST_ARGS]) == 0
    out = capsys.readouterr().out
    for field in ("held-out bits/dim", "sampling, fast + KV cache", "sampling, reference + KV cache",
                  "sampling, reference recompute", "sample accuracy", "sample grid"):
        assert field in out, field
    assert os.path.isfile(tmp_path / "image_transformer_samples.png")
    model, info = itdemo.load(str(ckpt))
    assert model.config == TINY and info["steps"] == 3


def test_report_values(tmp_path, tiny_default):
    torch.manual_seed(0)
    model = itdemo.ImageTransformer(TINY).eval()
    x = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    y = torch.arange(6) % 10
    res = itdemo.evaluate(model, x, y, out=None, per_class=1, timing_batch=2, recompute_steps=2,
                          progress=False)
    assert res["test_bpd"] == pytest.approx(res["test_bpd_reference"], rel=1e-5)
    assert 0 < res["test_bpd"] < 9  # an untrained model is near log2(256) = 8 bits
    assert res["samples"] == 10 and 0.0 <= res["sample_acc"] <= 1.0
    assert res["fast_s"] > 0 and res["reference_cache_s"] > 0 and res["reference_recompute_s"] > 0


def test_shipped_checkpoint_loads_and_beats_uniform():
    path = itdemo.default_checkpoint()
    if not os.path.isfile(path):
        pytest.skip("no shipped checkpoint in this checkout")
    model, info = itdemo.load(path)
    from imgtx_fast import datasets

    x, y = datasets.digits(16, "test", seed=0)
    bpd = model.bits_per_dim(itdemo.to_intensities(x[:64]), y[:64])
    assert bpd < 4.0, bpd  # uniform over 256 levels is 8 bits/dim


def test_load_refuses_other_files(tmp_path):
    torch.save({"format": "something else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="Image Transformer demo checkpoint"):
        itdemo.load(str(tmp_path / "x.pt"))


def test_unknown_model_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--model", "gan"])
    assert "invalid choice" in capsys.readouterr().err
