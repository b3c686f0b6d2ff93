"""Pictures for weight banding (matplotlib imported lazily) and the analysis'
report section. Every picture function takes results, an optional ``ax``, and
returns the figure."""

from __future__ import annotations

import math

import numpy as np

from ..report.blocks import Callout, Group, Image, Paragraph, Table, have_matplotlib
from ..report.render import register_renderer


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def tile(pictures: np.ndarray, cols: int | None = None, pad: int = 1, background: float = 1.0) -> np.ndarray:
    """Pictures ``(N, kh, kw, 3)`` in [0, 1] tiled into one RGB image."""
    n, kh, kw, c = pictures.shape
    if c < 3:
        pictures = np.concatenate([pictures, np.zeros((n, kh, kw, 3 - c))], axis=-1)
    pictures = np.clip(pictures[..., :3], 0, 1)
    cols = cols or max(1, int(math.ceil(math.sqrt(n * 1.6))))
    rows = max(1, int(math.ceil(n / cols)))
    out = np.full((rows * (kh + pad) + pad, cols * (kw + pad) + pad, 3), background, dtype=np.float64)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (kh + pad), pad + q * (kw + pad)
        out[y : y + kh, x : x + kw] = pictures[i]
    return out


def picture_grid(lb, max_neurons: int = 256, cols: int | None = None, title: str | None = None, ax=None):
    """The article's figure: every neuron's (aligned, per-neuron scaled) picture."""
    plt = _plt()
    pics = lb.pictures[:max_neurons]
    img = tile(pics, cols=cols)
    if ax is None:
        h, w = img.shape[:2]
        scale = 7.0 / max(w, 1)
        fig, ax = plt.subplots(figsize=(7, max(1.2, h * scale + 0.4)))
    else:
        fig = ax.figure
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    rec = lb.record
    hidden = rec.get("neurons", len(lb.pictures)) - len(pics)
    ax.set_title(title if title is not None else (
        f"{lb.layer}  {rec.get('kernel', '')}  V_y {rec.get('v_y_median', math.nan):.2f}  "
        f"V_x {rec.get('v_x_median', math.nan):.2f}  {rec.get('orientation', '')}"
        + (f"  ({hidden} neurons not shown)" if hidden > 0 else "")), fontsize=8)
    return fig


def centre_pictures(centres: np.ndarray) -> np.ndarray:
    """k-means centres (centred, unit-norm features) -> displayable pictures in [0, 1]."""
    out = []
    for c in centres:
        c = c - c.min()
        m = c.max()
        out.append(c / m if m > 0 else c)
    return np.stack(out) if out else centres


def type_figure(lb, ax=None):
    """Cluster-centre pictures with their shares (the article's appendix row)."""
    plt = _plt()
    pics = centre_pictures(lb.type_pictures)
    k = len(pics)
    if ax is None:
        fig, axes = plt.subplots(1, k, figsize=(1.4 * k, 1.7))
        axes = np.atleast_1d(axes)
    else:
        fig = ax.figure
        axes = [ax.inset_axes([i / k, 0, 1 / k * 0.9, 0.8]) for i in range(k)]
        ax.set_axis_off()
    for i, a in enumerate(axes):
        a.imshow(np.clip(pics[i][..., :3], 0, 1), interpolation="nearest")
        a.set_axis_off()
        a.set_title(f"{100 * lb.type_shares[i]:.1f}%\n{lb.type_names[i]}", fontsize=8)
    return fig


def v_scatter(lb, ax=None):
    """V_x against V_y per neuron, with the i.i.d. null marked."""
    from .core import null_v

    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.2, 3.2))
    else:
        fig = ax.figure
    ax.scatter(lb.v_y, lb.v_x, s=6, alpha=0.6)
    ny, nx = null_v(*lb.kernel)
    ax.axvline(ny, color="grey", lw=0.8, ls="--")
    ax.axhline(nx, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("V_y (row means)")
    ax.set_ylabel("V_x (column means)")
    ax.set_title(lb.layer, fontsize=8)
    return fig


@register_renderer("banding")
def render_banding(result) -> list:
    """Report blocks of the ``banding`` analysis."""
    blocks: list = []
    s = result.summary
    if not result.records:
        return [Paragraph("No conv layer with spatial kernels of 3x3 or larger.")]
    last = s.get("last_conv_before_global_pool")
    if last:
        o = s.get("last_conv_orientation", "?")
        level = "info" if o == "none" else "good"
        blocks.append(Callout(
            f"Last conv before global pooling: {last} - orientation {o}, "
            f"{100 * s.get('last_conv_banded_fraction', math.nan):.0f}% of neurons banded "
            f"(median V_y {s.get('last_conv_v_y_median', math.nan):.2f}, V_x {s.get('last_conv_v_x_median', math.nan):.2f}).",
            level,
        ))
    elif s.get("graph_known"):
        blocks.append(Callout("The graph shows no conv layer feeding global pooling.", "info"))
    else:
        blocks.append(Callout("Graph unknown (weights-only file): the last conv before global pooling cannot be marked.", "info"))
    ranked = sorted(result.ok_records, key=lambda r: r.get("rank", 1e9))
    cols = ["rank", "layer", "kernel", "neurons", "orientation", "banded_fraction", "horizontal_fraction",
            "vertical_fraction", "v_y_median", "v_x_median", "v_null_y", "banding_score",
            "last_conv_before_global_pool", "nmf_rel_error"]
    blocks.append(Table.from_records(ranked, [c for c in cols if any(c in r for r in ranked)],
                                     caption="Layers ranked by banding score (median V above the i.i.d. null, 0..1)."))
    detail = result.extras.get("layers", {})
    if have_matplotlib() and detail:

        show: list[str] = []
        if last and last in detail:
            show.append(last)
        for name in result.extras.get("ranked", []):
            if len(show) >= max(1, int(result.options.get("grids", 4))):
                break
            if name not in show and name in detail:
                show.append(name)
        for name in show:
            lb = detail[name]
            sub = [Image.from_figure(picture_grid(lb), f"{name}: NMF pictures of every neuron, colours aligned, similar neurons together.")]
            if lb.types is not None:
                sub.append(Image.from_figure(type_figure(lb), f"{name}: banding types (k-means centres) and their shares."))
            blocks.append(Group(f"{name} ({lb.record['orientation']}, {100 * lb.record['banded_fraction']:.0f}% banded)", sub))
    type_rows = []
    for r in result.ok_records:
        row = {"layer": r["layer"]}
        for i in range(16):
            if f"type{i}_share" in r:
                row[f"type {i}"] = f"{100 * r[f'type{i}_share']:.1f}% {r[f'type{i}_kind']}"
        type_rows.append(row)
    blocks.append(Group("Banding types per layer", [Table.from_records(type_rows)], folded=True))
    if result.errors:
        blocks.append(Table.from_records(result.errors, ["layer", "error"], caption="Layers that could not be analysed."))
    return blocks
