"""Image data sets for the models and the demo: a built-in one that needs no download, and a
folder of images for `--data PATH`.

Both return `(images, labels)`: images (N, C, H, W) float32 in [-1, 1] (the range the VQ-VAE
reconstructs and the diffusion demo draws), labels (N,) int64.
"""
import functools
import os
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["digits", "image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLITS = ("train", "test", "all")


def _check_size(size, minimum: int) -> int:
    # bool is an int subclass; True would silently mean 1
    if isinstance(size, bool) or not isinstance(size, int) or size < minimum:
        raise ValueError(f"size must be an int >= {minimum}, got {size!r}")
    return size


@functools.lru_cache(maxsize=1)
def _digits_raw() -> Tuple[Tensor, Tensor]:
    # scikit-learn ships the UCI 8x8 digits inside the wheel, so this never touches the network.
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("imgtx_fast.datasets.digits needs scikit-learn (its bundled 8x8 digits): "
                          "pip install 'imgtx_fast[models]' or pip install scikit-learn") from e
    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32)  # (1797, 8, 8), values 0..16
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    return images, labels


def digits(size: int = 16, split: str = "train", *, test_fraction: float = 0.2,
           seed: int = 0) -> Tuple[Tensor, Tensor]:
    """scikit-learn's bundled handwritten digits (1797 images, classes 0-9), grayscale.

    size: output side. 16 is the default because the CPU demo has to train a tokenizer and a
      diffusion model in minutes: 16x16 with a 4x downsampling VQ-VAE gives a 4x4 token grid
      (32x32 gives 8x8, four times the tokens, for a model that wants a longer sequence). Any
      size >= 8 works. The 8x8 originals are upsampled bilinearly (align_corners=False):
      a convex combination of pixels, so values stay exactly in [-1, 1] without clamping,
      and it gives smooth strokes rather than the blocks of nearest-neighbour.
    split: 'train', 'test' or 'all'. The split is stratified (test_fraction of every class,
      rounded) and drawn from a torch.Generator seeded with `seed`, so it is the same on every
      machine and every call; train and test never overlap and together are the whole set.
    Returns images (N, 1, size, size) float32 in [-1, 1] (0 -> -1, ink 16 -> 1), labels (N,)
    int64, in ascending order of the original index.
    """
    size = _check_size(size, 8)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    raw, labels = _digits_raw()
    if split != "all":
        g = torch.Generator().manual_seed(seed)
        is_test = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            members = (labels == c).nonzero().squeeze(1)
            n_test = round(len(members) * test_fraction)
            is_test[members[torch.randperm(len(members), generator=g)[:n_test]]] = True
        keep = is_test if split == "test" else ~is_test
        raw, labels = raw[keep], labels[keep]
    x = raw.unsqueeze(1) * (2.0 / 16.0) - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous(), labels.clone()


def _list_images(folder: str) -> List[str]:
    """Image files under folder (recursively, hidden entries skipped), sorted for determinism."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _load_image(file: str, size: int, mode: str) -> Tensor:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("imgtx_fast.datasets.image_folder needs Pillow: "
                          "pip install 'imgtx_fast[models]' or pip install pillow") from e

    try:
        with Image.open(file) as im:
            im = im.convert(mode)
            # centre-crop to a square first so faces/objects are not squashed by the resize
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            im = im.resize((size, size), Image.BICUBIC)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
        raise ValueError(f"path: cannot read image {file!r}: {e}") from e
    return data.view(size, size, -1).permute(2, 0, 1).float() * (2.0 / 255.0) - 1.0


def image_folder(path: str, size: int, *, channels: int = 1,
                 return_classes: bool = False):
    """A folder of images as tensors, for `--data PATH`.

    Layout: either class subfolders (`path/<class>/**/*.png`; label i is the i-th class name in
    sorted order, as torchvision's ImageFolder does) or images directly in `path` (all label 0).
    A folder with both is refused as ambiguous. Hidden files/folders and subfolders without
    images are ignored. Each image is converted to grayscale (channels=1) or RGB (channels=3),
    centre-cropped to a square and resized (bicubic) to size x size.
    Returns (images (N, channels, size, size) float32 in [-1, 1], labels (N,) int64), plus the
    list of class names (label i -> names[i]; [''] for a flat folder) when return_classes=True.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such folder: {path!r}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"path: not a folder: {path!r}")
    size = _check_size(size, 1)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")

    top_files = [f for f in _list_images(path) if os.path.dirname(f) == path]
    subdirs = sorted(d for d in os.listdir(path)
                     if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
    class_files = [(d, _list_images(os.path.join(path, d))) for d in subdirs]
    class_files = [(d, files) for d, files in class_files if files]
    if class_files and top_files:
        raise ValueError(f"path: {path!r} has both images and class subfolders with images; "
                         "put every image in a class subfolder, or none")
    if not class_files and not top_files:
        raise ValueError(f"path: no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path!r}")
    if not class_files:
        class_files = [("", top_files)]

    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for label, (_, files) in enumerate(class_files):
        images += [_load_image(f, size, mode) for f in files]
        labels += [label] * len(files)
    out = torch.stack(images), torch.tensor(labels, dtype=torch.int64)
    return (*out, [d for d, _ in class_files]) if return_classes else out
