"""``.npz`` archives of named arrays (NumPy, JAX/Flax or Keras exports).

Read with ``allow_pickle=False``: object arrays are refused. Shapes come from
each member's ``.npy`` header; an array is decompressed only when asked for.
Keys named ``kernel`` are taken as TensorFlow/Flax layout unless told otherwise.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import LoadError
from ..model import Model
from ._infer import build_layers


class NpzStore:
    def __init__(self, path: Path):
        self.path = path
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype, str]] = {}
        try:
            with zipfile.ZipFile(path) as zf:
                for member in zf.namelist():
                    if not member.endswith(".npy"):
                        continue
                    with zf.open(member) as fh:
                        shape, dtype = _npy_header(fh)
                    if dtype.hasobject:
                        raise LoadError(f"{path}: array {member[:-4]!r} holds Python objects; refused (allow_pickle is off)")
                    self._meta[member[:-4]] = (tuple(int(s) for s in shape), dtype, member)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise LoadError(f"{path}: not a valid .npz archive ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not self._meta:
            raise LoadError(f"{path}: the archive holds no arrays")

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> str:
        dt = self._meta[key][1]
        return "bfloat16" if dt.name == "bfloat16" else dt.name

    def get(self, key: str) -> torch.Tensor:
        member = self._meta[key][2]
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(member) as fh:
                arr = np.lib.format.read_array(fh, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise LoadError(f"{self.path}: cannot read array {key!r} ({exc})") from None
        if arr.dtype == np.float16 or np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
            return torch.from_numpy(np.ascontiguousarray(arr)).reshape(arr.shape)  # 0-d stays 0-d
        raise LoadError(f"{self.path}: array {key!r} has unsupported dtype {arr.dtype}")


def _npy_header(fh) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(fh)
    else:  # 3.0 (utf-8 field names): read the array itself to learn its header
        arr = fmt.read_array(fh, allow_pickle=False)
        shape, dtype = arr.shape, arr.dtype
    return shape, dtype


def load(path: str | os.PathLike, *, layout: str = "auto", name: str | None = None) -> Model:
    path = Path(path)
    store = NpzStore(path)
    layers, skipped = build_layers(store, layout=layout)
    return Model(name=name or path.stem, source=str(path), format="npz", layers=layers, skipped=skipped)


def open_array(path: str | os.PathLike, name: str | None = None, mmap: bool = True) -> np.ndarray:
    """One array from a ``.npy`` file (memory-mapped unless ``mmap=False``) or a
    ``.npz`` archive (the member ``name``, or its only one). Object arrays are
    refused (``allow_pickle=False``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        store = NpzStore(path)
        keys = store.keys()
        if name is None:
            if len(keys) != 1:
                raise LoadError(f"{path}: holds {len(keys)} arrays ({', '.join(keys[:5])}); name one")
            name = keys[0]
        if name not in keys:
            raise LoadError(f"{path}: no array {name!r} (holds {', '.join(keys[:5])})")
        return store.get(name).numpy()
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise LoadError(f"{path}: unreadable ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
