"""Pictures and the HTML page of a width analysis. Each plot function takes result
objects, an optional ``ax``, and returns the figure; matplotlib is imported lazily."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._util import atomic_write_text
from ..plots import _mpl, new_axes
from .record import WidthRecord
from .width import WidthAnalysis

_COLORS = {"IS": "C0", "DS": "C3", "undecided": "0.55"}


def plot_variance_curves(record: WidthRecord, analysis: WidthAnalysis, ax=None, layers=None):
    """Mean-normalised norm variance per layer against training time; line style by
    verdict (solid IS, dashed DS, dotted undecided)."""
    fig, ax = new_axes(ax, figsize=(7, 3.6))
    verdicts = {r["layer"]: r for r in analysis.layers}
    for i, layer in enumerate(layers or record.layers):
        x, v = record.curve(layer, "var_ratio", analysis.axis)
        r = verdicts.get(layer, {})
        lab = f"{layer} ({r.get('channels', '?')} ch): {r.get('verdict', '?')}"
        ls = {"IS": "-", "DS": "--"}.get(r.get("verdict"), ":")
        ax.plot(x, v, marker="o", ms=2.5, lw=1.4, color=f"C{i}", ls=ls, label=lab)
    if np.isfinite(analysis.stages.get("early_end", np.nan)):
        ax.axvline(analysis.stages["early_end"], color="0.7", lw=0.8, ls=":")
    if np.isfinite(analysis.stages.get("growth_end", np.nan)):
        ax.axvline(analysis.stages["growth_end"], color="0.7", lw=0.8, ls="--")
    ax.set_xlabel(analysis.axis)
    ax.set_ylabel("var / mean of coupled norms")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_sign_changes(record: WidthRecord, axis: str | None = None, ax=None):
    """Share of weights whose sign differs from init, per layer."""
    fig, ax = new_axes(ax)
    axis = axis or record.axis()
    for layer in record.layers:
        x, s = record.curve(layer, "sign_changed", axis)
        ax.plot(x, 100 * s, marker=".", ms=3, label=layer)
    ax.axhline(10, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel(axis)
    ax.set_ylabel("% weights with flipped sign")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_correlation(analysis: WidthAnalysis, ax=None):
    """Spearman correlation between each point's channel norms and the final ones."""
    fig, ax = new_axes(ax)
    for layer, series in analysis.correlation.items():
        if series:
            xs, rs = zip(*series)
            ax.plot(xs, rs, marker=".", ms=3, label=layer)
    ax.set_xlabel(analysis.axis)
    ax.set_ylabel("rank corr. with final norms")
    ax.set_ylim(-1.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_similarity(record: WidthRecord, layer: str, ax=None):
    """The norm-sorted cosine-similarity matrices kept for ``layer``, side by side."""
    plt = _mpl()
    mats = [s for s in record.similarity if s["layer"] == layer]
    if ax is not None:
        mats = mats[-1:]
        axes = [ax]
        fig = ax.figure
    else:
        fig, axes = plt.subplots(1, max(1, len(mats)), figsize=(2.6 * max(1, len(mats)), 2.6), squeeze=False)
        axes = list(axes[0])
    for a, s in zip(axes, mats):
        a.imshow(s["matrix"], vmin=-1, vmax=1, cmap="RdBu_r")
        a.set_title(f"{layer} epoch {s['epoch']}", fontsize=8)
        a.set_xticks([])
        a.set_yticks([])
    fig.tight_layout()
    return fig


def plot_norms(record: WidthRecord, layer: str, ax=None, axis: str | None = None):
    """Sorted channel norms of ``layer`` at init, at a middle point and at the end."""
    fig, ax = new_axes(ax, figsize=(4.5, 3))
    axis = axis or record.axis()
    x, _ = record.curve(layer, "var_ratio", axis)
    for xi in sorted({x[0], x[len(x) // 2], x[-1]}):
        n = np.sort(record.norms_at(layer, xi, axis))[::-1]
        ax.plot(n, marker=".", ms=3, label=f"{axis} {xi:g}")
    ax.set_xlabel("channel (sorted)")
    ax.set_ylabel("coupled norm")
    ax.set_title(layer, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_plan(plan: dict, ax=None):
    """Widths before and after the plan."""
    fig, ax = new_axes(ax, figsize=(max(5, 0.5 * len(plan["layers"]) + 2), 3))
    names = [r["layer"] for r in plan["layers"]]
    i = np.arange(len(names))
    ax.bar(i - 0.2, [r["width"] for r in plan["layers"]], 0.4, label="now", color="0.6")
    ax.bar(i + 0.2, [r["new_width"] for r in plan["layers"]], 0.4, label="planned",
           color=[_COLORS.get(r["verdict"], "0.3") for r in plan["layers"]])
    ax.set_xticks(i)
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("width")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def blocks(record: WidthRecord, analysis: WidthAnalysis, plan: dict | None = None) -> list:
    """The report blocks of a width analysis."""
    from ..report.blocks import Callout, Group, Image, Paragraph, Table, have_matplotlib

    out: list = []
    counts = {k: sum(r["verdict"] == k for r in analysis.layers) for k in ("IS", "DS", "undecided")}
    bott = [r["layer"] for r in analysis.layers if r.get("bottleneck")]
    out.append(
        Callout(
            f"{counts['DS']} DS (too narrow), {counts['IS']} IS (wide enough), {counts['undecided']} undecided; "
            + (f"bottleneck{'s' if len(bott) > 1 else ''}: {', '.join(bott)}" if bott else "no bottleneck"),
            "warn" if bott else "good",
        )
    )
    o = analysis.options
    out.append(
        Paragraph(
            f"Rule (tau={o['tau']}, floor={o['floor']}, k={o['k_sigma']}; the curve divided by its own top, so "
            "the verdicts do not depend on the weights' scale): a rise-plateau (isotonic) and a rise-peak-fall "
            "(unimodal) model are fitted, the noise is the unimodal fit's residual. DS when the fit rises by at "
            "least floor of its top and k standard errors, then falls by at least tau of its peak and k standard "
            "errors, and the fall model wins by a likelihood ratio of k^2; IS when it ends at least floor and k "
            "standard errors above its start and less than tau below its peak; undecided otherwise."
        )
    )
    cols = ["layer", "channels", "verdict", "confidence", "bottleneck", "ds_neighbour_of", "v0", "peak", "t_peak",
            "final", "final_over_peak", "early_end", "growth_end", "sign_changed_at_5", "rho_early_final", "why"]
    out.append(Table.from_records(analysis.layers, cols, highlight="bottleneck"))
    st = analysis.stages
    out.append(
        Paragraph(
            f"Stages ({analysis.axis}s, medians over layers): early until {st.get('early_end'):.3g}, rapid growth "
            f"until {st.get('growth_end'):.3g}, then saturation. Weights with flipped sign at epoch 5: median "
            f"{100 * st.get('sign_changed_at_5_median', float('nan')):.1f}%, smallest "
            f"{100 * st.get('sign_changed_at_5_min', float('nan')):.1f}%."
            + (f" Largest accuracy jump ({st['accuracy_metric']}) at {st['accuracy_jump_at']:g}." if "accuracy_jump_at" in st else "")
        )
    )
    if have_matplotlib():
        figs = [Image.from_figure(plot_variance_curves(record, analysis), "norm variance per layer")]
        figs.append(Image.from_figure(plot_sign_changes(record, analysis.axis), "sign changes since init"))
        figs.append(Image.from_figure(plot_correlation(analysis), "early-vs-final norm rank correlation"))
        out.append(Group("Curves", figs))
        norms = [Image.from_figure(plot_norms(record, l, axis=analysis.axis), l) for l in record.layers]
        out.append(Group("Channel norms", norms, folded=True))
        sims = [Image.from_figure(plot_similarity(record, l), l) for l in record.layers
                if any(s["layer"] == l for s in record.similarity)]
        if sims:
            out.append(Group("Cosine similarity between channels (sorted by norm)", sims, folded=True))
    if plan is not None:
        pb = [
            Paragraph(
                f"FLOPs {plan['flops_before']:,} -> {plan['flops_after']:,} ({plan['flops_ratio']:.3f}x); parameters "
                f"{plan['params_before']:,} -> {plan['params_after']:,} ({plan['params_ratio']:.3f}x); IS layers scaled "
                f"by {plan['scale_is']:.3f}, DS bottlenecks by {plan['grow']:g}."
            ),
            Table.from_records(plan["layers"]),
        ]
        pb += [Callout(n, "info") for n in plan.get("notes", [])]
        if have_matplotlib():
            pb.append(Image.from_figure(plot_plan(plan), "widths before and after the plan"))
        out.append(Group("Width plan", pb))
    return out


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ddd;padding:2px 6px;text-align:left}}
tr.hl{{background:#fff3e0}}.callout{{padding:.5em 1em;margin:.5em 0;border-left:4px solid #888;background:#f6f6f6}}
.callout.good{{border-color:#2e7d32}}.callout.warn{{border-color:#ef6c00}}.callout.bad{{border-color:#c62828}}
figure{{display:inline-block;margin:.5em}}img{{max-width:100%}}.table-wrap{{overflow-x:auto}}
</style></head><body><h1>{title}</h1>{body}</body></html>"""


def write_html(path: str | Path, title: str, report_blocks: list) -> Path:
    from markupsafe import Markup, escape

    from ..report.html import render_block

    body = Markup("").join(render_block(b) for b in report_blocks)
    return atomic_write_text(path, _PAGE.format(title=escape(title), body=body))
