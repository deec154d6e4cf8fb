"""What the model demos share: the quality judge (a tiny CNN classifier), the data split, the
PNG sample grid and the report table, and where the shipped checkpoints lie."""
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..training import fit

__all__ = ["Classifier", "train_classifier", "load_data", "grid_size", "save_grid", "format_table",
           "shipped_checkpoint"]


def shipped_checkpoint(name: str) -> str:
    """The path of a checkpoint shipped in the package (imgtx_fast/checkpoints/)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(package, "checkpoints", name)


class Classifier(nn.Module):
    """A tiny CNN that labels images (B, C, S, S) in [-1, 1]: the quality judge of the demo."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.config = {"num_classes": int(num_classes), "in_channels": int(in_channels),
                       "width": int(width)}
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * w * 16, 64),
                                  nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> Tensor:
        was = self.training
        self.eval()
        out = torch.cat([self(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        self.train(was)
        return out


def _shift(x: Tensor, g: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translation by up to max_shift pixels (zero = background padding)."""
    B, C, H, W = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy, dx = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
    return padded[:, :, dy:dy + H, dx:dx + W]


def train_classifier(model: Classifier, images: Tensor, labels: Tensor, steps: int = 400,
                     batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
                     progress: bool = True) -> List[float]:
    """Adam (no weight decay, no clipping) with cosine decay and +-1 pixel shifts; returns the
    loss per step (eval mode after)."""
    def batch_loss(g):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        return F.cross_entropy(model(_shift(images[idx], g)), labels[idx])

    return fit(model, batch_loss, steps, lr=lr, seed=seed, desc="classifier", progress=progress,
               weight_decay=0.0, betas=(0.9, 0.999), warmup=0, clip=0.0,
               postfix=lambda loss: f"loss={loss:.3f}")


def _stratified_split(labels: Tensor, test_fraction: float, seed: int) -> Tensor:
    """Bool mask of the test rows: test_fraction of every class (at least one row of a class
    with >= 2 rows, none of a class with one row)."""
    g = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().squeeze(1)
        n = len(members)
        n_test = min(n - 1, max(1, round(n * test_fraction))) if n >= 2 else 0
        is_test[members[torch.randperm(n, generator=g)[:n_test]]] = True
    return is_test


def load_data(data: Optional[str], image_size: int, seed: int = 0):
    """(train_images, train_labels, test_images, test_labels, class_names, description).
    data=None: the built-in digits (its own stratified split); else a folder of images,
    grayscale, class = subfolder, split 80/20 per class with `seed`."""
    from .. import datasets

    if data is None:
        xtr, ytr = datasets.digits(image_size, "train", seed=seed)
        xte, yte = datasets.digits(image_size, "test", seed=seed)
        return xtr, ytr, xte, yte, [str(i) for i in range(10)], "built-in digits (scikit-learn)"
    x, y, names = datasets.image_folder(data, image_size, channels=1, return_classes=True)
    is_test = _stratified_split(y, 0.2, seed)
    if not bool(is_test.any()):  # too few images to hold any out: evaluate on the training set
        is_test = torch.ones_like(is_test)
        train = torch.ones_like(is_test)
    else:
        train = ~is_test
    names = [n if n else "all" for n in names]
    return x[train], y[train], x[is_test], y[is_test], names, f"folder {data}"


def grid_size(rows: int, cols: int, image_size: int, scale: int = 4, pad: int = 2) -> Tuple[int, int]:
    """(width, height) in pixels of the PNG save_grid writes."""
    cell = image_size * scale
    return pad + cols * (cell + pad), pad + rows * (cell + pad)


def save_grid(images: Tensor, rows: int, path: str, scale: int = 4, pad: int = 2) -> Tuple[int, int]:
    """Images (rows*cols, C, S, S) in [-1, 1], row-major, as one PNG (nearest upscaling by
    `scale`, `pad` pixels of grey between cells). Returns (width, height)."""
    from PIL import Image

    n, C, S, _ = images.shape
    cols = n // rows
    if rows * cols != n:
        raise ValueError(f"save_grid: {n} images do not fill {rows} rows")
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    cell = S * scale
    W, H = grid_size(rows, cols, S, scale, pad)
    canvas = torch.full((C, H, W), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (cell + pad), pad + c * (cell + pad)
        canvas[:, top:top + cell, left:left + cell] = x[i]
    arr = canvas.permute(1, 2, 0).contiguous().numpy()
    img = Image.fromarray(arr[:, :, 0] if C == 1 else arr, mode="L" if C == 1 else "RGB")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return W, H


def format_table(rows: Sequence[Tuple[str, str]]) -> str:
    """The demos' report: one `name | value` line per row between two rules."""
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])
