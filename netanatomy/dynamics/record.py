"""A training run's width record: the curves, the metrics, the similarity matrices
and what is known of the layers, saved as Parquet + JSON in one folder.

Files in a run folder (each written atomically):

* ``width_curves.parquet`` - one row per (record point, layer): ``kind`` (``init``,
  ``step`` or ``epoch``), ``step``, ``epoch``, ``layer``, ``channels``, ``norm_mean``,
  ``var_ratio`` (unbiased variance of the coupled norms / their mean),
  ``sign_changed`` (share of the layer's weights whose sign differs from init),
  ``norms`` (the per-channel coupled norms, a list);
* ``width_metrics.parquet`` - ``kind, step, epoch, name, value`` (loss, accuracy ...);
* ``width_similarity.parquet`` - ``epoch, step, layer, size, matrix`` (the
  norm-sorted cosine-similarity matrix, flattened row-major);
* ``width_run.json`` - the layers (shapes, groups, output positions, channel groups)
  and the tracker's settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._util import atomic_write, atomic_write_text, dumps
from ..errors import UserError

CURVES = "width_curves.parquet"
METRICS = "width_metrics.parquet"
SIMILARITY = "width_similarity.parquet"
META = "width_run.json"

CURVE_COLUMNS = ["kind", "step", "epoch", "layer", "channels", "norm_mean", "var_ratio", "sign_changed", "norms"]


@dataclass
class WidthRecord:
    curves: "object"  # pandas.DataFrame with CURVE_COLUMNS
    metrics: "object" = None  # pandas.DataFrame kind, step, epoch, name, value
    similarity: list[dict] = field(default_factory=list)  # epoch, step, layer, matrix (ndarray)
    meta: dict = field(default_factory=dict)

    # -- queries ------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        seen: list[str] = []
        for name in self.curves["layer"]:
            if name not in seen:
                seen.append(name)
        return seen

    def axis(self) -> str:
        """``epoch`` when at least 5 epoch points exist, else ``step``."""
        n_epochs = int((self.curves["kind"] == "epoch").sum())
        n_layers = max(1, len(self.layers))
        return "epoch" if n_epochs // n_layers >= 5 or not (self.curves["kind"] == "step").any() else "step"

    def curve(self, layer: str, column: str = "var_ratio", axis: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(x, values)`` of one layer along ``axis`` (the init point is x = 0)."""
        axis = axis or self.axis()
        df = self.curves
        keep = (df["layer"] == layer) & df["kind"].isin(["init", axis])
        sub = df[keep].sort_values([axis, "step"]).drop_duplicates(subset=[axis], keep="last")
        return sub[axis].to_numpy(dtype=float), sub[column].to_numpy(dtype=float)

    def norms_at(self, layer: str, x: float, axis: str | None = None) -> np.ndarray:
        axis = axis or self.axis()
        df = self.curves
        sub = df[(df["layer"] == layer) & df["kind"].isin(["init", axis]) & (df[axis] == x)]
        if sub.empty:
            raise KeyError(f"{layer}: no record at {axis} {x}")
        return np.asarray(sub.iloc[-1]["norms"], dtype=float)

    def metric(self, name: str, axis: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        axis = axis or self.axis()
        m = self.metrics
        if m is None or len(m) == 0:
            return np.array([]), np.array([])
        sub = m[(m["name"] == name) & m["kind"].isin(["init", axis])].sort_values(axis)
        return sub[axis].to_numpy(dtype=float), sub["value"].to_numpy(dtype=float)

    def metric_names(self) -> list[str]:
        if self.metrics is None or len(self.metrics) == 0:
            return []
        return sorted(set(self.metrics["name"]))

    # -- files --------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        import pandas as pd

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        curves = self.curves.copy()
        curves["norms"] = curves["norms"].map(lambda v: [float(x) for x in v])
        atomic_write(folder / CURVES, lambda p: curves.to_parquet(p, index=False))
        metrics = self.metrics if self.metrics is not None else pd.DataFrame(
            columns=["kind", "step", "epoch", "name", "value"]
        )
        atomic_write(folder / METRICS, lambda p: metrics.to_parquet(p, index=False))
        sim = pd.DataFrame(
            [
                {
                    "epoch": s["epoch"],
                    "step": s["step"],
                    "layer": s["layer"],
                    "size": int(np.asarray(s["matrix"]).shape[0]),
                    "matrix": np.asarray(s["matrix"], dtype=np.float32).ravel().tolist(),
                }
                for s in self.similarity
            ],
            columns=["epoch", "step", "layer", "size", "matrix"],
        )
        atomic_write(folder / SIMILARITY, lambda p: sim.to_parquet(p, index=False))
        atomic_write_text(folder / META, dumps(self.meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "WidthRecord":
        import pandas as pd

        folder = Path(folder)
        path = folder / CURVES if folder.is_dir() else folder
        if not path.exists():
            raise UserError(f"{folder}: no {CURVES} (not a width run folder)")
        root = path.parent
        try:
            curves = pd.read_parquet(path)
        except Exception as exc:
            raise UserError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
        missing = set(CURVE_COLUMNS) - set(curves.columns)
        if missing:
            raise UserError(f"{path}: missing columns {', '.join(sorted(missing))}")
        curves["norms"] = curves["norms"].map(lambda v: np.asarray(v, dtype=float))
        metrics = pd.read_parquet(root / METRICS) if (root / METRICS).exists() else None
        sims = []
        if (root / SIMILARITY).exists():
            for r in pd.read_parquet(root / SIMILARITY).to_dict("records"):
                n = int(r["size"])
                sims.append(
                    {
                        "epoch": r["epoch"],
                        "step": r["step"],
                        "layer": r["layer"],
                        "matrix": np.asarray(r["matrix"], dtype=np.float32).reshape(n, n),
                    }
                )
        meta = {}
        if (root / META).exists():
            try:
                meta = json.loads((root / META).read_text(encoding="utf-8"))
            except ValueError:
                raise UserError(f"{root / META}: not valid JSON") from None
        return cls(curves=curves, metrics=metrics, similarity=sims, meta=meta)
