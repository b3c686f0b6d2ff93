"""Checkpoints as tensor stores, for synthesis.

Averaging needs *every* tensor of a checkpoint (buffers included), not only the
weight layers that :func:`netanatomy.load` shows, so synthesis opens the stores
behind the loaders directly:

* safetensors (a file, a ``*.safetensors.index.json`` or a folder of shards):
  read lazily, one tensor per ``pread``; holding many open costs nothing;
* PyTorch checkpoints (``.pt``, ``.pth``, ``.bin``, ``.ckpt``): read with
  ``torch.load(weights_only=True)``, memory-mapped when the file is a zip;
* in memory: a ``state_dict`` (``dict`` of tensors) or an ``nn.Module``.

Keys lose the ``module.`` / ``_orig_mod.`` prefixes that DDP and
``torch.compile`` add, so checkpoints saved either way line up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import LoadError, UserError

STRIPPED_PREFIXES = ("module.", "_orig_mod.")

#: what a checkpoint can be given as
CheckpointLike = Any  # str | os.PathLike | Mapping[str, Tensor] | nn.Module | Source


def canonical_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in STRIPPED_PREFIXES:
            if key.startswith(p) and len(key) > len(p):
                key = key[len(p) :]
                changed = True
    return key


@dataclass
class Source:
    """One checkpoint: its name, its keys (canonical), and lazy access.

    ``lazy`` is True when reading one tensor does not map or hold the rest
    (safetensors, in-memory dicts); a memory-mapped ``.pt`` file is not lazy in
    that sense, since every page it touches stays resident while it is open.
    """

    name: str
    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, torch.dtype]
    _get: Callable[[str], torch.Tensor] = field(repr=False)
    lazy: bool = True
    _opener: Callable[[], "Source"] | None = field(default=None, repr=False)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)

    def reopen(self) -> "Source":
        """A fresh handle (for a memory-mapped file: maps it again)."""
        return self._opener() if self._opener is not None else self


def _from_mapping(name: str, tensors: Mapping[str, torch.Tensor], lazy: bool = True, opener=None) -> Source:
    table: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            continue
        ck = canonical_key(str(k))
        if ck in table:
            raise UserError(f"{name}: keys {k!r} and another both become {ck!r} once prefixes are stripped")
        table[ck] = v.detach()
    if not table:
        raise UserError(f"{name}: holds no tensors")
    return Source(
        name=name,
        _shapes={k: tuple(v.shape) for k, v in table.items()},
        _dtypes={k: v.dtype for k, v in table.items()},
        _get=table.__getitem__,
        lazy=lazy,
        _opener=opener,
    )


def _safetensors_files(path: Path) -> list[Path]:
    from ..io.safetensors import shard_files

    if path.name.endswith(".index.json"):
        return shard_files(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return shard_files(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise LoadError(f"{path}: no safetensors files in this folder")
    return [path]


def _kind_of(path: Path) -> str:
    n = path.name.lower()
    if path.is_dir():
        if list(path.glob("*.safetensors")) or list(path.glob("*.safetensors.index.json")):
            return "safetensors"
        if list(path.glob("*.bin.index.json")):
            return "torch-index"
        raise LoadError(f"{path}: no safetensors files or .bin index in this folder")
    if n.endswith(".safetensors") or n.endswith(".safetensors.index.json"):
        return "safetensors"
    if n.endswith(".bin.index.json"):
        return "torch-index"
    if n.endswith((".pt", ".pth", ".bin", ".ckpt")):
        return "torch"
    from ..io import _format_of

    fmt = _format_of(path)
    if fmt in ("safetensors", "torch"):
        return fmt
    raise LoadError(
        f"{path}: synthesis reads safetensors and PyTorch checkpoints "
        "(.safetensors, .pt, .pth, .bin, .ckpt); convert other formats first"
    )


def open_path(path: str | os.PathLike, key: str | None = None) -> Source:
    """Open a checkpoint file or folder as a :class:`Source`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{p}: no such file or folder")
    kind = _kind_of(p)
    if kind == "safetensors":
        from ..io.safetensors import SafetensorsStore

        store = SafetensorsStore(_safetensors_files(p))
        names: dict[str, str] = {}
        for k in store.keys():
            ck = canonical_key(k)
            if ck in names:
                raise LoadError(f"{p}: keys {names[ck]!r} and {k!r} both become {ck!r} once prefixes are stripped")
            names[ck] = k
        return Source(
            name=str(p),
            _shapes={ck: store.shape(k) for ck, k in names.items()},
            _dtypes={ck: getattr(torch, store.dtype(k)) for ck, k in names.items()},
            _get=lambda ck: store.get(names[ck]),
            lazy=True,
        )
    from ..io.torch_checkpoint import read_state_dict

    def opener() -> Source:
        if kind == "torch-index":
            from ..io.safetensors import shard_files

            index = p if p.is_file() else sorted(p.glob("*.bin.index.json"))[0]
            tensors: dict[str, torch.Tensor] = {}
            for f in shard_files(index):
                part, _ = read_state_dict(f)
                tensors.update(part)
        else:
            tensors, _ = read_state_dict(p, key)
        return _from_mapping(str(p), tensors, lazy=False, opener=opener)

    return opener()


def open_source(obj: CheckpointLike, name: str | None = None, key: str | None = None) -> Source:
    """A :class:`Source` from a path, a state dict, an ``nn.Module`` or a Source."""
    if isinstance(obj, Source):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return open_path(obj, key)
    if isinstance(obj, torch.nn.Module):
        return _from_mapping(name or type(obj).__name__, obj.state_dict())
    if isinstance(obj, Mapping):
        return _from_mapping(name or "<state dict>", obj)
    raise UserError(f"cannot read weights from a {type(obj).__name__}: give a path, a state dict or an nn.Module")


def source_label(src: Source) -> str:
    return Path(src.name).name if os.sep in src.name or "/" in src.name else src.name
