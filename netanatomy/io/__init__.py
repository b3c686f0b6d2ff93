"""Every file format lives here; everything else reads weights through this package.

* :func:`load` makes a :class:`~netanatomy.model.Model` (the weight layers) from
  an ``nn.Module``, a file (by suffix, else by its first bytes) or a folder
  (sharded safetensors / .bin index, or the one weights file inside);
* :func:`open_store` opens a checkpoint as a :class:`CheckpointStore` of every
  tensor, read lazily; :func:`read_tensors` reads a whole file, :func:`open_array`
  one ``.npy`` / ``.npz`` array;
* :class:`SafetensorsWriter` / :func:`save_tensors` write safetensors files
  (streaming, atomic, hashed);
* :func:`build_layers` turns any tensor store into layers, as the loaders do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import LoadError, UserError
from ..model import Model
from ._formats import WEIGHT_SUFFIXES, format_of, resolve, unrecognised
from ._infer import build_layers
from .npz import open_array
from .store import CheckpointLike, CheckpointStore, canonical_key, open_store, read_tensors
from .writers import SafetensorsWriter, WrittenFile, content_hash, file_sha256, save_tensors, stored_hash



def load(
    source: Any,
    *,
    key: str | None = None,
    layout: str = "auto",
    name: str | None = None,
    allow_empty: bool = False,
) -> Model:
    """Load a model from a module, file or folder.

    ``key`` picks the entry of a nested checkpoint (``ema``, ``model`` ...);
    ``layout`` is ``auto``, ``torch`` or ``tf`` for formats that do not say.
    """
    model = _dispatch(source, key=key, layout=layout, name=name)
    if not model.layers and not allow_empty:
        detail = ""
        if model.skipped:
            reasons = sorted({s.reason for s in model.skipped})
            detail = f" ({len(model.skipped)} tensors skipped: {'; '.join(reasons[:3])})"
        raise LoadError(f"{model.source}: no weight layers found{detail}")
    return model


def _dispatch(source: Any, *, key, layout, name) -> Model:
    try:
        import torch.nn as nn
    except ImportError:  # pragma: no cover - torch is a requirement
        nn = None
    if nn is not None and isinstance(source, nn.Module):
        from . import torch_module

        return torch_module.load(source, name=name)
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"cannot load a {type(source).__name__}: give a path or a torch.nn.Module")
    path = Path(source).expanduser()
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    if path.is_dir():
        return _load_dir(path, key=key, layout=layout, name=name)
    return _load_file(path, key=key, layout=layout, name=name)


def _load_file(path: Path, *, key, layout, name, fmt: str | None = None) -> Model:
    fmt = fmt or format_of(path)
    if fmt == "safetensors":
        from . import safetensors

        return safetensors.load(path, layout=layout, name=name)
    if fmt == "torch":
        from . import torch_checkpoint

        return torch_checkpoint.load(path, key=key, layout=layout, name=name)
    if fmt == "onnx":
        from . import onnx

        return onnx.load(path, name=name)
    if fmt == "npz":
        from . import npz

        return npz.load(path, layout=layout, name=name)
    raise unrecognised(path)


def _load_dir(path: Path, *, key, layout, name) -> Model:
    fmt, target = resolve(path)
    if target == path:  # a folder of safetensors shards
        from . import safetensors

        return safetensors.load(path, layout=layout, name=name)
    return _load_file(target, key=key, layout=layout, name=name or path.resolve().name, fmt=fmt)
