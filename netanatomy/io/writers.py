"""A streaming, atomic safetensors writer that hashes what it writes.

The header (names, dtypes, shapes, offsets) is known before any tensor is
computed, so it is written first and each tensor is appended as soon as it is
ready: writing a model never needs the whole model in memory.

Two hashes are reported:

* ``content_sha256`` (stored in the file's metadata as ``netanatomy.content_sha256``):
  SHA-256 over, for each tensor in file order, ``name NUL dtype NUL shape NUL``
  followed by its raw little-endian bytes. It identifies the weights whatever
  the metadata says; :func:`content_hash` recomputes it from any safetensors file.
* ``file_sha256``: SHA-256 of the finished file, as ``sha256sum`` prints it
  (also written next to the file as ``<file>.sha256``).

The file is written to a temporary name in the same folder and renamed into
place, so a killed run leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .._util import atomic_write_text
from ..errors import UserError
from .safetensors import SafetensorsStore

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
HASH_KEY = "netanatomy.content_sha256"
_PLACEHOLDER = "0" * 64


@dataclass
class WrittenFile:
    path: Path
    content_sha256: str
    file_sha256: str
    num_tensors: int
    num_bytes: int


def _entry_prefix(key: str, code: str, shape: tuple[int, ...]) -> bytes:
    return f"{key}\0{code}\0{','.join(map(str, shape))}\0".encode()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Write tensors one by one into a safetensors file.

    ``entries`` lists ``(name, dtype, shape)`` in the order the tensors will be
    given to :meth:`write`. Use as a context manager; on an exception the
    temporary file is removed and the target is left untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        sidecar: bool = True,
    ):
        self.path = Path(path)
        self.sidecar = sidecar
        self._entries = []
        offset = 0
        header: dict = {}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta.setdefault("format", "pt")
        meta[HASH_KEY] = _PLACEHOLDER
        header["__metadata__"] = meta
        for name, dtype, shape in entries:
            if dtype not in DTYPE_CODES:
                raise UserError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            n = 1
            for s in shape:
                n *= int(s)
            size = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + size]}
            self._entries.append((name, dtype, tuple(int(s) for s in shape), size))
            offset += size
        self.num_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self._header = raw
        self._hash_at = 8 + raw.index(_PLACEHOLDER.encode())
        self._i = 0
        self._h = hashlib.sha256()
        self._fh = None
        self._tmp: Path | None = None

    def __enter__(self) -> "SafetensorsWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "w+b")
        self._fh.write(len(self._header).to_bytes(8, "little"))
        self._fh.write(self._header)
        return self

    def write(self, name: str, t: torch.Tensor) -> None:
        if self._i >= len(self._entries):
            raise RuntimeError(f"unexpected tensor {name!r}: all entries written")
        ename, dtype, shape, size = self._entries[self._i]
        if name != ename or t.dtype != dtype or tuple(t.shape) != shape:
            raise RuntimeError(f"tensor {name!r} {t.dtype} {tuple(t.shape)} does not match entry {ename!r} {dtype} {shape}")
        buf = tensor_bytes(t)
        if buf.nbytes != size:
            raise RuntimeError(f"tensor {name!r}: {buf.nbytes} bytes, expected {size}")
        self._h.update(_entry_prefix(name, DTYPE_CODES[dtype], shape))
        self._h.update(buf)
        self._fh.write(buf)
        self._i += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        fh, tmp = self._fh, self._tmp
        try:
            if exc_type is None:
                if self._i != len(self._entries):
                    raise RuntimeError(f"only {self._i} of {len(self._entries)} tensors written")
                self.content_sha256 = self._h.hexdigest()
                fh.seek(self._hash_at)
                fh.write(self.content_sha256.encode())
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                self.file_sha256 = file_sha256(tmp)
                os.replace(tmp, self.path)
                if self.sidecar:
                    atomic_write_text(self.path.with_name(self.path.name + ".sha256"), f"{self.file_sha256}  {self.path.name}\n")
        finally:
            if not fh.closed:
                fh.close()
            if tmp is not None and tmp.exists():
                tmp.unlink()

    def result(self) -> WrittenFile:
        return WrittenFile(self.path, self.content_sha256, self.file_sha256, len(self._entries), self.num_bytes)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, sidecar: bool = True) -> WrittenFile:
    """Write an in-memory state dict (atomically, hashed)."""
    items = [(k, v) for k, v in tensors.items()]
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in items]
    with SafetensorsWriter(path, entries, metadata, sidecar=sidecar) as w:
        for k, v in items:
            w.write(k, v)
    return w.result()


def content_hash(path: str | os.PathLike) -> str:
    """Recompute ``content_sha256`` of a safetensors file (tensors in file order)."""
    store = SafetensorsStore([Path(path)])
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    h = hashlib.sha256()
    for k in order:
        t = store.get(k)
        h.update(_entry_prefix(k, DTYPE_CODES[t.dtype], tuple(t.shape)))
        h.update(tensor_bytes(t))
    return h.hexdigest()


def stored_hash(path: str | os.PathLike) -> str | None:
    return SafetensorsStore([Path(path)]).metadata.get(HASH_KEY)
