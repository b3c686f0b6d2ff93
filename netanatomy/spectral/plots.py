"""Pictures of an ``esd`` result. matplotlib is imported lazily; each function
takes the result (or one layer's spectrum), an optional ``ax``, and returns the
figure."""

from __future__ import annotations

import math

import numpy as np

from ..plots import new_axes


def _spectrum(result, layer: str) -> dict:
    spectra = result.extras.get("spectra", {})
    if layer not in spectra:
        raise KeyError(f"no spectrum kept for {layer!r} (run with keep_spectra=True)")
    return spectra[layer]


def esd_plot(result, layer: str, ax=None, bins: int = 80):
    """Log-log histogram of one layer's ESD, the fitted power-law tail (dashed),
    the MP bulk edges if fitted, and the shuffled-matrix ESD if computed."""
    sx = _spectrum(result, layer)
    ev = np.asarray(sx["evals"])
    # eigenvalues below 1e-9 of the largest are numerically zero; they would only
    # stretch the log axis over many empty decades
    ev = ev[ev > (ev.max() * 1e-9 if ev.size else 0)]
    fig, ax = new_axes(ax, figsize=(5.2, 3.6))
    if ev.size == 0:
        ax.text(0.5, 0.5, "no positive eigenvalues", ha="center", transform=ax.transAxes)
        return fig
    lo, hi = np.log10(ev.min()), np.log10(ev.max())
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.logspace(lo, hi, bins + 1)
    ax.hist(ev, bins=edges, density=True, color="C0", alpha=0.55, label="ESD")
    rand = sx.get("rand_evals")
    if rand is not None:
        r = np.asarray(rand)
        r = r[r > (r.max() * 1e-9 if r.size else 0)]
        if r.size:
            ax.hist(r, bins=np.logspace(np.log10(r.min()), np.log10(r.max()) + 1e-9, bins + 1), density=True,
                    histtype="step", color="C2", label="shuffled W")
    alpha, xmin, xmax, n_tail = sx["fit"]
    if math.isfinite(alpha) and xmin > 0:
        xs = np.logspace(np.log10(xmin), np.log10(xmax), 50)
        frac = n_tail / ev.size  # the tail holds this fraction of the density
        ys = frac * (alpha - 1) / xmin * (xs / xmin) ** (-alpha)
        ax.plot(xs, ys, "r--", lw=1.5, label=f"power law, alpha={alpha:.2f}")
        ax.axvline(xmin, color="r", lw=0.8, alpha=0.6)
    mp = sx.get("mp")
    if mp is not None and all(math.isfinite(v) for v in mp):
        lm, lp, _ = mp
        ax.axvspan(max(lm, ev.min()), lp, color="orange", alpha=0.15, label="MP bulk")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue of W^T W / N")
    ax.set_ylabel("density")
    ax.set_title(layer, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def alpha_depth_plot(result, ax=None):
    """alpha of each layer in model order, with the [2, 6] band shaded."""
    rows = [r for r in result.records if not r.get("error") and "slice" not in r]
    fig, ax = new_axes(ax, figsize=(max(6, 0.22 * len(rows) + 3), 3.4))
    ys = [r.get("alpha", math.nan) for r in rows]
    ys = [y if isinstance(y, (int, float)) and y is not None else math.nan for y in ys]
    colors = ["C3" if (isinstance(y, float) and (y < 2 or y > 6)) else "C0" for y in ys]
    ax.axhspan(2, 6, color="green", alpha=0.08)
    ax.plot(range(len(ys)), ys, color="0.6", lw=0.8)
    ax.scatter(range(len(ys)), ys, c=colors, s=14, zorder=3)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["layer"] for r in rows], rotation=75, ha="right", fontsize=6)
    ax.set_ylabel("alpha")
    ax.set_title("Power-law exponent across depth (shaded: 2..6)")
    fig.tight_layout()
    return fig
