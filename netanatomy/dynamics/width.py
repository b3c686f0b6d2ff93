"""Analysis of a width record: a verdict per layer (see :mod:`.rule`), the three
training stages, the early-vs-final norm correlation and where the bottlenecks are.

The coupled norm spreads a DS reading to the neighbours of a bottleneck (the layer
feeding a too-narrow layer shares its outgoing weights with it), so among a run of
adjacent DS layers only the narrowest is called the ``bottleneck``; the others are
marked ``ds_neighbour_of``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .record import WidthRecord
from .rule import DS, IS, RuleOptions, classify_curve, smooth, stages


@dataclass
class WidthAnalysis:
    layers: list[dict]  # one row per layer
    stages: dict  # model-level stage boundaries
    correlation: dict[str, list[tuple[float, float]]]  # layer -> [(x, rho(norms at x, final))]
    axis: str
    options: dict = field(default_factory=dict)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.layers)

    def verdicts(self) -> dict[str, str]:
        return {r["layer"]: r["verdict"] for r in self.layers}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or len(a) != len(b):
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v), dtype=float)
        r[order] = np.arange(len(v), dtype=float)
        # average ties
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _adjacency(meta: dict) -> dict[str, set[str]]:
    adj: dict[str, set[str]] = {}
    for name, info in meta.get("layers", {}).items():
        for sl in info.get("out_slices", []):
            adj.setdefault(name, set()).add(sl["layer"])
            adj.setdefault(sl["layer"], set()).add(name)
    return adj


def analyze_record(record: WidthRecord, options: RuleOptions | None = None, axis: str | None = None) -> WidthAnalysis:
    o = options or RuleOptions()
    axis = axis or record.axis()
    rows = []
    corr: dict[str, list[tuple[float, float]]] = {}
    for layer in record.layers:
        x, v = record.curve(layer, "var_ratio", axis)
        _, sign = record.curve(layer, "sign_changed", axis)
        verdict = classify_curve(x, v, o)
        st = stages(x, v, sign, window=o.window)
        channels = int(record.curves.loc[record.curves["layer"] == layer, "channels"].iloc[0])
        series = []
        rho_early = float("nan")
        if len(x) >= 2 and channels >= 3:
            final = record.norms_at(layer, x[-1], axis)
            for xi in x[:-1]:
                series.append((float(xi), spearman(record.norms_at(layer, xi, axis), final)))
            early_x = st["early_end"] if np.isfinite(st["early_end"]) else (x[1] if len(x) > 2 else x[0])
            match = [r for xx, r in series if xx == early_x]
            rho_early = match[0] if match else float("nan")
        corr[layer] = series
        rows.append(
            {
                "layer": layer,
                "channels": channels,
                "verdict": verdict.label,
                "confidence": round(verdict.confidence, 3),
                "v0": verdict.v0,
                "peak": verdict.peak,
                "t_peak": verdict.t_peak,
                "final": verdict.final,
                "final_over_peak": verdict.final / verdict.peak if verdict.peak and np.isfinite(verdict.peak) else float("nan"),
                "sigma": verdict.sigma,
                "early_end": st["early_end"],
                "growth_end": st["growth_end"],
                "sign_changed_at_5": st.get("sign_changed_at_5", float("nan")),
                "sign_changed_final": float(sign[-1]) if len(sign) else float("nan"),
                "rho_early_final": rho_early,
                "why": "; ".join(verdict.reasons[:4]),
            }
        )
    # DS spreads to neighbours: keep the narrowest of each connected run of DS layers
    adj = _adjacency(record.meta)
    by = {r["layer"]: r for r in rows}
    seen: set[str] = set()
    for r in rows:
        r["bottleneck"] = False
        r["ds_neighbour_of"] = None
    for r in rows:
        if r["verdict"] != DS or r["layer"] in seen:
            continue
        comp, stack = [], [r["layer"]]
        while stack:
            n = stack.pop()
            if n in seen or n not in by or by[n]["verdict"] != DS:
                continue
            seen.add(n)
            comp.append(n)
            stack.extend(adj.get(n, ()))
        narrow = min(comp, key=lambda n: (by[n]["channels"], -by[n]["confidence"]))
        for n in comp:
            if n == narrow:
                by[n]["bottleneck"] = True
            else:
                by[n]["ds_neighbour_of"] = narrow
    # model-level stages: medians over the layers that rose
    def med(key):
        vals = [r[key] for r in rows if np.isfinite(r[key])]
        return float(np.median(vals)) if vals else float("nan")

    model_stages = {"axis": axis, "early_end": med("early_end"), "growth_end": med("growth_end")}
    signs = [r["sign_changed_at_5"] for r in rows if np.isfinite(r["sign_changed_at_5"])]
    model_stages["sign_changed_at_5_min"] = float(min(signs)) if signs else float("nan")
    model_stages["sign_changed_at_5_median"] = float(np.median(signs)) if signs else float("nan")
    # accuracy jump (if an accuracy metric was logged)
    for name in record.metric_names():
        if "acc" in name.lower():
            mx, mv = record.metric(name, axis)
            if len(mv) >= 2:
                d = np.diff(smooth(mv, 1))
                j = int(np.argmax(d))
                model_stages["accuracy_metric"] = name
                model_stages["accuracy_jump_at"] = float(mx[j + 1])
            break
    return WidthAnalysis(
        layers=rows,
        stages=model_stages,
        correlation=corr,
        axis=axis,
        options={"tau": o.tau, "window": o.window, "floor": o.floor, "k_sigma": o.k_sigma},
    )


__all__ = ["WidthAnalysis", "analyze_record", "spearman", "IS", "DS"]
