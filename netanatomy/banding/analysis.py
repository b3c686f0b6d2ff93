"""The registered analysis ``banding``: pictures, scores and types of every conv
layer with spatial kernels of at least 3x3, the last conv before global pooling
marked, and layers ranked by banding. See :mod:`netanatomy.banding.core` for
the definitions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._util import default_device
from ..analysis import Analysis, AnalysisResult, register_analysis
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


@dataclass
class BandingRun:
    """Per-run state of ``banding``: each analysed layer's full result (for the
    pictures), filled as layers finish."""

    model: Model
    device: object
    detail: dict = field(default_factory=dict)


@register_analysis("banding")
class BandingAnalysis(Analysis):
    title = "Weight banding"
    description = (
        "Each conv neuron's spatial weights reduced to a 3-colour picture by posneg NMF; "
        "V_y / V_x = share of the picture's variance explained by its row / column means "
        "(horizontal stripes: V_y near 1; i.i.d. null (kh-1)/(kh*kw-1)); per layer the share "
        "of banded neurons, the orientation, banding types from k-means, and the last conv "
        "before global pooling, where banding forms in models that pool globally."
    )
    Options = BandingOptions

    def applies_to(self, layer: Layer, min_kernel: int = 3) -> bool:
        if layer.kind != LayerKind.CONV2D or len(layer.shape) != 4:
            return False
        return min(layer.shape[2], layer.shape[3]) >= min_kernel

    def prepare(self, model: Model, options: BandingOptions) -> BandingRun:
        _check(options)
        return BandingRun(model, default_device())

    def select_layers(self, model: Model, options: BandingOptions, context: BandingRun) -> list[Layer]:
        k = max(1, int(options.min_kernel))
        return [layer for layer in model.layers if self.applies_to(layer, k)]

    def analyze_layer(self, layer: Layer, options: BandingOptions, context: BandingRun) -> dict:
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
            device=context.device,
            max_iter=options.max_iter,
            tol=options.tol,
        )
        context.detail[layer.name] = lb
        return dict(lb.record)

    def summarize(self, records: list[dict], options: BandingOptions, context: BandingRun) -> dict:
        if not records:
            return {}
        best = max(records, key=_score)
        return {
            "most_banded_layer": best["layer"],
            "most_banded_score": best.get("banding_score", math.nan),
            "most_banded_orientation": best.get("orientation"),
            "banded_layers": sum(1 for r in records if r.get("orientation") != "none"),
        }

    def finalize(self, result: AnalysisResult, context: BandingRun) -> None:
        model = context.model
        last = model.last_conv_before_global_pool()
        known = model.graph is not None
        ranked = sorted(result.ok_records, key=lambda r: -_score(r))
        for i, r in enumerate(ranked):
            r["rank"] = i + 1
        for r in result.records:
            if known:
                r["before_global_pool"] = bool(model.global_pool_after(r["layer"]))
            r["last_conv_before_global_pool"] = bool(last is not None and r["layer"] == last.name)
        result.extras["layers"] = context.detail
        result.extras["ranked"] = [r["layer"] for r in ranked]
        s = result.summary
        s["graph_known"] = known
        s["last_conv_before_global_pool"] = last.name if last is not None else None
        if last is not None and last.name in context.detail:
            rec = context.detail[last.name].record
            s["last_conv_orientation"] = rec["orientation"]
            s["last_conv_banded_fraction"] = rec["banded_fraction"]
            s["last_conv_v_y_median"] = rec["v_y_median"]
            s["last_conv_v_x_median"] = rec["v_x_median"]


def _score(r: dict) -> float:
    """The banding score, -1 for a layer without one (NaN)."""
    v = r.get("banding_score")
    return v if v == v else -1
