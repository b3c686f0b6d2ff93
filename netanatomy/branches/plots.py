"""Pictures for the branch analysis. Each function takes computed results, an
optional matplotlib ``ax``, and returns the figure; matplotlib is imported lazily."""

from __future__ import annotations

import numpy as np

from ..plots import new_axes


def filter_image(w: np.ndarray) -> np.ndarray:
    """An RGB picture of one first-layer filter ``(3, kh, kw)``: zero is grey,
    scaled by the filter's own largest magnitude."""
    m = float(np.abs(w).max()) or 1.0
    return np.clip(0.5 + 0.5 * np.transpose(w, (1, 2, 0)) / m, 0, 1)


def plot_svd_map(pair, filters: np.ndarray | None = None, variant: str = "uncentred", side: str = "left",
                 vectors: tuple[int, int] = (0, 1), colour_by: np.ndarray | None = None,
                 colour_label: str = "", ax=None):
    """Neurons placed by two singular vectors.

    ``side="left"``: layer-1 neurons (drawn as their RGB filters when ``filters``
    holds first-layer weights ``(n, 3, kh, kw)``); ``side="right"``: layer-2 neurons.
    """
    fig, ax = new_axes(ax, figsize=(5.2, 5.0))
    mp = pair.maps[variant]
    coords = mp.left if side == "left" else mp.right
    a, b = vectors
    if coords.shape[1] <= max(a, b):
        ax.text(0.5, 0.5, "too few singular vectors", ha="center", transform=ax.transAxes)
        return fig
    x, y = coords[:, a], coords[:, b]
    if side == "left" and filters is not None and filters.ndim == 4 and filters.shape[1] == 3:
        # tiles square on screen: their size in data units follows each axis's span
        cells = max(8.0, np.sqrt(len(x)) * 1.6)
        sx = max(float(np.ptp(x)), 1e-9) / cells
        sy = max(float(np.ptp(y)), 1e-9) / cells
        for i in range(len(x)):
            ax.imshow(filter_image(filters[i]), extent=(x[i] - sx / 2, x[i] + sx / 2, y[i] - sy / 2, y[i] + sy / 2),
                      interpolation="nearest", zorder=3)
        ax.set_xlim(x.min() - sx, x.max() + sx)
        ax.set_ylim(y.min() - sy, y.max() + sy)
        ax.set_aspect("auto")
    else:
        if colour_by is not None:
            sc = ax.scatter(x, y, c=colour_by, s=14, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=colour_label)
        else:
            ax.scatter(x, y, s=14, color="C0")
    who = pair.layer1 if side == "left" else pair.layer2
    ax.set_xlabel(f"singular vector {a}")
    ax.set_ylabel(f"singular vector {b}")
    ax.set_title(f"{who} neurons, {variant} SVD of |W({pair.layer2})|", fontsize=9)
    ax.axhline(0, color="0.85", lw=0.6, zorder=0)
    ax.axvline(0, color="0.85", lw=0.6, zorder=0)
    return fig


def plot_branch_filters(filters: np.ndarray, branch: np.ndarray, names: list[str] | None = None, ax=None,
                        order: np.ndarray | None = None):
    """First-layer filters laid out one row block per branch (sorted within a
    branch by ``order``, e.g. colourfulness)."""
    fig, ax = new_axes(ax, figsize=(7, 3.2))
    branch = np.asarray(branch)
    ids = sorted(set(branch.tolist()))
    per_row = max(int((branch == i).sum()) for i in ids)
    cols = min(per_row, 16)
    rows_per = [int(np.ceil((branch == i).sum() / cols)) for i in ids]
    kh, kw = filters.shape[2:]
    pad = 1
    H = sum(rows_per) * (kh + pad) + (len(ids) - 1) * (kh + pad) // 2
    W = cols * (kw + pad)
    canvas = np.ones((H, W, 3))
    r0 = 0
    ticks = []
    for bi, nrows in zip(ids, rows_per):
        members = np.flatnonzero(branch == bi)
        if order is not None:
            members = members[np.argsort(order[members])]
        for j, m in enumerate(members):
            rr, cc = r0 + (j // cols) * (kh + pad), (j % cols) * (kw + pad)
            canvas[rr : rr + kh, cc : cc + kw] = filter_image(filters[m])
        ticks.append((r0 + nrows * (kh + pad) / 2, names[bi] if names and bi < len(names) else f"branch {bi}"))
        r0 += nrows * (kh + pad) + (kh + pad) // 2
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([t for t, _ in ticks])
    ax.set_yticklabels([n for _, n in ticks], fontsize=8)
    return fig


def plot_counts(record: dict, descriptor: str, ax=None):
    """Observed vs expected counts per branch and category for one descriptor."""
    fig, ax = new_axes(ax, figsize=(6, 3))
    tests = [t for t in record.get("tests", []) if t["descriptor"] == descriptor]
    if not tests:
        ax.text(0.5, 0.5, f"no {descriptor} counts", ha="center", transform=ax.transAxes)
        return fig
    labels = [f"{t['branch_name']}\n{t['category']}" for t in tests]
    xs = np.arange(len(tests))
    ax.bar(xs - 0.2, [t["count"] for t in tests], width=0.4, label="observed")
    ax.bar(xs + 0.2, [t["expected"] for t in tests], width=0.4, label="expected", color="0.7")
    for x, t in zip(xs, tests):
        if t["p_adjusted"] is not None and t["p_adjusted"] < 0.05 and t["count"] > t["expected"]:
            ax.text(x - 0.2, t["count"], "*", ha="center", va="bottom")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("neurons")
    ax.set_title(f"{record['point']}: {descriptor}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_sv_correlations(pair, variant: str = "uncentred", ax=None):
    """Heat map of Pearson r between singular vectors and descriptors."""
    fig, ax = new_axes(ax, figsize=(4.8, 2.6))
    rows = [c for c in pair.correlations if c["variant"] == variant]
    descs = list(dict.fromkeys(c["descriptor"] for c in rows))
    svs = sorted({c["sv"] for c in rows})
    m = np.full((len(descs), len(svs)), np.nan)
    for c in rows:
        m[descs.index(c["descriptor"]), svs.index(c["sv"])] = c["r"]
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i in range(len(descs)):
        for j in range(len(svs)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(svs)))
    ax.set_xticklabels([f"SV{s}" for s in svs])
    ax.set_yticks(range(len(descs)))
    ax.set_yticklabels(descs, fontsize=8)
    ax.set_title(f"{pair.layer1} -> {pair.layer2} ({variant})", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig
