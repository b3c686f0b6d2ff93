"""The registered analysis ``banding``: pictures, scores and types of every conv
layer with spatial kernels of at least 3x3, the last conv before global pooling
marked, and layers ranked by banding. See :mod:`netanatomy.banding.core` for
the definitions."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..analysis import AnalysisResult, LayerwiseAnalysis, register_analysis
from ..model import Layer, LayerKind, Model
from .core import analyse_weight


@dataclass
class BandingOptions:
    k_types: int = 4  # k-means clusters (banding types) per layer
    band_min: float = 0.6  # a neuron is banded when V >= band_min ...
    margin: float = 0.2  # ... and V exceeds the other axis' V by margin
    min_fraction: float = 0.25  # a layer is oriented when this share of neurons is banded
    min_kernel: int = 3  # smallest kernel side analysed
    max_neurons: int = 0  # analyse a random subset of this many neurons (0 = all)
    max_iter: int = 200  # NMF sweeps at most
    tol: float = 1e-3  # NMF stopping tolerance
    grids: int = 4  # picture grids in the report (most banded layers + last conv before pooling)
    seed: int = 0


def _check(o: BandingOptions) -> None:
    from ..errors import UserError

    if o.k_types < 1:
        raise UserError("banding.k_types must be at least 1")
    for name in ("band_min", "margin", "min_fraction"):
        v = getattr(o, name)
        if not 0.0 <= v <= 1.0:
            raise UserError(f"banding.{name} must lie in [0, 1], got {v}")
    if o.min_kernel < 1 or o.max_neurons < 0 or o.max_iter < 1 or o.tol < 0:
        raise UserError("banding: min_kernel and max_iter must be >= 1, max_neurons and tol >= 0")


@register_analysis("banding")
class BandingAnalysis(LayerwiseAnalysis):
    title = "Weight banding"
    description = (
        "Each conv neuron's spatial weights reduced to a 3-colour picture by posneg NMF; "
        "V_y / V_x = share of the picture's variance explained by its row / column means "
        "(horizontal stripes: V_y near 1; i.i.d. null (kh-1)/(kh*kw-1)); per layer the share "
        "of banded neurons, the orientation, banding types from k-means, and the last conv "
        "before global pooling, where banding forms in models that pool globally."
    )
    Options = BandingOptions

    def __init__(self) -> None:
        self._detail: dict = {}

    def applies_to(self, layer: Layer) -> bool:
        if layer.kind != LayerKind.CONV2D or len(layer.shape) != 4:
            return False
        return min(layer.shape[2], layer.shape[3]) >= self._min_kernel

    _min_kernel = 3

    def analyze_layer(self, layer: Layer, options: BandingOptions) -> dict:
        from .._util import default_device

        w = layer.weight()
        lb = analyse_weight(
            layer.name,
            w,
            depthwise=layer.depthwise,
            k_types=options.k_types,
            band_min=options.band_min,
            margin=options.margin,
            min_fraction=options.min_fraction,
            max_neurons=options.max_neurons,
            seed=options.seed,
            device=default_device(),
            max_iter=options.max_iter,
            tol=options.tol,
        )
        self._detail[layer.name] = lb
        return dict(lb.record)

    def run(self, model: Model, options: BandingOptions | None = None, progress=None) -> AnalysisResult:
        options = options if options is not None else self.make_options()
        _check(options)
        self._min_kernel = max(1, int(options.min_kernel))
        self._detail = {}
        result = super().run(model, options, progress)
        last = model.last_conv_before_global_pool()
        known = model.graph is not None
        ok = [r for r in result.records if not r.get("error")]
        ranked = sorted(ok, key=lambda r: -(r.get("banding_score") if r.get("banding_score") == r.get("banding_score") else -1))
        for i, r in enumerate(ranked):
            r["rank"] = i + 1
        for r in result.records:
            if known:
                r["before_global_pool"] = bool(model.global_pool_after(r["layer"]))
            r["last_conv_before_global_pool"] = bool(last is not None and r["layer"] == last.name)
        result.extras["layers"] = self._detail
        result.extras["ranked"] = [r["layer"] for r in ranked]
        result.summary = self.summarize(ok, options)
        result.summary["graph_known"] = known
        result.summary["last_conv_before_global_pool"] = last.name if last is not None else None
        if last is not None and last.name in self._detail:
            rec = self._detail[last.name].record
            result.summary["last_conv_orientation"] = rec["orientation"]
            result.summary["last_conv_banded_fraction"] = rec["banded_fraction"]
            result.summary["last_conv_v_y_median"] = rec["v_y_median"]
            result.summary["last_conv_v_x_median"] = rec["v_x_median"]
        result.summary.setdefault("layers_analysed", len(ok))
        result.summary.setdefault("layers_failed", len(result.errors))
        self._detail = {}
        return result

    def summarize(self, records: list[dict], options) -> dict:
        if not records:
            return {}
        best = max(records, key=lambda r: r.get("banding_score") if r.get("banding_score") == r.get("banding_score") else -1)
        return {
            "most_banded_layer": best["layer"],
            "most_banded_score": best.get("banding_score", math.nan),
            "most_banded_orientation": best.get("orientation"),
            "banded_layers": sum(1 for r in records if r.get("orientation") != "none"),
        }

    def render(self, result: AnalysisResult) -> list:
        from ..report.blocks import Callout, Group, Image, Paragraph, Table, have_matplotlib

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
            from .figures import picture_grid, type_figure

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
