"""The built-in demo model: a small CNN trained on Fashion-MNIST.

Its weights ship inside the package (``data/demo_cnn.safetensors``, trained by
``scripts/train_demo.py``), so ``netanatomy demo`` needs no download. The
architecture is defined here so that the demo has its graph (torch.fx): two
stride-1 conv groups separated by max pooling, a grouped conv (two branches),
global average pooling, and a linear classifier.
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from torch import nn

from .errors import LoadError
from .model import Model

WEIGHTS = "demo_cnn.safetensors"
INFO = "demo_cnn.json"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _block(cin: int, cout: int, k: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class DemoCNN(nn.Module):
    """28x28 grey images -> 10 classes; about 120k parameters."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            *_block(1, 16, 5),
            *_block(16, 32, 3),
            nn.MaxPool2d(2),
            *_block(32, 64, 3),
            *_block(64, 64, 3, groups=2),
            nn.MaxPool2d(2),
            *_block(64, 128, 3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def demo_weights_path():
    return resources.files("netanatomy") / "data" / WEIGHTS


def demo_info() -> dict:
    p = resources.files("netanatomy") / "data" / INFO
    return json.loads(p.read_text()) if p.is_file() else {}


def demo_module() -> DemoCNN:
    """The demo CNN with its trained weights."""
    from .io import read_tensors

    path = demo_weights_path()
    if not path.is_file():
        raise LoadError(f"demo weights missing from the installation ({path}); reinstall netanatomy")
    net = DemoCNN()
    net.load_state_dict(read_tensors(str(path), "pt")[0])
    return net.eval()


def load_demo() -> Model:
    from .io import load

    model = load(demo_module(), name="demo-cnn (Fashion-MNIST)")
    info = demo_info()
    if info:
        model.metadata.update({k: v for k, v in info.items() if not isinstance(v, (dict, list))})
        if "test_accuracy" in info:
            model.notes.append(
                f"trained by scripts/train_demo.py: test accuracy {info['test_accuracy']:.3f} on Fashion-MNIST"
            )
    return model
