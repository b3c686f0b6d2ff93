"""Post-hoc mode: the tracker's curves from a folder of per-epoch checkpoints.

Checkpoints are ordered by the last integer in their file name (``epoch_003.pt``),
else by name; the first one is the init point (epoch 0 unless its name says
otherwise). With ``module`` (a model of the same architecture) the channel groups
come from its traced graph, exactly as online; without it, from the checkpoint
alone (a sequential guess of each layer's successor, noted in the groups).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch

from ..errors import UserError
from .groups import find_channel_groups
from .record import WidthRecord
from .tracker import WidthTracker, layers_meta

CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz")


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of checkpoints")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in CKPT_SUFFIXES]
    if not files:
        raise UserError(f"{folder}: no checkpoint files ({', '.join(CKPT_SUFFIXES)})")

    def num(p: Path):
        found = re.findall(r"\d+", p.stem)
        return int(found[-1]) if found else None

    nums = [num(p) for p in files]
    if all(n is not None for n in nums) and len(set(nums)) == len(nums):
        pairs = sorted(zip(nums, files))
        return [(int(n), p) for n, p in pairs]
    files.sort(key=lambda p: p.name)
    return list(enumerate(files))


class _StoreTracker(WidthTracker):
    """A tracker over tensors read from a checkpoint store instead of live parameters."""

    def __init__(self, model, **kw):
        self._model = model
        super().__init__(torch.nn.Module(), **kw)

    def _attach(self, layers, groups) -> None:
        model = self._model
        self.groups = groups if groups is not None else find_channel_groups(
            model, list(layers) if layers is not None else None
        )
        if not self.groups:
            raise ValueError("no conv or linear layer to track")
        self._store = model.layers[0].store
        self._init_bits = {g.layer: torch.signbit(self._canon(g)) for g in self.groups}
        self.meta = {
            "format": "netanatomy.width/1",
            "model": model.name,
            "layers": layers_meta(self.groups, model),
            "order": [g.layer for g in self.groups],
            "settings": {"every": None, "include_1d": self.include_1d, "posthoc": True},
        }

    def _canon(self, g):
        from ..model import to_canonical

        return to_canonical(self._store.get(g.in_key), g.in_layout)

    def _get(self, key: str) -> torch.Tensor:
        return self._store.get(key)

    def set_store(self, store) -> None:
        self._store = store


def curves_from_checkpoints(
    folder: str | Path,
    module: torch.nn.Module | None = None,
    *,
    key: str | None = None,
    layers: Iterable[str] | None = None,
    similarity_epochs: Iterable[int] = (0, 1, 5),
    include_1d: bool = False,
) -> WidthRecord:
    """The width record of a run from its per-epoch checkpoints."""
    from ..io import load

    ckpts = list_checkpoints(folder)
    first_epoch = ckpts[0][0]
    opts = {"layers": layers, "similarity_epochs": similarity_epochs, "include_1d": include_1d, "record_init": False}
    if module is not None:

        def state(path: Path) -> dict:
            m = load(path, key=key)
            return {k: m.layers[0].store.get(k) for k in m.layers[0].store.keys()}

        def advance(path: Path) -> None:
            with torch.no_grad():
                module.load_state_dict(state(path), strict=False)

        advance(ckpts[0][1])
        tr = WidthTracker(module, **opts)
        what = "model"
    else:
        tr = _StoreTracker(load(ckpts[0][1], key=key), **opts)

        def advance(path: Path) -> None:
            tr.set_store(load(path, key=key).layers[0].store)

        what = "checkpoints"
    if not tr.enabled:
        if module is not None:
            tr.close()
        raise UserError(f"{folder}: could not track the {what} ({tr.disabled_reason})")
    tr.epoch = first_epoch
    tr._record("init")
    for epoch, path in ckpts[1:]:
        advance(path)
        tr.epoch = epoch
        tr.global_step = epoch
        tr._record("epoch")
    rec = tr.record()
    if module is not None:
        tr.close()
    rec.meta["source"] = str(folder)
    rec.meta["checkpoints"] = [p.name for _, p in ckpts]
    return rec
