"""Per-layer allocations from per-layer alpha, as a training or pruning script reads
them: AlphaPruning-style sparsity ratios and TempBalance-style learning-rate
factors. Formulas and sources: ``docs/spectral.md`` ("Allocations").

Input is the ``esd`` records (or any ``[{"layer", "alpha", "params"}]``);
layers with a non-finite alpha get the global value (the target sparsity, factor
1) and are listed in ``skipped``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .layertypes import layer_depth


@dataclass
class Allocation:
    kind: str  # "sparsity" | "lr"
    target: float  # global sparsity, or the base learning-rate factor (1.0)
    metric: str
    rows: list[dict] = field(default_factory=list)  # layer, alpha, params, value
    skipped: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def values(self) -> dict[str, float]:
        return {r["layer"]: r["value"] for r in self.rows}

    def weighted_mean(self) -> float:
        p = np.array([r["params"] for r in self.rows], dtype=np.float64)
        v = np.array([r["value"] for r in self.rows], dtype=np.float64)
        return float((p * v).sum() / p.sum()) if p.sum() > 0 else math.nan

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "target": self.target, "metric": self.metric, "settings": self.settings,
                           "values": self.values, "rows": self.rows, "skipped": self.skipped}, indent=1)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer", self.metric, "params", self.kind])
        for r in self.rows:
            w.writerow([r["layer"], repr(r["alpha"]), r["params"], repr(r["value"])])
        return buf.getvalue()

    def write(self, path: str | Path) -> Path:
        """``.csv`` writes the CSV, anything else the JSON."""
        from .._util import atomic_write_text

        path = Path(path)
        return atomic_write_text(path, self.to_csv() if path.suffix.lower() == ".csv" else self.to_json())


def _table(records, metric: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, alphas, params = [], [], []
    for r in records:
        if r.get("error") or "slice" in r:
            continue
        a = r.get(metric)
        a = float(a) if isinstance(a, (int, float)) and a is not None else math.nan
        p = r.get("params")
        if p is None:
            p = int(r.get("N", 0)) * int(r.get("M", 0)) * int(r.get("slices", 1) or 1)
        names.append(str(r["layer"]))
        alphas.append(a)
        params.append(float(p))
    if not names:
        raise UserError("no layer with a spectrum to allocate over")
    return names, np.array(alphas), np.array(params)


def _blockwise(names: list[str], values: np.ndarray) -> np.ndarray:
    """Each layer's value replaced by the mean over the finite values of its block
    (the first integer in its name); layers outside any block keep their own."""
    out = values.copy()
    blocks: dict[int, list[int]] = {}
    for i, n in enumerate(names):
        d = layer_depth(n)
        if d >= 0:
            blocks.setdefault(d, []).append(i)
    for idx in blocks.values():
        v = values[idx]
        v = v[np.isfinite(v)]
        if v.size:
            out[idx] = np.where(np.isfinite(values[idx]), v.mean(), values[idx])
    return out


def sparsity_allocation(records, sparsity: float, epsilon: float = 0.2, metric: str = "alpha_hill",
                        blockwise: bool = False) -> Allocation:
    """AlphaPruning's layer-wise sparsity (Lu et al., NeurIPS 2024, arXiv:2410.10912,
    ``ww_sparsity``): alpha mapped linearly onto [1 - epsilon, 1 + epsilon] (the
    lowest alpha, the heaviest tail and best-trained layer, gets the lowest ratio),
    then all ratios scaled by one factor so that the parameter-weighted mean
    sparsity equals ``sparsity``. Higher alpha -> higher sparsity."""
    if not isinstance(sparsity, (int, float)) or not (0.0 < float(sparsity) < 1.0):
        raise UserError(f"sparsity must lie in (0, 1), not {sparsity!r}")
    if not isinstance(epsilon, (int, float)) or not (0.0 <= float(epsilon) < 1.0):
        raise UserError(f"epsilon must lie in [0, 1), not {epsilon!r}")
    names, alphas, params = _table(records, metric)
    if blockwise:
        alphas = _blockwise(names, alphas)
    ok = np.isfinite(alphas) & (params > 0)
    ratios = np.ones_like(alphas)
    if ok.any():
        lo, hi = float(alphas[ok].min()), float(alphas[ok].max())
        if hi > lo:
            ratios[ok] = (alphas[ok] - lo) / (hi - lo) * (2 * epsilon) + (1 - epsilon)
    scale = sparsity * params.sum() / float((params * ratios).sum())
    values = ratios * scale
    if values.max() >= 1.0:
        worst = names[int(values.argmax())]
        raise UserError(f"sparsity {sparsity} with epsilon {epsilon} would prune all of {worst} "
                        f"({values.max():.3f} >= 1); use a smaller epsilon or sparsity")
    rows = [{"layer": n, "alpha": float(a), "params": int(p), "value": float(v)}
            for n, a, p, v in zip(names, alphas, params, values)]
    skipped = [n for n, g in zip(names, ok) if not g]
    return Allocation("sparsity", float(sparsity), metric, rows, skipped,
                      {"epsilon": float(epsilon), "blockwise": bool(blockwise)})


def lr_allocation(records, lr_min_ratio: float = 0.5, lr_slope: float = 1.0, metric: str = "alpha_hill",
                  blockwise: bool = False) -> Allocation:
    """TempBalance's per-layer learning-rate factors (Zhou et al., NeurIPS 2023,
    arXiv:2312.00359, ``get_layer_temps``, method ``tb_linear_map``): alpha mapped
    linearly onto [lr_min_ratio, lr_min_ratio + lr_slope]; multiply the base
    learning rate by the factor. Higher alpha (a less trained layer) -> larger
    learning rate."""
    if not (isinstance(lr_min_ratio, (int, float)) and lr_min_ratio > 0):
        raise UserError(f"lr_min_ratio must be > 0, not {lr_min_ratio!r}")
    if not (isinstance(lr_slope, (int, float)) and lr_slope >= 0):
        raise UserError(f"lr_slope must be >= 0, not {lr_slope!r}")
    names, alphas, params = _table(records, metric)
    if blockwise:
        alphas = _blockwise(names, alphas)
    ok = np.isfinite(alphas)
    values = np.ones_like(alphas)
    if ok.any():
        lo, hi = float(alphas[ok].min()), float(alphas[ok].max())
        if hi > lo:
            values[ok] = np.interp(alphas[ok], [lo, hi], [lr_min_ratio, lr_min_ratio + lr_slope])
        else:
            values[ok] = lr_min_ratio + lr_slope / 2
    rows = [{"layer": n, "alpha": float(a), "params": int(p), "value": float(v)}
            for n, a, p, v in zip(names, alphas, params, values)]
    skipped = [n for n, g in zip(names, ok) if not g]
    return Allocation("lr", 1.0, metric, rows, skipped,
                      {"lr_min_ratio": float(lr_min_ratio), "lr_slope": float(lr_slope), "blockwise": bool(blockwise)})


def parse_allocate(spec: str) -> tuple[str, dict]:
    """``"sparsity=0.7[,epsilon=0.2][,blockwise=1][,metric=alpha]"`` or
    ``"lr[,lr_min_ratio=0.5][,lr_slope=1]"`` -> (kind, keyword arguments)."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise UserError("--allocate needs sparsity=S or lr")
    kw: dict = {}
    kind = None
    for p in parts:
        key, eq, val = p.partition("=")
        key = key.strip()
        if key == "lr" and not eq:
            kind = "lr"
            continue
        if not eq:
            raise UserError(f"--allocate: {p!r} is not key=value")
        if key == "sparsity":
            kind = "sparsity"
        try:
            if key == "metric":
                kw[key] = val.strip()
            elif key == "blockwise":
                kw[key] = val.strip().lower() in ("1", "true", "yes")
            elif key in ("sparsity", "epsilon", "lr_min_ratio", "lr_slope"):
                kw[key] = float(val)
            else:
                raise UserError(f"--allocate has no setting {key!r} (sparsity, epsilon, blockwise, metric, "
                                "lr, lr_min_ratio, lr_slope)")
        except ValueError:
            raise UserError(f"--allocate: {key} must be a number, not {val!r}") from None
    if kind is None:
        raise UserError("--allocate needs sparsity=S or lr")
    allowed = {"sparsity": {"sparsity", "epsilon", "blockwise", "metric"},
               "lr": {"lr_min_ratio", "lr_slope", "blockwise", "metric"}}[kind]
    bad = set(kw) - allowed
    if bad:
        raise UserError(f"--allocate {kind}: settings {', '.join(sorted(bad))} do not apply")
    return kind, kw


def allocate(records, spec: str) -> Allocation:
    kind, kw = parse_allocate(spec)
    return sparsity_allocation(records, **kw) if kind == "sparsity" else lr_allocation(records, **kw)
