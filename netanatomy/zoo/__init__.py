"""Weights as data over a model zoo: zoo generation, per-checkpoint features,
accuracy predictors split by training run, distances, clustering and a 2-D map.

Heavy parts (torch training, scikit-learn) are imported by the functions that
need them; ``import netanatomy.zoo`` stays cheap.
"""

from __future__ import annotations

__all__ = ["ZooConfig", "generate_zoo"]


def __getattr__(name):
    if name in ("ZooConfig", "generate_zoo"):
        from . import train

        return getattr(train, name)
    raise AttributeError(name)
