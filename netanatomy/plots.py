"""Shared plotting helpers. matplotlib is imported lazily (the ``viz`` extra);
every function takes records or a result, an optional ``ax``, and returns the
figure. Nothing here is called by computation code."""

from __future__ import annotations

from typing import Sequence


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def new_axes(ax=None, figsize=(7, 3.2)):
    plt = _mpl()
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def depth_plot(records: Sequence[dict], columns: Sequence[str], title: str = "", ax=None):
    """One line per column against layer index; layer names on the x axis."""
    fig, ax = new_axes(ax, figsize=(max(6, 0.28 * len(records) + 3), 3.4))
    names = [r["layer"] for r in records]
    for i, col in enumerate(columns):
        ys = [r.get(col, float("nan")) for r in records]
        target = ax if i == 0 else ax.twinx()
        target.plot(range(len(ys)), ys, marker="o", ms=3, color=f"C{i}", label=col)
        target.set_ylabel(col, color=f"C{i}")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
