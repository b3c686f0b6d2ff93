"""Weight statistics per layer (analysis ``stats``): the cheap facts every other
analysis and the model zoo's accuracy predictor start from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .analysis import Analysis, register_analysis
from .model import Layer, LayerKind

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class StatsOptions:
    zero_tol: float = 1e-8  # |w| below this counts as zero


def tensor_stats(t: torch.Tensor, prefix: str = "", zero_tol: float = 1e-8) -> dict:
    """Mean, std, percentiles and norm of one tensor.

    Sums are accumulated in float64 chunk by chunk and percentiles come from a
    partial sort of one copy, so the memory needed is about one extra copy of
    the tensor, whatever its size.
    """
    x = t.detach().reshape(-1)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    n = x.numel()
    if n == 0:
        return {f"{prefix}numel": 0}
    total = sq = abs_total = 0.0
    zeros = 0
    for chunk in x.split(1 << 20):
        c = chunk.double()
        total += float(c.sum())
        abs_total += float(c.abs().sum())
        zeros += int((c.abs() < zero_tol).sum())
    mean = total / n
    for chunk in x.split(1 << 20):
        sq += float(((chunk.double() - mean) ** 2).sum())
    norm_sq = sq + n * mean * mean
    out = {
        f"{prefix}mean": mean,
        f"{prefix}std": math.sqrt(sq / (n - 1)) if n > 1 else 0.0,
        f"{prefix}abs_mean": abs_total / n,
        f"{prefix}fro_norm": math.sqrt(max(norm_sq, 0.0)),
        f"{prefix}zero_fraction": zeros / n,
    }
    for qq, v in zip(QUANTILES, quantiles(x, QUANTILES)):
        out[f"{prefix}q{int(qq * 100)}"] = v
    return out


def quantiles(x: torch.Tensor, qs=QUANTILES) -> list[float]:
    """Linear-interpolated quantiles (as ``torch.quantile``) via one partial sort."""
    arr = x.detach().cpu().reshape(-1)
    if arr.dtype in (torch.bfloat16, torch.float16):
        arr = arr.float()
    a = arr.numpy().copy()
    n = a.size
    pos = [q * (n - 1) for q in qs]
    kth = sorted({int(math.floor(p)) for p in pos} | {min(int(math.ceil(p)), n - 1) for p in pos})
    a.partition(kth)
    out = []
    for p in pos:
        lo, hi = int(math.floor(p)), min(int(math.ceil(p)), n - 1)
        out.append(float(a[lo]) + (float(a[hi]) - float(a[lo])) * (p - lo))
    return out


@register_analysis("stats")
class WeightStats(Analysis):
    title = "Weight statistics"
    description = (
        "Per-layer distribution of the weights: mean, standard deviation, percentiles, "
        "Frobenius norm, and how evenly the norm is spread over output units "
        "(coefficient of variation of per-unit norms)."
    )
    Options = StatsOptions

    def applies_to(self, layer: Layer) -> bool:
        return layer.kind != LayerKind.OTHER

    def analyze_layer(self, layer: Layer, options: StatsOptions, context) -> dict:
        w = layer.weight()
        rec = {"layer": layer.name, "kind": str(layer.kind), "params": layer.num_params}
        rec.update(tensor_stats(w, zero_tol=options.zero_tol))
        if w.dim() >= 2:
            unit = torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).double()
            m = float(unit.mean())
            rec["unit_norm_mean"] = m
            rec["unit_norm_cv"] = float(unit.std() / m) if m > 0 and unit.numel() > 1 else math.nan
            rec["dead_units"] = int((unit == 0).sum())
        b = layer.bias()
        if b is not None:
            rec.update(tensor_stats(b, prefix="bias_", zero_tol=options.zero_tol))
        return rec

    def summarize(self, records: list[dict], options, context) -> dict:
        if not records:
            return {}
        total = sum(r["params"] for r in records)
        dead = sum(r.get("dead_units", 0) for r in records)
        return {
            "params": total,
            "dead_units": dead,
            "max_abs_weight": max(max(abs(r["q0"]), abs(r["q100"])) for r in records),
        }
