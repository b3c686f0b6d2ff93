"""PyTorch checkpoints (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

Always ``torch.load(weights_only=True)``: a file that needs code to unpickle is
refused, never run. Zip-format files are memory-mapped so tensors are read on
use; the legacy (pre-zip) format is read whole. Plain state dicts, nested ones
(``state_dict``, ``model``, ``ema`` ...) and DDP / torch.compile prefixes are
handled; sharded ``pytorch_model.bin.index.json`` folders too.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from ..errors import LoadError, UnsafeFileError
from ..model import DictStore, Model
from ._infer import build_layers

# Where trainers put the weights inside a checkpoint dict, in order of preference.
NESTED_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "params",
    "weights",
    "ema",
    "model_ema",
    "ema_state_dict",
    "state_dict_ema",
)


def read_state_dict(path: Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a checkpoint's tensors as a flat ``name -> tensor`` dict, plus notes."""
    obj = _torch_load(path)
    notes: list[str] = []
    if isinstance(obj, torch.Tensor):
        raise LoadError(f"{path}: holds a single tensor, not a model's weights")
    if not isinstance(obj, dict):
        raise LoadError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    if key is not None:
        if key not in obj or not isinstance(obj[key], dict):
            found = ", ".join(k for k, v in obj.items() if isinstance(v, dict)) or "none"
            raise LoadError(f"{path}: no weights under key {key!r} (dict keys: {found})")
        obj, picked = obj[key], key
        notes.append(f"weights taken from key {key!r}")
    elif not _has_tensors_at_top(obj):
        picked = next((k for k in NESTED_KEYS if isinstance(obj.get(k), dict) and _flat_tensor_count(obj[k])), None)
        if picked is None:
            found = ", ".join(map(str, obj)) or "nothing"
            raise LoadError(f"{path}: found no tensors (top-level keys: {found})")
        others = [k for k in NESTED_KEYS if k != picked and isinstance(obj.get(k), dict) and _flat_tensor_count(obj[k])]
        obj = obj[picked]
        notes.append(f"weights taken from key {picked!r}" + (f" (also present: {', '.join(others)}; choose with --key)" if others else ""))
    flat: dict[str, torch.Tensor] = {}
    _flatten(obj, "", flat)
    if not flat:
        raise LoadError(f"{path}: holds no tensors")
    return flat, notes


def read_sharded_state_dict(index: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the shards a ``pytorch_model.bin.index.json`` names."""
    from .safetensors import shard_files

    tensors: dict[str, torch.Tensor] = {}
    for f in shard_files(index):
        part, _ = read_state_dict(f)
        tensors.update(part)
    return tensors


def _torch_load(path: Path):
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise LoadError(f"{path}: cannot read ({exc.strerror})") from None
    is_zip = magic[:2] == b"PK"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        unsafe = _code_references(path, is_zip)
        if unsafe is None:
            raise LoadError(f"{path}: not a PyTorch checkpoint or corrupt") from None
        if unsafe or "Unsupported global" in str(exc):
            what = f" ({', '.join(unsafe[:3])})" if unsafe else ""
            raise UnsafeFileError(
                f"{path}: refused: unpickling it would run code{what}; "
                "save the model's state_dict() instead (netanatomy only loads weights)"
            ) from None
        raise LoadError(f"{path}: unsupported checkpoint contents ({_weights_error(str(exc))})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, KeyError, IndexError, TypeError, AttributeError, ImportError) as exc:
        raise LoadError(f"{path}: not a PyTorch checkpoint or corrupt ({_first_line(str(exc)) or type(exc).__name__})") from None


# Globals a weights-only checkpoint may name; anything else would import code.
_SAFE_GLOBAL_PREFIXES = (
    "torch.",
    "collections.OrderedDict",
    "_codecs.encode",
    "builtins.set",
    "builtins.frozenset",
    "builtins.bytearray",
    "numpy.core.multiarray._reconstruct",
    "numpy.dtype",
    "numpy.ndarray",
)


def _code_references(path: Path, is_zip: bool) -> list[str] | None:
    """Globals that the file's pickle would import, found by reading its opcodes
    (nothing is executed). ``None`` if the file is not a readable pickle."""
    import pickletools

    try:
        if is_zip:
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                data = zf.read(member)
        else:
            data = path.read_bytes()
        found: list[str] = []
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # any malformed byte stream: not a pickle we can read
        return None
    return [g for g in dict.fromkeys(found) if not g.startswith(_SAFE_GLOBAL_PREFIXES)]


def _weights_error(msg: str) -> str:
    import re

    m = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
    return m.group(1).strip().splitlines()[0][:160] if m else _first_line(msg)


def _first_line(msg: str) -> str:
    for line in msg.strip().splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def _has_tensors_at_top(obj: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _flat_tensor_count(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_flat_tensor_count(v) for v in obj.values())
    return 0


def _flatten(obj, prefix: str, out: dict) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, dict):
            _flatten(v, name + ".", out)


def load(path: str | os.PathLike, *, key: str | None = None, layout: str = "auto", name: str | None = None) -> Model:
    path = Path(path)
    if path.name.endswith(".index.json"):
        return _load_sharded(path, layout=layout, name=name)
    tensors, notes = read_state_dict(path, key)
    store = DictStore(tensors)
    layers, skipped = build_layers(store, layout=layout)
    return Model(
        name=name or path.stem,
        source=str(path),
        format="torch",
        layers=layers,
        skipped=skipped,
        notes=notes,
    )


def _load_sharded(index: Path, *, layout: str, name: str | None) -> Model:
    tensors = read_sharded_state_dict(index)
    layers, skipped = build_layers(DictStore(tensors), layout=layout)
    return Model(
        name=name or index.resolve().parent.name,
        source=str(index),
        format="torch",
        layers=layers,
        skipped=skipped,
    )
