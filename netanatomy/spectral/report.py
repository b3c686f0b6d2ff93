"""Report section of the ``esd`` analysis: flagged layers first, then pictures,
then the full table."""

from __future__ import annotations

import math

from ..report.blocks import Callout, Group, Image, Paragraph, Table, have_matplotlib
from ..report.render import register_renderer

FLAG_ORDER = {"over-trained": 0, "under-trained": 1, "failed fit": 2}
TABLE_COLUMNS = [
    "layer", "kind", "N", "M", "slices", "alpha", "D", "xmin", "num_pl_spikes", "sigma", "best_fit",
    "p_pl_tpl", "alpha_weighted", "log_spectral_norm", "stable_rank", "matrix_rank", "entropy",
    "num_spikes", "mp_softrank", "rand_distance", "num_traps", "warning", "fit_reason", "error",
]


def flagged_rows(records: list[dict]) -> list[dict]:
    rows = [r for r in records if "slice" not in r and (r.get("error") or r.get("warning"))]
    return sorted(rows, key=lambda r: (FLAG_ORDER.get(r.get("warning") or "", 3), r["layer"]))


@register_renderer("esd")
def render_esd(result) -> list:
    s = result.summary
    blocks: list = []  # the report shows analysis.description above the section already
    rows = [r for r in result.ok_records if "slice" not in r]
    if "alpha" in s:
        blocks.append(
            Paragraph(
                f"{len(rows)} spectra; mean alpha {s['alpha']:.2f}, mean alpha_weighted "
                f"{s.get('alpha_weighted', math.nan):.2f}, mean log spectral norm {s.get('log_spectral_norm', math.nan):.2f}."
            )
        )
    flagged = flagged_rows(result.records)
    if flagged:
        n_over, n_under, n_fail = s.get("over_trained", 0), s.get("under_trained", 0), s.get("failed_fits", 0)
        level = "bad" if n_over else "warn"
        blocks.append(
            Callout(
                f"{len(flagged)} flagged: {n_over} over-trained (alpha < 2), {n_under} under-trained "
                f"(alpha > 6), {n_fail} without a meaningful fit, {len(result.errors)} not analysable.",
                level,
            )
        )
        cols = ["layer", "kind", "alpha", "sigma", "num_pl_spikes", "D", "warning", "fit_reason", "error"]
        blocks.append(Table.from_records(flagged, [c for c in cols if any(c in r for r in flagged)], caption="Flagged layers"))
    else:
        blocks.append(Callout("No layer flagged: every fitted alpha lies in [2, 6].", "good"))

    if have_matplotlib() and rows:
        from .plots import alpha_depth_plot, esd_plot

        blocks.append(Image.from_figure(alpha_depth_plot(result), "alpha of each layer in model order; red: outside [2, 6]."))
        spectra = result.extras.get("spectra", {})
        # ESD pictures: the flagged layers first, then a few others, at most 8
        names = [r["layer"] for r in flagged if r["layer"] in spectra]
        names += [r["layer"] for r in rows if r["layer"] in spectra and r["layer"] not in names]
        pics = [
            Image.from_figure(esd_plot(result, n), f"{n}: ESD (log-log), fitted tail dashed, MP bulk shaded when fitted.")
            for n in names[:8]
        ]
        if pics:
            blocks.append(Group("Eigenvalue spectra", pics, folded=True))
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in result.records)]
    blocks.append(Table.from_records(result.records, cols, caption="All layers"))
    return blocks
