"""Which format a file is, and which file a folder stands for (the one place that decides)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoadError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".npz")


def format_of(path: Path) -> str | None:
    """``safetensors``, ``torch``, ``onnx``, ``npz`` or None: by suffix, else by the first bytes."""
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


def resolve(path: Path) -> tuple[str | None, Path]:
    """``(format, what to open)`` for an existing file or folder.

    A folder of safetensors files (or with a ``*.safetensors.index.json``) stands
    for itself; a folder with a ``*.bin.index.json`` for that index; any other
    folder for the one weights file inside it.
    """
    if not path.is_dir():
        return format_of(path), path
    if list(path.glob("*.safetensors.index.json")) or list(path.glob("*.safetensors")):
        return "safetensors", path
    bin_index = sorted(path.glob("*.bin.index.json"))
    if bin_index:
        return "torch", bin_index[0]
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES))
    if not candidates:
        raise LoadError(f"{path}: no weights found in this folder (looked for {', '.join(WEIGHT_SUFFIXES)})")
    if len(candidates) > 1:
        shown = ", ".join(p.name for p in candidates[:5]) + (" ..." if len(candidates) > 5 else "")
        raise LoadError(f"{path}: several weight files ({shown}); name one")
    return format_of(candidates[0]), candidates[0]


def unrecognised(path: Path) -> LoadError:
    return LoadError(
        f"{path}: unrecognised file type (supported: {', '.join(WEIGHT_SUFFIXES)}, "
        "or a folder holding them)"
    )
