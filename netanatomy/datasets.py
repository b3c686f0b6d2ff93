"""Offline data for experiments and the demo. Nothing here downloads anything.

* Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``; override with ``NETANATOMY_FASHION_MNIST``).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8:
        raise UserError(f"{path}: not an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated IDX file")
    return arr.reshape(dims)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("NETANATOMY_FASHION_MNIST", FASHION_MNIST_DIR))


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 ``(N, 28, 28)`` and labels as int64 ``(N,)``."""
    if split not in ("train", "test"):
        raise ValueError("split is 'train' or 'test'")
    root = fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    img, lab = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists() or not lab.exists():
        raise UserError(
            f"Fashion-MNIST not found in {root}: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or set NETANATOMY_FASHION_MNIST"
        )
    x = torch.from_numpy(_read_idx(img).copy())
    y = torch.from_numpy(_read_idx(lab).astype(np.int64))
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{root}: {x.shape[0]} images but {y.shape[0]} labels")
    return x, y


def fashion_mnist_available() -> bool:
    root = fashion_mnist_dir()
    return (root / "train-images-idx3-ubyte.gz").exists()


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, 1, H, W) with Fashion-MNIST's mean and std."""
    x = x.unsqueeze(1) if x.dim() == 3 else x
    return ((x.float() / 255.0) - 0.2860) / 0.3530


def fashion_mnist_normalized() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test splits, images normalised by :func:`normalize_images`.

    Returns ``(x_train, y_train, x_test, y_test)``: float ``(N, 1, 28, 28)`` images, int64 labels.
    """
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    return normalize_images(xtr), ytr, normalize_images(xte), yte
