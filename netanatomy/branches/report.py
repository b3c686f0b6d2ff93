"""Report blocks for the ``branches`` analysis."""

from __future__ import annotations

import math

from ..analysis import AnalysisResult
from ..report.blocks import Callout, Group, Image, Paragraph, Table, have_matplotlib
from ..report.render import register_renderer

MAX_MAPS = 4  # pairs of layers drawn in the report (all are in the JSON)
MAX_POINTS = 12  # branch points with count tables in the report


@register_renderer("branches")
def render_blocks(result: AnalysisResult) -> list:
    res = result.extras.get("branches")
    blocks: list = []
    for note in result.summary.get("notes", []):
        blocks.append(Callout(note, "warn" if "no graph" in note or "failed" in note else "info"))
    points = [r for r in result.records if r.get("record") == "branch_point"]
    svds = [r for r in result.records if r.get("record") == "svd"]
    if not points:
        blocks.append(Paragraph("No branch points found (no grouped convolutions, concatenations or additions)."))
    else:
        rows = []
        for r in points:
            rows.append(
                {
                    "point": r["point"],
                    "kind": r["kind"],
                    "layer": r["layer"],
                    "branches": len(r["branches"]),
                    "neurons": r["neurons"],
                    "descriptors": ", ".join(r.get("descriptors", [])),
                    "headline": r.get("best", ""),
                    "specialized": r.get("specialized", False),
                }
            )
        blocks.append(Table.from_records(rows, highlight="specialized", caption="Detected branch points"))
        for r in points:
            if r.get("specialized"):
                blocks.append(Callout(f"{r['point']}: {r['best']}", "good"))
    mpl = have_matplotlib()
    for r in [p for p in points if p.get("tests")][:MAX_POINTS]:
        inner: list = []
        branch_rows = [
            {"branch": b["index"], "name": b["name"], "channels": f"{b['channels'][0]}-{b['channels'][1]}", "layers": ", ".join(b["layers"])}
            for b in r["branches"]
        ]
        inner.append(Table.from_records(branch_rows))
        for note in r.get("descriptor_notes", []):
            inner.append(Paragraph(note))
        if mpl and res is not None and r["point"] in res.neuron_branch:
            seg_layers = {s["layer"] for s in r["segments"]}
            if len(seg_layers) == 1:
                (only,) = seg_layers
                if only in res.filters:
                    from .plots import plot_branch_filters

                    nb = res.neuron_branch[r["point"]]
                    fig = plot_branch_filters(
                        res.filters[only][[c for s in r["segments"] for c in range(*s["channels"])]],
                        nb["branch"],
                        [b["name"] for b in r["branches"]],
                        order=nb.get("colourfulness"),
                    )
                    inner.append(Image.from_figure(fig, f"First-layer filters of {only} by branch (sorted by colourfulness)."))
        tests = sorted(r["tests"], key=lambda t: (t["p_adjusted"] if t["p_adjusted"] is not None else 1.0))
        if mpl and r.get("specialized") and tests:
            from .plots import plot_counts

            kind = tests[0]["descriptor"]
            inner.append(Image.from_figure(plot_counts(r, kind), f"Observed and expected counts per branch ({kind}); * marks a significant enrichment."))
        inner.append(
            Table.from_records(
                [dict(t, significant=bool(t["p_adjusted"] is not None and t["p_adjusted"] < 0.05 and t["count"] > t["expected"])) for t in tests],
                ["descriptor", "category", "branch_name", "count", "total", "branch_size", "expected", "p", "p_adjusted"],
                highlight="significant",
                max_rows=40,
            )
        )
        if r.get("continuous"):
            inner.append(Table.from_records(r["continuous"], ["descriptor", "branch_name", "median", "median_others", "mwu_p"]))
        blocks.append(Group(r["point"], inner, folded=not r.get("specialized")))
    if svds:
        rows = []
        for r in svds:
            rows.append({"layer 1": r["input_layer"], "layer 2": r["layer"], "headline": r.get("headline", ""),
                         "top centred share": (r["explained_centred"][0] if len(r["explained_centred"]) else math.nan)})
        blocks.append(Table.from_records(rows, caption="SVD of |W| between consecutive conv layers"))
    if mpl and res is not None:
        from .plots import plot_sv_correlations, plot_svd_map

        # maps of first-layer pairs first: those can be drawn as filters
        pairs = sorted(res.pairs, key=lambda p: (p.layer1 not in res.filters,))
        for pm in pairs[:MAX_MAPS]:
            inner = []
            filt = res.filters.get(pm.layer1)
            views = [(v, vec) for v, vec in (("uncentred", (0, 1)), ("uncentred", (1, 2)), ("centred", (0, 1)))
                     if pm.maps[v].left.shape[1] > max(vec)]
            if views:
                import matplotlib.pyplot as plt

                fig, axes = plt.subplots(1, len(views), figsize=(4.6 * len(views), 4.4), squeeze=False)
                for ax, (variant, vec) in zip(axes[0], views):
                    plot_svd_map(pm, filt, variant=variant, vectors=vec, ax=ax)
                fig.tight_layout()
                inner.append(Image.from_figure(fig, f"{pm.layer1} neurons placed by left singular vectors "
                                               + ", ".join(f"{v} {a}/{b}" for v, (a, b) in views) + "."))
            right = (1, 2) if pm.maps["uncentred"].right.shape[1] > 2 else (0, 1)
            fig = plot_svd_map(pm, None, variant="uncentred", side="right", vectors=right)
            inner.append(Image.from_figure(fig, f"{pm.layer2} neurons by the right singular vectors {right[0]} and {right[1]}."))
            if pm.correlations:
                inner.append(Image.from_figure(plot_sv_correlations(pm, "uncentred"), "Pearson r of each left singular vector with the layer-1 descriptors (uncentred)."))
            head = pm.headline()
            blocks.append(Group(f"SVD map {pm.layer1} -> {pm.layer2}" + (f": {head}" if head else ""), inner, folded=True))
    return blocks
