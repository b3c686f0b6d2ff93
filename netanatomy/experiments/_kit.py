"""What the experiments share: the small Fashion-MNIST CNN, the data subset loader and the offline photographs."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class SmallCNN(nn.Module):
    """conv-bn-relu-pool x2, conv-bn-relu, global average pool, linear."""

    def __init__(self, widths=(16, 32, 32), classes: int = 10):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def fashion_subset(train_n: int, seed: int = 0):
    """``train_n`` normalised Fashion-MNIST training images drawn with ``seed``, and the whole test set.

    Returns ``(x_train, y_train, x_test, y_test)``.
    """
    from ..datasets import fashion_mnist, normalize_images

    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:train_n]
    return normalize_images(xtr[idx]), ytr[idx], normalize_images(xte), yte


# photographs shipped by Debian packages (see results/branches.md for the list);
# illustrations and abstract patterns from the same packages are left out
PHOTO_GLOBS = (
    "/usr/share/backgrounds/*.jpg",  # lomiri-wallpapers-16.04
    "/usr/share/backgrounds/mate/nature/*.jpg",  # mate-backgrounds
    "/usr/share/wallpapers/*/contents/images/*.jpg",  # plasma-workspace-wallpapers
)
NOT_PHOTOS = (
    "analogpattern", "umang", "Autumn", "Flow", "Honeywave", "PastelHills", "SafeLanding", "Shell",
)


def photo_paths() -> list[str]:
    paths: list[str] = []
    for g in PHOTO_GLOBS:
        for p in sorted(glob.glob(g)):
            if any(bad in p for bad in NOT_PHOTOS):
                continue
            if "/wallpapers/" in p:  # one size per plasma wallpaper: the smallest
                folder = str(Path(p).parent)
                if any(str(Path(q).parent) == folder for q in paths):
                    continue
                sizes = sorted(glob.glob(folder + "/*.jpg"), key=lambda q: _pixels(q))
                p = sizes[0]
            paths.append(p)
    return paths


def _pixels(path: str) -> int:
    stem = Path(path).stem
    try:
        w, h = stem.split("x")
        return int(w) * int(h)
    except ValueError:
        return 1 << 40


def load_photos(short_side: int, max_photos: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Offline photographs as float32 arrays (H, W, 3) in [0, 1]."""
    from PIL import Image

    images, names = [], []
    for p in photo_paths():
        with Image.open(p) as im:
            images.append(_resize(np.asarray(im.convert("RGB")), short_side))
        names.append(Path(p).parts[-4] if "/wallpapers/" in p else Path(p).stem)
    try:
        import skimage.data as sk

        for n in ("astronaut", "coffee", "chelsea", "rocket"):
            images.append(_resize(getattr(sk, n)(), short_side))
            names.append(f"skimage.{n}")
    except Exception:  # scikit-image is optional
        pass
    try:
        from sklearn.datasets import load_sample_images

        for n, im in zip(("china", "flower"), load_sample_images().images):
            images.append(_resize(im, short_side))
            names.append(f"sklearn.{n}")
    except Exception:  # scikit-learn is optional
        pass
    if max_photos:
        images, names = images[:max_photos], names[:max_photos]
    return images, names


def _resize(arr: np.ndarray, short_side: int) -> np.ndarray:
    from PIL import Image

    im = Image.fromarray(arr.astype(np.uint8))
    w, h = im.size
    s = short_side / min(w, h)
    im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    return np.asarray(im, dtype=np.float32) / 255.0
