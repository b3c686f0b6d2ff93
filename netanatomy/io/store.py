"""Checkpoints as tensor stores: every tensor of a file, buffers included.

:func:`netanatomy.load` shows a checkpoint's weight *layers*; averaging, soups,
alignment and the zoo need *every* tensor under its name. :func:`open_store`
opens the same files the loaders read, through the same format detection and
shard resolution:

* safetensors (a file, a ``*.safetensors.index.json`` or a folder of shards):
  read lazily, one tensor per ``pread``, so only the tensor asked for is in
  memory and holding many stores open costs nothing;
* ``.npz`` archives: each array decompressed when asked for;
* PyTorch checkpoints (``.pt``, ``.pth``, ``.bin``, ``.ckpt``, a
  ``*.bin.index.json``): ``torch.load(weights_only=True)``, memory-mapped when
  the file is a zip;
* in memory: a state dict (``dict`` of tensors) or an ``nn.Module``.

Keys lose the ``module.`` / ``_orig_mod.`` prefixes that DDP and
``torch.compile`` add (:func:`canonical_key`), so checkpoints saved either way
line up. :func:`read_tensors` reads a whole file under its own names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import LoadError, UserError
from ._formats import resolve, unrecognised
from .npz import NpzStore
from .safetensors import SafetensorsStore, resolve_files
from .torch_checkpoint import read_sharded_state_dict, read_state_dict

STRIPPED_PREFIXES = ("module.", "_orig_mod.")

#: what a checkpoint can be given as
CheckpointLike = Any  # str | os.PathLike | Mapping[str, Tensor] | nn.Module | CheckpointStore


def canonical_key(key: str) -> str:
    """``key`` without the ``module.`` / ``_orig_mod.`` prefixes (repeatedly)."""
    changed = True
    while changed:
        changed = False
        for p in STRIPPED_PREFIXES:
            if key.startswith(p) and len(key) > len(p):
                key = key[len(p) :]
                changed = True
    return key


@dataclass
class CheckpointStore:
    """One checkpoint: its name, its keys (canonical), and access to each tensor.

    ``lazy`` is True when reading one tensor does not map or hold the rest
    (safetensors, ``.npz``, in-memory dicts); a memory-mapped ``.pt`` file is
    not lazy in that sense, since every page it touches stays resident while it
    is open. ``format`` is ``safetensors``, ``npz``, ``torch`` or ``memory``.
    """

    name: str
    _shapes: dict[str, tuple[int, ...]]
    _dtypes: dict[str, torch.dtype]
    _get: Callable[[str], torch.Tensor] = field(repr=False)
    lazy: bool = True
    _opener: Callable[[], "CheckpointStore"] | None = field(default=None, repr=False)
    format: str = "memory"
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._get(key)

    @property
    def label(self) -> str:
        """A short name for messages: the file name of a path, else the name."""
        return Path(self.name).name if os.sep in self.name or "/" in self.name else self.name

    def reopen(self) -> "CheckpointStore":
        """A fresh handle (for a memory-mapped file: maps it again)."""
        return self._opener() if self._opener is not None else self

    def released(self) -> "CheckpointStore":
        """The same keys, shapes and dtypes with the tensors let go (reading one raises)."""
        return CheckpointStore(self.name, self._shapes, self._dtypes, _get=_released, lazy=True, format=self.format, metadata=self.metadata)


def _released(key: str) -> torch.Tensor:
    raise RuntimeError(f"{key!r}: checkpoint already released")


def _from_mapping(name: str, tensors: Mapping[str, torch.Tensor], lazy: bool = True, opener=None, fmt: str = "memory") -> CheckpointStore:
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
    return CheckpointStore(
        name=name,
        _shapes={k: tuple(v.shape) for k, v in table.items()},
        _dtypes={k: v.dtype for k, v in table.items()},
        _get=table.__getitem__,
        lazy=lazy,
        _opener=opener,
        format=fmt,
    )


def _from_lazy(p: Path, fmt: str, store, metadata: Mapping[str, str] | None = None) -> CheckpointStore:
    """Wrap an io reader (keys/shape/dtype-as-string/get) without reading any tensor."""
    names: dict[str, str] = {}
    dtypes: dict[str, torch.dtype] = {}
    for k in store.keys():
        ck = canonical_key(k)
        if ck in names:
            raise LoadError(f"{p}: keys {names[ck]!r} and {k!r} both become {ck!r} once prefixes are stripped")
        names[ck] = k
        dt = getattr(torch, store.dtype(k), None)
        if not isinstance(dt, torch.dtype):
            raise LoadError(f"{p}: tensor {k!r} has dtype {store.dtype(k)}, which torch cannot hold")
        dtypes[ck] = dt
    if not names:
        raise LoadError(f"{p}: holds no tensors")
    return CheckpointStore(
        name=str(p),
        _shapes={ck: tuple(store.shape(k)) for ck, k in names.items()},
        _dtypes=dtypes,
        _get=lambda ck: store.get(names[ck]),
        lazy=True,
        format=fmt,
        metadata=dict(metadata or {}),
    )


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{p}: no such file or folder")
    return p


def _unsupported(p: Path, fmt: str | None) -> LoadError:
    if fmt is None:
        return unrecognised(p)
    return LoadError(
        f"{p}: a {fmt} file; tensor stores read safetensors, PyTorch checkpoints "
        "(.pt, .pth, .bin, .ckpt) and .npz; convert other formats first"
    )


def _open_path(path: str | os.PathLike, key: str | None = None) -> CheckpointStore:
    p = _existing(path)
    fmt, target = resolve(p)
    if fmt == "safetensors":
        files, _ = resolve_files(target)
        store = SafetensorsStore(files)
        return _from_lazy(p, "safetensors", store, store.metadata)
    if fmt == "npz":
        return _from_lazy(p, "npz", NpzStore(target))
    if fmt != "torch":
        raise _unsupported(p, fmt)

    def opener() -> CheckpointStore:
        if target.name.endswith(".index.json"):
            tensors = read_sharded_state_dict(target)
        else:
            tensors, _ = read_state_dict(target, key)
        return _from_mapping(str(p), tensors, lazy=False, opener=opener, fmt="torch")

    return opener()


def open_store(obj: CheckpointLike, name: str | None = None, key: str | None = None) -> CheckpointStore:
    """A :class:`CheckpointStore` from a path (file or folder), a state dict, an
    ``nn.Module`` or a store (returned as it is).

    ``key`` picks the entry of a nested PyTorch checkpoint (``ema``, ``model`` ...);
    ``name`` labels in-memory checkpoints in messages.
    """
    if isinstance(obj, CheckpointStore):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return _open_path(obj, key)
    if isinstance(obj, torch.nn.Module):
        return _from_mapping(name or type(obj).__name__, obj.state_dict())
    if isinstance(obj, Mapping):
        return _from_mapping(name or "<state dict>", obj)
    raise UserError(f"cannot read weights from a {type(obj).__name__}: give a path, a state dict or an nn.Module")


def read_tensors(path: str | os.PathLike, framework: str = "pt", key: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a weights file under its own names, and the file's metadata.

    ``framework`` is ``pt`` (torch tensors) or ``np`` (NumPy arrays). Reads
    safetensors (file, index or folder), PyTorch checkpoints and ``.npz``; the
    metadata is the safetensors header's (``{}`` for the others).
    """
    if framework not in ("pt", "np"):
        raise UserError(f"framework must be 'pt' or 'np', not {framework!r}")
    p = _existing(path)
    fmt, target = resolve(p)
    meta: dict[str, str] = {}
    if fmt == "safetensors":
        files, _ = resolve_files(target)
        store = SafetensorsStore(files)
        tensors = {k: store.get(k) for k in store.keys()}
        meta = dict(store.metadata)
    elif fmt == "npz":
        store = NpzStore(target)
        tensors = {k: store.get(k) for k in store.keys()}
    elif fmt == "torch":
        if target.name.endswith(".index.json"):
            tensors = read_sharded_state_dict(target)
        else:
            tensors, _ = read_state_dict(target, key)
    else:
        raise _unsupported(p, fmt)
    if framework == "np":
        out = {}
        for k, t in tensors.items():
            if t.dtype == torch.bfloat16:
                raise LoadError(f"{p}: tensor {k!r} is bfloat16, which NumPy cannot hold; read it with framework='pt'")
            out[k] = t.detach().cpu().numpy()
        return out, meta
    return tensors, meta


__all__ = ["CheckpointLike", "CheckpointStore", "canonical_key", "open_store", "read_tensors", "STRIPPED_PREFIXES"]
