"""Loaders: every format becomes the same :class:`~netanatomy.model.Model`.

``load`` picks the loader from what it is given: an ``nn.Module``, a file (by
suffix, else by its first bytes) or a folder (sharded safetensors / .bin index,
or the one weights file inside).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import LoadError, UserError
from ..model import Model

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".npz")


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


def _load_file(path: Path, *, key, layout, name) -> Model:
    fmt = _format_of(path)
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
    raise LoadError(
        f"{path}: unrecognised file type (supported: {', '.join(WEIGHT_SUFFIXES)}, "
        "or a folder holding them)"
    )


def _format_of(path: Path) -> str | None:
    n = path.name.lower()
    if n.endswith(".safetensors") or n.endswith(".safetensors.index.json"):
        return "safetensors"
    if n.endswith((".pt", ".pth", ".bin", ".ckpt", ".bin.index.json")):
        return "torch"
    if n.endswith(".onnx"):
        return "onnx"
    if n.endswith(".npz"):
        return "npz"
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        raise LoadError(f"{path}: cannot read ({exc.strerror})") from None
    if head[:2] == b"PK":
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return None
        if any(x.endswith(".npy") for x in names):
            return "npz"
        if any(x.endswith("data.pkl") for x in names):
            return "torch"
        return None
    if head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return None


def _load_dir(path: Path, *, key, layout, name) -> Model:
    if list(path.glob("*.safetensors.index.json")) or list(path.glob("*.safetensors")):
        from . import safetensors

        return safetensors.load(path, layout=layout, name=name)
    bin_index = sorted(path.glob("*.bin.index.json"))
    if bin_index:
        from . import torch_checkpoint

        return torch_checkpoint.load(bin_index[0], layout=layout, name=name or path.resolve().name)
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES))
    if not candidates:
        raise LoadError(f"{path}: no weights found in this folder (looked for {', '.join(WEIGHT_SUFFIXES)})")
    if len(candidates) > 1:
        shown = ", ".join(p.name for p in candidates[:5]) + (" ..." if len(candidates) > 5 else "")
        raise LoadError(f"{path}: several weight files ({shown}); name one")
    return _load_file(candidates[0], key=key, layout=layout, name=name or path.resolve().name)


__all__ = ["load", "WEIGHT_SUFFIXES"]
