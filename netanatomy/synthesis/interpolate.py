"""Linear interpolation between two models and the loss barrier on that path.

``theta(alpha) = (1 - alpha) * theta_a + alpha * theta_b`` is computed per key in
float64 (the streaming average with weights ``1 - alpha`` and ``alpha``) and
scored by an evaluator (a callable or a command; see
:mod:`netanatomy.synthesis.evaluate`) that may return several metrics.

The barrier of a metric is the largest gap along the path between the metric
and the straight line joining its end-point values (Frankle et al. 2020;
Ainsworth et al. 2023)::

    loss:      max_alpha  L(alpha) - ((1 - alpha) L(0) + alpha L(1))
    accuracy:  max_alpha  ((1 - alpha) A(0) + alpha A(1)) - A(alpha)

Zero means the two models are linearly connected in that metric.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from .average import average
from .evaluate import as_evaluator, scores_of
from ..io import CheckpointLike


@dataclass
class InterpolationCurve:
    alphas: list[float]
    values: dict[str, list[float]]  # metric -> one value per alpha
    label: str = ""
    notes: list[str] = field(default_factory=list)

    def barrier(self, metric: str | None = None, higher_is_better: bool | None = None) -> float:
        """Largest excess over the end-point line (see the module docstring).

        ``higher_is_better`` defaults to True for metrics whose name contains
        ``acc`` and False otherwise.
        """
        metric = self._metric(metric)
        if higher_is_better is None:
            higher_is_better = "acc" in metric.lower()
        a = np.asarray(self.alphas, dtype=np.float64)
        v = np.asarray(self.values[metric], dtype=np.float64)
        i0, i1 = int(np.argmin(a)), int(np.argmax(a))
        a0, a1 = a[i0], a[i1]
        t = (a - a0) / (a1 - a0) if a1 > a0 else np.zeros_like(a)
        line = (1 - t) * v[i0] + t * v[i1]
        gap = (line - v) if higher_is_better else (v - line)
        return float(gap.max())

    def midpoint(self, metric: str | None = None) -> float:
        metric = self._metric(metric)
        i = int(np.argmin(np.abs(np.asarray(self.alphas) - 0.5)))
        return float(self.values[metric][i])

    def _metric(self, metric: str | None) -> str:
        if metric is None:
            if len(self.values) != 1:
                raise UserError(f"several metrics ({', '.join(self.values)}); say which one")
            return next(iter(self.values))
        if metric not in self.values:
            raise UserError(f"no metric {metric!r} on this curve (have {', '.join(self.values)})")
        return metric

    def to_records(self) -> list[dict]:
        return [{"alpha": a, **{m: v[i] for m, v in self.values.items()}} for i, a in enumerate(self.alphas)]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.to_records())


def interpolate(
    a: CheckpointLike,
    b: CheckpointLike,
    evaluate: Any,
    alphas: Sequence[float] | int = 11,
    *,
    label: str = "",
    timeout: float = 600.0,
    **avg_kw,
) -> InterpolationCurve:
    """Score ``(1 - alpha) a + alpha b`` for each alpha (default 11 points on [0, 1])."""
    if isinstance(alphas, int):
        if alphas < 2:
            raise UserError("an interpolation curve needs at least 2 points")
        alphas = np.linspace(0.0, 1.0, alphas).tolist()
    alphas = [float(x) for x in alphas]
    if not alphas:
        raise UserError("no interpolation points given")
    ev = as_evaluator(evaluate, timeout)
    values: dict[str, list[float]] = {}
    for alpha in alphas:
        mix = average([a, b], None, weights=[1.0 - alpha, alpha], method="interpolation", **avg_kw)
        s = scores_of(ev(mix.tensors))
        for m, v in s.items():
            values.setdefault(m, []).append(v)
        del mix
    lengths = {len(v) for v in values.values()}
    if lengths != {len(alphas)}:
        raise UserError("the evaluator did not return the same metrics at every point")
    return InterpolationCurve(alphas, values, label=label)


def loss_barrier(a: CheckpointLike, b: CheckpointLike, evaluate: Any, alphas: Sequence[float] | int = 11, metric: str | None = None, higher_is_better: bool | None = None, **kw) -> tuple[float, InterpolationCurve]:
    """The barrier of ``metric`` on the straight path from ``a`` to ``b``, and the curve."""
    curve = interpolate(a, b, evaluate, alphas, **kw)
    return curve.barrier(metric, higher_is_better), curve


def plot_interpolation(curves: Sequence[InterpolationCurve], metric: str, ax=None, title: str | None = None):
    """One line per curve of ``metric`` against alpha; returns the figure."""
    from ..plots import new_axes

    fig, ax = new_axes(ax, figsize=(5, 3.5))
    for c in curves:
        ax.plot(c.alphas, c.values[metric], marker="o", ms=3, label=c.label or None)
    ax.set_xlabel("alpha (0 = model A, 1 = model B)")
    ax.set_ylabel(metric)
    if title:
        ax.set_title(title)
    if any(c.label for c in curves):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
