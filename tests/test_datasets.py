"""``netanatomy.datasets``: the normalised Fashion-MNIST splits the experiments share."""

from __future__ import annotations

import pytest
import torch

from netanatomy.datasets import fashion_mnist, fashion_mnist_available, fashion_mnist_normalized, normalize_images

needs_data = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed")


@needs_data
def test_fashion_mnist_normalized_shapes_and_statistics():
    xtr, ytr, xte, yte = fashion_mnist_normalized()
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28)
    assert xtr.dtype == torch.float32 and xte.dtype == torch.float32
    assert ytr.shape == (60000,) and yte.shape == (10000,)
    assert ytr.dtype == torch.int64 and set(ytr.unique().tolist()) == set(range(10))
    # the constants are the training set's mean and std: normalised, it is ~0 / ~1
    assert float(xtr.mean()) == pytest.approx(0.0, abs=0.01)
    assert float(xtr.std()) == pytest.approx(1.0, abs=0.01)
    raw, _ = fashion_mnist("test")
    assert torch.equal(xte, normalize_images(raw))
    assert float(xte.min()) == pytest.approx((0 - 0.2860) / 0.3530, abs=1e-5)


def test_normalize_images_adds_channel_and_maps_bytes():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = normalize_images(x)
    assert out.shape == (1, 1, 1, 2)
    assert out.flatten().tolist() == pytest.approx([-0.2860 / 0.3530, (1 - 0.2860) / 0.3530])
