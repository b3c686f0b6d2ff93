"""From a result to report blocks: one renderer per analysis name.

A renderer is a function ``result -> list[Block]`` registered with
:func:`register_renderer`. Each capability keeps its renderer beside its
pictures (``spectral/report.py``, ``banding/figures.py``,
``branches/report.py``); they are imported on first use, as the analyses are.
An analysis without a renderer gets one table of its records, or, for an
analysis defined outside the package, its own ``render(result)`` method if it
has one. The analyses never import this module: rendering looks at them, not
the other way round.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from ..analysis import AnalysisResult
from ..model import LayerKind
from .blocks import Callout, Image, Table, have_matplotlib

Renderer = Callable[[AnalysisResult], list]

# analysis name -> module that registers its renderer
_BUILTIN: dict[str, str] = {
    "esd": "netanatomy.spectral.report",
    "banding": "netanatomy.banding.figures",
    "branches": "netanatomy.branches.report",
}

_RENDERERS: dict[str, Renderer] = {}


def register_renderer(name: str):
    """Decorator: ``@register_renderer("esd") def render_esd(result): ...``."""

    def deco(fn: Renderer) -> Renderer:
        _RENDERERS[name] = fn
        return fn

    return deco


def get_renderer(name: str) -> Renderer | None:
    """The renderer registered for analysis ``name``, or None."""
    if name not in _RENDERERS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    return _RENDERERS.get(name)


def render(analysis: str | Any, result: AnalysisResult) -> list:
    """Report blocks for ``result`` of ``analysis`` (a name or an analysis)."""
    name = analysis if isinstance(analysis, str) else (getattr(analysis, "name", "") or result.analysis)
    fn = get_renderer(name)
    if fn is not None:
        return fn(result)
    own = None if isinstance(analysis, str) else getattr(analysis, "render", None)
    if callable(own):
        return own(result)
    return default_blocks(result)


def default_blocks(result: AnalysisResult) -> list:
    """One table of all records."""
    return [Table.from_records(result.records)]


@register_renderer("stats")
def render_stats(result: AnalysisResult) -> list:
    blocks: list = []
    if result.summary.get("dead_units"):
        blocks.append(Callout(f"{result.summary['dead_units']} output units have all-zero weights.", "warn"))
    matrices = [r for r in result.ok_records if r.get("kind") != str(LayerKind.NORM)]
    if have_matplotlib() and matrices:
        from ..plots import depth_plot

        fig = depth_plot(matrices, ["std", "unit_norm_cv"], title="Weight spread across depth")
        blocks.append(Image.from_figure(fig, "Standard deviation of the weights and the coefficient of variation of per-unit norms, for each conv / linear / embedding / attention layer in model order (norm layers left out)."))
    cols = ["layer", "kind", "params", "mean", "std", "q0", "q50", "q100", "fro_norm", "unit_norm_cv", "zero_fraction", "error"]
    blocks.append(Table.from_records(result.records, [c for c in cols if any(c in r for r in result.records)]))
    return blocks
