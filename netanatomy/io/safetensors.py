"""safetensors files: one file, or a sharded folder with its ``*.index.json``.

The header is parsed and checked here (sizes, offsets, dtypes) and each tensor is
read on request with one ``pread`` into its own buffer, so peak memory follows
the largest tensor, not the model. Nothing in a safetensors file can run code.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import LoadError
from ..model import Model
from ._infer import build_layers

_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsStore:
    """Lazy reader over one or more safetensors files."""

    def __init__(self, files: list[Path]):
        self._entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            header, data_start, size = _read_header(f)
            for key, info in header.items():
                if key == "__metadata__":
                    if isinstance(info, dict):
                        self.metadata.update({str(k): str(v) for k, v in info.items()})
                    continue
                self._entries[key] = _check_entry(f, key, info, data_start, size)

    def keys(self) -> list[str]:
        # safetensors writers sort keys alphabetically; natural order puts
        # layer.2 before layer.10, which is closer to the model's own order.
        return sorted(self._entries, key=_natural_key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][2]

    def dtype(self, key: str) -> str:
        return str(_DTYPES[self._entries[key][1]][0]).removeprefix("torch.")

    def file_of(self, key: str) -> Path:
        return self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        path, code, shape, start, end = self._entries[key]
        tdtype, _ = _DTYPES[code]
        buf = bytearray(end - start)
        with open(path, "rb") as fh:
            fh.seek(start)
            got = fh.readinto(buf)
        if got != len(buf):
            raise LoadError(f"{path}: truncated while reading {key!r}")
        if not buf:
            return torch.empty(shape, dtype=tdtype)
        t = torch.frombuffer(buf, dtype=tdtype)
        return t.reshape(shape)


def _natural_key(name: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _read_header(path: Path) -> tuple[dict, int, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise LoadError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise LoadError(f"{path}: not a safetensors file or truncated (header of {n} bytes in a {size}-byte file)")
            raw = fh.read(n)
    except OSError as exc:
        raise LoadError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoadError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header, 8 + n, size


def _check_entry(path: Path, key: str, info, data_start: int, size: int):
    try:
        code = info["dtype"]
        shape = tuple(int(s) for s in info["shape"])
        a, b = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise LoadError(f"{path}: malformed header entry for {key!r}") from None
    if code not in _DTYPES:
        raise LoadError(f"{path}: tensor {key!r} has unsupported dtype {code}")
    if any(s < 0 for s in shape):
        raise LoadError(f"{path}: tensor {key!r} has a negative dimension")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if b - a != n * _DTYPES[code][1] or a < 0:
        raise LoadError(f"{path}: tensor {key!r} has offsets that do not match its shape")
    if data_start + b > size:
        raise LoadError(f"{path}: truncated (tensor {key!r} ends past the end of the file)")
    return (path, code, shape, data_start + a, data_start + b)


def shard_files(index_path: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, all inside its folder."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise LoadError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from None
    folder = index_path.parent.resolve()
    files = []
    for n in names:
        p = (folder / str(n)).resolve()
        if folder not in p.parents:
            raise LoadError(f"{index_path}: shard {n!r} lies outside the model folder; refused")
        if not p.is_file():
            raise LoadError(f"{index_path}: shard {n!r} is missing")
        files.append(p)
    return files


def resolve_files(path: Path) -> tuple[list[Path], Path]:
    """The files behind a ``.safetensors`` file, an ``*.index.json`` or a folder
    holding either, and the path that names them (the index, else ``path``)."""
    if path.name.endswith(".index.json"):
        return shard_files(path), path
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if indexes:
            return shard_files(indexes[0]), indexes[0]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise LoadError(f"{path}: no safetensors files in this folder")
        return files, path
    return [path], path


def load(path: str | os.PathLike, *, layout: str = "auto", name: str | None = None) -> Model:
    """Load a ``.safetensors`` file, an ``*.index.json`` or a folder holding either."""
    path = Path(path)
    files, source = resolve_files(path)
    store = SafetensorsStore(files)
    layers, skipped = build_layers(store, layout=layout)
    notes = [f"{len(files)} shards"] if len(files) > 1 else []
    return Model(
        name=name or _model_name(path),
        source=str(source),
        format="safetensors",
        layers=layers,
        skipped=skipped,
        notes=notes,
        metadata=dict(store.metadata),
    )


def _model_name(path: Path) -> str:
    if path.is_dir():
        return path.resolve().name
    stem = path.name.removesuffix(".index.json").removesuffix(".safetensors")
    if stem in ("model", "pytorch_model", "diffusion_pytorch_model"):
        return path.resolve().parent.name
    return stem
