"""Weight statistics per layer (analysis ``stats``): the cheap facts every other
analysis and the model zoo's accuracy predictor start from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .analysis import AnalysisResult, LayerwiseAnalysis, register_analysis
from .model import Layer, LayerKind

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class StatsOptions:
    zero_tol: float = 1e-8  # |w| below this counts as zero


def tensor_stats(t: torch.Tensor, prefix: str = "", zero_tol: float = 1e-8) -> dict:
    """Mean, std, percentiles, norms of one tensor (float64 for the sums)."""
    x = t.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n == 0:
        return {f"{prefix}numel": 0}
    q = _quantiles(x)
    out = {
        f"{prefix}mean": float(x.mean()),
        f"{prefix}std": float(x.std()) if n > 1 else 0.0,
        f"{prefix}abs_mean": float(x.abs().mean()),
        f"{prefix}fro_norm": float(torch.linalg.vector_norm(x)),
        f"{prefix}zero_fraction": float((x.abs() < zero_tol).double().mean()),
    }
    for qq, v in zip(QUANTILES, q):
        out[f"{prefix}q{int(qq * 100)}"] = v
    return out


def _quantiles(x: torch.Tensor) -> list[float]:
    if x.numel() > 16_000_000:  # torch.quantile's limit; sort is exact and fine
        s, _ = torch.sort(x)
        idx = [round(q * (x.numel() - 1)) for q in QUANTILES]
        return [float(s[i]) for i in idx]
    return [float(v) for v in torch.quantile(x, torch.tensor(QUANTILES, dtype=x.dtype))]


@register_analysis("stats")
class WeightStats(LayerwiseAnalysis):
    title = "Weight statistics"
    description = (
        "Per-layer distribution of the weights: mean, standard deviation, percentiles, "
        "Frobenius norm, and how evenly the norm is spread over output units "
        "(coefficient of variation of per-unit norms)."
    )
    Options = StatsOptions

    def applies_to(self, layer: Layer) -> bool:
        return layer.kind != LayerKind.OTHER

    def analyze_layer(self, layer: Layer, options: StatsOptions) -> dict:
        w = layer.weight()
        rec = {"layer": layer.name, "kind": str(layer.kind), "params": layer.num_params}
        rec.update(tensor_stats(w, zero_tol=options.zero_tol))
        if w.dim() >= 2:
            unit = torch.linalg.vector_norm(w.reshape(w.shape[0], -1).double(), dim=1)
            m = float(unit.mean())
            rec["unit_norm_mean"] = m
            rec["unit_norm_cv"] = float(unit.std() / m) if m > 0 and unit.numel() > 1 else math.nan
            rec["dead_units"] = int((unit == 0).sum())
        b = layer.bias()
        if b is not None:
            rec.update(tensor_stats(b, prefix="bias_", zero_tol=options.zero_tol))
        return rec

    def summarize(self, records: list[dict], options) -> dict:
        if not records:
            return {}
        total = sum(r["params"] for r in records)
        dead = sum(r.get("dead_units", 0) for r in records)
        return {
            "params": total,
            "dead_units": dead,
            "max_abs_weight": max(max(abs(r["q0"]), abs(r["q100"])) for r in records),
        }

    def render(self, result: AnalysisResult) -> list:
        from .report.blocks import Callout, Image, Table, have_matplotlib

        blocks: list = []
        if result.summary.get("dead_units"):
            blocks.append(Callout(f"{result.summary['dead_units']} output units have all-zero weights.", "warn"))
        if have_matplotlib() and result.ok_records:
            from .plots import depth_plot

            fig = depth_plot(result.ok_records, ["std", "unit_norm_cv"], title="Weight spread across depth")
            blocks.append(Image.from_figure(fig, "Standard deviation of the weights and the coefficient of variation of per-unit norms, layer by layer."))
        cols = ["layer", "kind", "params", "mean", "std", "q0", "q50", "q100", "fro_norm", "unit_norm_cv", "zero_fraction", "error"]
        blocks.append(Table.from_records(result.records, [c for c in cols if any(c in r for r in result.records)]))
        return blocks
