"""Reading a zoo and turning checkpoints into feature rows.

Two zoo layouts are read:

* ours (``netanatomy zoo train``): ``zoo.json``, ``metrics.parquet`` (or
  ``metrics.csv``) and ``checkpoints/<run>/epoch_XXX.safetensors``;
* the published Small CNN Zoo (Unterthiner et al. 2020): ``weights.npy`` (one
  flattened network per row; also ``all_weights.npy``), ``metrics.csv[.gz]``
  (also ``all_metrics.csv``; first column the checkpoint path) and, optionally,
  ``layout.csv`` (``varname,start_idx,end_idx,size,shape``). Without a layout the
  zoo's documented order is used: per layer the bias, then the kernel in
  TensorFlow layout ``(kh, kw, in, out)`` / ``(in, out)``.

Either way a zoo becomes a :class:`Zoo`: a metrics table with one row per
checkpoint (``run``, ``epoch``, ``step``, ``test_acc``, ``train_acc``, ... and the
hyper-parameters), and a way to get the flattened weights of any rows in one
canonical order (``layout``: name, start, end, torch-layout shape).

Features (:func:`flat_features`) are, per tensor, the statistics of Unterthiner et
al.: mean, standard deviation, the 0/25/50/75/100th percentiles, plus the L1 and
L2 norms; computed for many checkpoints at once on the flat matrix, with the
same definitions as :func:`netanatomy.stats.tensor_stats` (linear-interpolated
percentiles, ``ddof=1``). :func:`checkpoint_features` does the same for one
checkpoint of any architecture through :func:`netanatomy.load`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import UserError
from ..io import build_layers, load, open_array, open_store, read_tensors

STAT_NAMES = ("mean", "std", "q0", "q25", "q50", "q75", "q100", "l1", "l2")
_PCTS = (0.0, 25.0, 50.0, 75.0, 100.0)


@dataclass
class LayoutEntry:
    name: str  # e.g. conv1.weight
    start: int
    end: int
    shape: tuple  # torch (canonical) layout of the tensor
    source_shape: tuple = ()  # as stored in the flat vector
    transpose: tuple | None = None  # permutation from source to canonical layout

    @property
    def layer(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def role(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass
class Zoo:
    """A zoo as a metrics table plus a flat-weights reader."""

    root: Path
    kind: str  # "netanatomy" or "smallcnnzoo"
    metrics: "object"  # pandas DataFrame, one row per checkpoint
    layout: list[LayoutEntry]
    _reader: Callable[[Sequence[int]], np.ndarray] = field(repr=False, default=None)

    @property
    def num_params(self) -> int:
        return max(e.end for e in self.layout) if self.layout else 0

    def flat(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """Flattened weights ``(len(rows), P)`` float32 of the given metric rows."""
        if rows is None:
            rows = range(len(self.metrics))
        rows = list(rows)
        if not rows:
            return np.zeros((0, self.num_params), dtype=np.float32)
        return self._reader(rows)

    def tensors(self, row: int) -> dict[str, np.ndarray]:
        """The tensors of one checkpoint in torch layout."""
        flat = self.flat([row])[0]
        return {e.name: unflatten(flat, e) for e in self.layout}


def unflatten(flat: np.ndarray, e: LayoutEntry) -> np.ndarray:
    t = flat[e.start : e.end].reshape(e.source_shape or e.shape)
    if e.transpose is not None:
        t = np.transpose(t, e.transpose)
    return np.ascontiguousarray(t)


# ---------------------------------------------------------------------------
# our zoo


def _read_metrics_table(root: Path):
    import pandas as pd

    if (root / "metrics.parquet").exists():
        return pd.read_parquet(root / "metrics.parquet")
    if (root / "metrics.csv").exists():
        return pd.read_csv(root / "metrics.csv")
    raise UserError(f"{root}: no metrics.parquet or metrics.csv (is this a zoo folder?)")


def open_zoo(path: str | Path) -> Zoo:
    """Open a zoo folder of either layout (see the module docstring)."""
    root = Path(path)
    if not root.exists():
        raise UserError(f"{root}: no such folder")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (a zoo is a folder)")
    if (root / "zoo.json").exists():
        return _open_ours(root)
    for name in ("weights.npy", "all_weights.npy"):
        if (root / name).exists():
            return open_small_cnn_zoo(root)
    if (root / "metrics.parquet").exists() or (root / "metrics.csv").exists():
        return _open_ours(root)
    raise UserError(
        f"{root}: not a zoo (expected zoo.json + metrics from 'netanatomy zoo train', "
        "or the Small CNN Zoo files weights.npy + metrics.csv)"
    )


def _open_ours(root: Path) -> Zoo:
    df = _read_metrics_table(root)
    need = {"run", "epoch", "checkpoint", "test_acc"}
    missing = need - set(df.columns)
    if missing:
        raise UserError(f"{root}: metrics table lacks columns {', '.join(sorted(missing))}")
    df = df.copy()
    df["checkpoint"] = df["checkpoint"].fillna("").astype(str)
    paths = [root / c if c else None for c in df["checkpoint"]]
    # the layout from the first readable checkpoint (any architecture works)
    layout = None
    for p in paths:
        if p is not None and p.exists():
            layout = _safetensors_layout(p)
            break
    if layout is None:
        raise UserError(f"{root}: no checkpoint files found")

    def reader(rows):
        out = np.full((len(rows), layout[-1].end), np.nan, dtype=np.float32)
        for i, r in enumerate(rows):
            p = paths[r]
            if p is None:
                continue
            t, _ = read_tensors(p, "np")
            for e in layout:
                if e.name not in t or tuple(t[e.name].shape) != tuple(e.shape):
                    raise UserError(f"{p}: tensor {e.name} missing or of another shape than the zoo's")
                out[i, e.start : e.end] = t[e.name].reshape(-1)
        return out

    return Zoo(root, "netanatomy", df, layout, reader)


def _safetensors_layout(path: Path) -> list[LayoutEntry]:
    store = open_store(path)
    keys = store.keys()
    shapes = {k: tuple(store.shape(k)) for k in keys}
    from .train import PARAM_NAMES

    order = [k for k in PARAM_NAMES if k in shapes] + sorted(k for k in keys if k not in PARAM_NAMES)
    entries, pos = [], 0
    for k in order:
        n = int(np.prod(shapes[k])) if shapes[k] else 1
        entries.append(LayoutEntry(k, pos, pos + n, shapes[k], shapes[k]))
        pos += n
    return entries


# ---------------------------------------------------------------------------
# the published Small CNN Zoo layout

# documented order of the 4,970 values: per layer bias then kernel (TF layout)
_DEFAULT_SMALLCNN = [
    ("conv1.bias", (16,)), ("conv1.weight", (3, 3, 1, 16)),
    ("conv2.bias", (16,)), ("conv2.weight", (3, 3, 16, 16)),
    ("conv3.bias", (16,)), ("conv3.weight", (3, 3, 16, 16)),
    ("fc.bias", (10,)), ("fc.weight", (16, 10)),
]


def _tf_entry(name: str, start: int, shape: tuple) -> LayoutEntry:
    n = int(np.prod(shape)) if shape else 1
    if len(shape) == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        return LayoutEntry(name, start, start + n, (shape[3], shape[2], shape[0], shape[1]), shape, (3, 2, 0, 1))
    if len(shape) == 2:  # (in, out) -> (out, in)
        return LayoutEntry(name, start, start + n, (shape[1], shape[0]), shape, (1, 0))
    return LayoutEntry(name, start, start + n, shape, shape, None)


def _parse_shape(s: str) -> tuple:
    nums = re.findall(r"\d+", str(s))
    return tuple(int(n) for n in nums)


def _layer_names_from_vars(varnames: list[str]) -> list[str]:
    """TF variable names (``sequential/conv2d_1/kernel:0``) -> conv1.weight, ..."""
    out, conv_i, dense_i, other_i = [], 0, 0, 0
    seen: dict[str, str] = {}
    for v in varnames:
        parts = v.replace(":0", "").split("/")
        layer = "/".join(parts[:-1]) or parts[0]
        role = "bias" if parts[-1].startswith("bias") else "weight"
        if layer not in seen:
            low = layer.lower()
            if "conv" in low:
                conv_i += 1
                seen[layer] = f"conv{conv_i}"
            elif "dense" in low or "fc" in low or "linear" in low:
                dense_i += 1
                seen[layer] = "fc" if dense_i == 1 else f"fc{dense_i}"
            else:
                other_i += 1
                seen[layer] = f"layer{other_i}"
        out.append(f"{seen[layer]}.{role}")
    return out


def read_layout_csv(path: Path) -> list[LayoutEntry]:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise UserError(f"{path}: unreadable layout ({exc})") from exc
    cols = {c.lower().strip(): c for c in df.columns}

    def col(*names):
        for n in names:
            if n in cols:
                return df[cols[n]]
        raise UserError(f"{path}: layout needs a column {names[0]!r} (has {', '.join(df.columns)})")

    var = [str(v) for v in col("varname", "name", "variable")]
    start = [int(v) for v in col("start_idx", "start")]
    shapes = [_parse_shape(s) for s in col("shape")]
    names = _layer_names_from_vars(var)
    entries = [_tf_entry(n, s, sh) for n, s, sh in zip(names, start, shapes)]
    entries.sort(key=lambda e: e.start)
    return entries


def open_small_cnn_zoo(root: str | Path) -> Zoo:
    """Read the published Small CNN Zoo files (weights are memory-mapped)."""
    import pandas as pd

    root = Path(root)
    wpath = next((root / n for n in ("weights.npy", "all_weights.npy") if (root / n).exists()), None)
    mpath = next((root / n for n in ("metrics.csv", "metrics.csv.gz", "all_metrics.csv", "all_metrics.csv.gz") if (root / n).exists()), None)
    if wpath is None or mpath is None:
        raise UserError(f"{root}: the Small CNN Zoo layout needs weights.npy and metrics.csv[.gz]")
    W = open_array(wpath)
    if W.ndim != 2:
        raise UserError(f"{wpath}: expected a 2-D array (networks x weights), got shape {W.shape}")
    try:
        raw = pd.read_csv(mpath)
    except Exception as exc:
        raise UserError(f"{mpath}: unreadable ({exc})") from exc
    if len(raw) != W.shape[0]:
        raise UserError(f"{root}: {W.shape[0]} weight rows but {len(raw)} metric rows")
    if (root / "layout.csv").exists():
        layout = read_layout_csv(root / "layout.csv")
    else:
        layout, pos = [], 0
        for name, shape in _DEFAULT_SMALLCNN:
            e = _tf_entry(name, pos, shape)
            layout.append(e)
            pos = e.end
    if max(e.end for e in layout) != W.shape[1]:
        raise UserError(f"{root}: layout covers {max(e.end for e in layout)} values but rows have {W.shape[1]}")
    df = _normalise_smallcnn_metrics(raw)

    def reader(rows):
        return np.asarray(W[np.asarray(rows)], dtype=np.float32)

    return Zoo(root, "smallcnnzoo", df, layout, reader)


def _normalise_smallcnn_metrics(raw):
    import pandas as pd

    df = pd.DataFrame(index=range(len(raw)))
    first = raw.columns[0]
    ckpt = raw["modeldir"] if "modeldir" in raw.columns else raw[first]
    ckpt = ckpt.astype(str)
    # checkpoint paths look like .../<run id>/model.ckpt-<step>; the run is the folder
    df["checkpoint"] = ckpt.values
    df["run"] = [p.rstrip("/").rsplit("/", 1)[0] if "/" in p and "ckpt" in p.rsplit("/", 1)[-1] else p for p in ckpt]
    rename = {"test_accuracy": "test_acc", "train_accuracy": "train_acc", "test_loss": "test_loss", "train_loss": "train_loss", "step": "step"}
    for src, dst in rename.items():
        if src in raw.columns:
            df[dst] = pd.to_numeric(raw[src], errors="coerce").values
    if "step" not in df.columns:
        df["step"] = [int(m.group(1)) if (m := re.search(r"ckpt-(\d+)", p)) else 0 for p in ckpt]
    if "test_acc" not in df.columns:
        raise UserError("Small CNN Zoo metrics need a test_accuracy column")
    for c in raw.columns:
        if c.startswith("config."):
            df[c[len("config."):]] = raw[c].values
    df = df.rename(columns={"learning_rate": "lr", "l2reg": "l2", "w_init": "init"})
    df["epoch"] = df.groupby("run")["step"].rank(method="dense").astype(int) - 1
    df["diverged"] = False
    return df


# ---------------------------------------------------------------------------
# features


def flat_features(W: np.ndarray, layout: list[LayoutEntry], chunk: int = 2000):
    """Per-tensor statistics for every row of ``W`` -> DataFrame (rows x features).

    Columns ``<layer>.<weight|bias>.<stat>`` with stats :data:`STAT_NAMES`;
    rows with any non-finite value get NaN features."""
    import pandas as pd

    cols: dict[str, np.ndarray] = {}
    n = W.shape[0]
    for e in layout:
        out = {s: np.empty(n) for s in STAT_NAMES}
        for s0 in range(0, n, chunk):
            x = np.asarray(W[s0 : s0 + chunk, e.start : e.end], dtype=np.float64)
            q = np.percentile(x, _PCTS, axis=1)
            out["mean"][s0 : s0 + chunk] = x.mean(1)
            out["std"][s0 : s0 + chunk] = x.std(1, ddof=1) if x.shape[1] > 1 else 0.0
            for name, row in zip(("q0", "q25", "q50", "q75", "q100"), q):
                out[name][s0 : s0 + chunk] = row
            out["l1"][s0 : s0 + chunk] = np.abs(x).sum(1)
            out["l2"][s0 : s0 + chunk] = np.sqrt((x * x).sum(1))
        for s in STAT_NAMES:
            cols[f"{e.name}.{s}"] = out[s]
    df = pd.DataFrame(cols)
    bad = ~np.isfinite(df.to_numpy()).all(1)
    if bad.any():
        df.loc[bad, :] = np.nan
    return df


def checkpoint_features(source) -> dict:
    """The same statistics for one checkpoint of any architecture (through
    :func:`netanatomy.load` and :func:`netanatomy.stats.tensor_stats`)."""
    import torch

    from ..stats import tensor_stats

    m = source if hasattr(source, "layers") else load(source)
    out: dict[str, float] = {}
    for layer in m.layers:
        for role, t in (("weight", layer.weight()), ("bias", layer.bias())):
            if t is None:
                continue
            st = tensor_stats(t)
            x = t.detach().reshape(-1).to(torch.float64)
            rec = {"mean": st["mean"], "std": st["std"], "q0": st["q0"], "q25": st["q25"], "q50": st["q50"],
                   "q75": st["q75"], "q100": st["q100"], "l1": float(x.abs().sum()), "l2": st["fro_norm"]}
            for k, v in rec.items():
                out[f"{layer.name}.{role}.{k}"] = v
    return out


def esd_available() -> bool:
    try:
        import netanatomy.spectral.analysis  # noqa: F401
    except Exception:
        return False
    return True


def esd_features(tensors: dict[str, np.ndarray]) -> dict:
    """Per-layer ESD metrics (alpha, log spectral norm, stable rank ...) from
    :mod:`netanatomy.spectral`, when that package is present; {} otherwise."""
    if not esd_available():
        return {}
    import torch

    from ..model import DictStore, Model
    from ..spectral.analysis import SpectralAnalysis, SpectralOptions

    store = DictStore({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    layers, skipped = build_layers(store, layout="torch")
    m = Model(name="checkpoint", source="zoo", format="dict", layers=layers, skipped=skipped)
    res = SpectralAnalysis().run(m, SpectralOptions())
    out = {}
    keep = ("alpha", "log_spectral_norm", "stable_rank", "log_norm", "alpha_weighted", "log_alpha_norm", "entropy", "num_pl_spikes")
    for r in res.records:
        if r.get("error"):
            continue
        for k in keep:
            v = r.get(k)
            if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)):
                out[f"{r['layer']}.esd.{k}"] = float(v)
    return out


def _esd_work(payload):
    """Work function: ESD features of a list of (row index, tensors)."""
    return {str(i): esd_features(t) for i, t in payload}
