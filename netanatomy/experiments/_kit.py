"""What the experiments share: the small Fashion-MNIST CNN and the data subset loader."""

from __future__ import annotations

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
