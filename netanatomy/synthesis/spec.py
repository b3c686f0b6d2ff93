"""Which tensor axes a permutation of hidden units moves: :class:`PermutationSpec`.

Its own module so that both the module-based derivation (:mod:`.permute`) and the
weights-only one (:mod:`.chain`) can build it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import UserError


@dataclass
class PermutationSpec:
    """``axes[p]`` lists ``(key, axis, inner)``: permutation ``p`` acts on ``axis`` of
    tensor ``key`` in blocks of ``inner`` consecutive entries (``inner > 1`` for
    a linear layer that reads a flattened ``C x H x W`` feature map).
    ``cost_keys`` are the tensors the matching objective uses (weights and
    biases; running statistics are permuted but not matched)."""

    sizes: dict[str, int]
    axes: dict[str, list[tuple[str, int, int]]]
    cost_keys: set[str]
    fixed: list[str] = field(default_factory=list)  # descriptions of spaces left alone

    def key_axes(self) -> dict[str, list[tuple[int, str, int]]]:
        out: dict[str, list[tuple[int, str, int]]] = {}
        for p, items in self.axes.items():
            for key, axis, inner in items:
                out.setdefault(key, []).append((axis, p, inner))
        return out

    def check(self, state: Mapping[str, torch.Tensor], what: str = "state dict") -> None:
        for p, items in self.axes.items():
            for key, axis, inner in items:
                if key not in state:
                    raise UserError(f"{what} has no tensor {key!r} (needed by permutation {p})")
                t = state[key]
                if t.dim() <= axis or t.shape[axis] != self.sizes[p] * inner:
                    raise UserError(
                        f"{what}: {key!r} has shape {list(t.shape)}; permutation {p} expects "
                        f"{self.sizes[p] * inner} entries on axis {axis}"
                    )

    def describe(self) -> list[dict]:
        return [{"permutation": p, "size": self.sizes[p], "tensors": len(self.axes[p])} for p in self.sizes]
