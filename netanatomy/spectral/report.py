"""Report section of the ``esd`` analysis, built to stay small and fast at 200+
layers: an overview of alpha (and friends) against depth by layer type, one
sortable / filterable table with the flagged layers first, and one collapsed
ESD picture per layer. Pictures are inline SVG (``report/svg.py``), not
matplotlib, so they cost a fraction of a millisecond per layer."""

from __future__ import annotations

import math

from ..report.blocks import Callout, Group, Paragraph, Svg, Table
from ..report.render import register_renderer
from ..report.svg import esd_svg, scatter_svg
from .layertypes import layer_type

FLAG_ORDER = {"over-trained": 0, "under-trained": 1, "failed fit": 2}
TABLE_COLUMNS = [
    "layer", "type", "kind", "N", "M", "slices", "alpha", "alpha_hill", "D", "xmin", "num_pl_spikes", "sigma",
    "best_fit", "p_pl_tpl", "alpha_weighted", "log_spectral_norm", "stable_rank", "matrix_rank", "entropy",
    "num_spikes", "mp_softrank", "rand_distance", "num_traps", "spectrum", "warning", "fit_reason", "error",
]
OVERVIEW = [("alpha", "alpha (Clauset fit)", (2.0, 6.0)), ("alpha_hill", "alpha_hill (PL_Alpha_Hill)", None),
            ("log_spectral_norm", "log10 spectral norm", None), ("stable_rank", "stable rank", None)]


def _flag_key(r: dict) -> int:
    if r.get("error"):
        return 3
    return FLAG_ORDER.get(r.get("warning") or "", 4)


def flagged_rows(records: list[dict]) -> list[dict]:
    rows = [r for r in records if "slice" not in r and (r.get("error") or r.get("warning"))]
    return sorted(rows, key=lambda r: (FLAG_ORDER.get(r.get("warning") or "", 3), r["layer"]))


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


@register_renderer("esd")
def render_esd(result) -> list:
    s = result.summary
    blocks: list = []  # the report shows analysis.description above the section already
    rows = [r for r in result.ok_records if "slice" not in r]
    if "alpha" in s:
        blocks.append(
            Paragraph(
                f"{len(rows)} spectra; mean alpha {s['alpha']:.2f}, mean alpha_hill {s.get('alpha_hill', math.nan):.2f}, "
                f"mean alpha_weighted {s.get('alpha_weighted', math.nan):.2f}, mean log spectral norm "
                f"{s.get('log_spectral_norm', math.nan):.2f}."
            )
        )
    flagged = flagged_rows(result.records)
    if flagged:
        n_over, n_under, n_fail = s.get("over_trained", 0), s.get("under_trained", 0), s.get("failed_fits", 0)
        blocks.append(
            Callout(
                f"{len(flagged)} flagged: {n_over} over-trained (alpha < 2), {n_under} under-trained "
                f"(alpha > 6), {n_fail} without a meaningful fit, {len(result.errors)} not analysable. "
                "They come first in the table below.",
                "bad" if n_over else "warn",
            )
        )
    else:
        blocks.append(Callout("No layer flagged: every fitted alpha lies in [2, 6].", "good"))

    types = {r["layer"]: layer_type(r["layer"], r.get("kind")) for r in rows}
    overview = []
    for key, label, band in OVERVIEW:
        pts = [(i, _num(r.get(key)), types[r["layer"]], f"{r['layer']}: {key} = {_num(r.get(key)):.3g}")
               for i, r in enumerate(rows)]
        if not any(math.isfinite(p[1]) for p in pts):
            continue
        overview.append(Svg(scatter_svg(pts, title=f"{label} by depth", xlabel="layer (model order)", ylabel=key,
                                        band=band, width=760, height=240, xticks=True)))
    if overview:
        blocks.append(Group("Across depth, by layer type", overview))

    table_rows = sorted(
        [dict(r, type=layer_type(r["layer"], r.get("kind"))) for r in result.records],
        key=lambda r: (_flag_key(r),),  # stable: model order within each group
    )
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in table_rows)]
    blocks.append(Table.from_records(table_rows, cols, caption="All layers (flagged first; click a header to sort)",
                                     sortable=True, max_rows=100_000))

    spectra = result.extras.get("spectra", {})
    order = [r["layer"] for r in flagged if r["layer"] in spectra]
    order += [r["layer"] for r in rows if r["layer"] in spectra and r["layer"] not in order]
    per_layer = []
    for name in order:
        sx = spectra[name]
        alpha, xmin, xmax, n_tail = sx["fit"]
        pic = esd_svg(sx["evals"], alpha, xmin, xmax, n_tail, title=name)
        label = f"{name}: alpha {alpha:.2f}" if math.isfinite(alpha) else f"{name}: no fit"
        per_layer.append(Group(label, [Svg(pic, "ESD (log-log), fitted power-law tail dashed, xmin marked.")], folded=True))
    if per_layer:
        blocks.append(Group(f"Eigenvalue spectra ({len(per_layer)} layers, flagged first)", per_layer))
    return blocks
