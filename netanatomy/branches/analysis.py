"""The ``branches`` analysis: find the branches, describe the neurons from their
weights, count how the features fall into the branches, and map consecutive conv
layers by the SVD of ``|W|``.

Records (``branches.json``), each with a ``layer`` field and a ``record`` type:

* ``branch_point``: one per detected branch point: its kind, branches (layers,
  channel ranges), the descriptors that could be computed, every
  branch x category count with expected count and (corrected) hypergeometric
  p-value, Mann-Whitney tests of the continuous descriptors, and the headline.
* ``svd``: one per pair of consecutive conv layers: singular values (uncentred
  and centred) and the Pearson r of each left singular vector with each
  descriptor of the layer-1 neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._util import default_device
from ..analysis import Analysis, AnalysisResult, register_analysis, run_layer_safely
from ..errors import LayerError, UserError
from ..model import CONV_KINDS, Layer, LayerKind, Model
from .descriptors import (
    RGBDescriptors,
    UserLabels,
    is_rgb_filter_bank,
    pattern_clusters,
    pattern_matrix,
    read_labels,
    rgb_categories,
    rgb_descriptors,
)
from .discovery import BranchPoint, Discovery, discover
from .specialization import Test, apply_correction, category_tests, continuous_tests
from .svd import PairMaps, correlate, separation_auc, svd_maps


@dataclass
class BranchesOptions:
    clusters: int = 4  # k of the k-means clusters of weight patterns
    colour_threshold: float = 1 / 3  # colourfulness at or above which a filter counts as colour
    correction: str = "holm"  # multiple-testing correction over all counts: holm, bonferroni, bh, none
    alpha: float = 0.05  # significance level for the headline
    labels: str | None = None  # CSV of layer,neuron,category
    svd_vectors: int = 4  # singular vectors kept per map
    max_groups: int = 64  # grouped convs with more groups (depthwise-like) are not branches
    seed: int = 0  # k-means seed


@dataclass
class BranchesResult:
    """Everything the analysis computed (the registered analysis keeps it in
    ``AnalysisResult.extras['branches']`` for the pictures)."""

    discovery: Discovery
    point_records: list[dict] = field(default_factory=list)
    pairs: list[PairMaps] = field(default_factory=list)
    rgb: dict[str, RGBDescriptors] = field(default_factory=dict)
    filters: dict[str, np.ndarray] = field(default_factory=dict)  # first-layer weights for drawing
    neuron_branch: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # point -> arrays
    errors: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# computation


class _Cache:
    def __init__(self, model: Model, result: BranchesResult):
        self.model = model
        self.result = result
        self._w: dict[str, torch.Tensor | None] = {}
        self._failed: set[str] = set()

    def weight(self, name: str) -> torch.Tensor | None:
        if name in self._w:
            return self._w[name]
        layer = self.model[name]
        holder: dict[str, torch.Tensor] = {}

        def read(lay: Layer) -> dict:
            holder["w"] = lay.weight()
            return {}

        recs = run_layer_safely(read, layer)
        if recs and recs[0].get("error"):
            err = dict(recs[0])
            err["record"] = "error"
            self.result.errors.append(err)
            self._w[name] = None
        else:
            self._w[name] = holder.get("w")
        return self._w[name]

    def rgb(self, name: str) -> RGBDescriptors | None:
        if name in self.result.rgb:
            return self.result.rgb[name]
        layer = self.model[name]
        if layer.kind != LayerKind.CONV2D or not is_rgb_filter_bank(layer.shape, layer.groups):
            return None
        w = self.weight(name)
        if w is None:
            return None
        d = rgb_descriptors(w)
        self.result.rgb[name] = d
        self.result.filters[name] = w.detach().cpu().numpy()
        return d


def _neurons(point: BranchPoint) -> list[tuple[str | None, int, int]]:
    """(layer, channel, branch) for every neuron of the point, in joined order."""
    out = []
    for s in point.segments:
        for c in range(s.start, s.stop):
            out.append((s.layer, c, s.branch))
    return out


def _same_input(model: Model, layers: list[str]) -> bool:
    """All layers read the same tensor (same feeding layers, same width)."""
    if len(set(layers)) == 1:
        return True
    widths = {model[l].in_features for l in layers}
    if len(widths) != 1 or any(model[l].groups != 1 for l in layers):
        return False
    if model.graph is None:
        return False
    feeds = {frozenset(e.src for e in model.predecessors(l)) for l in layers}
    # one shared feeding set; an empty one means all read the network's input
    return len(feeds) == 1


def _describe_point(point: BranchPoint, cache: _Cache, opts: BranchesOptions, labels: UserLabels | None):
    """Categorical and continuous descriptors of the point's neurons."""
    model = cache.model
    neurons = _neurons(point)
    n = len(neurons)
    cats: dict[str, np.ndarray] = {}
    conts: dict[str, np.ndarray] = {}
    units: dict[str, str] = {}
    why_not: list[str] = []
    seg_layers = [s.layer for s in point.segments]
    # first-layer RGB descriptors
    if any(l is not None for l in seg_layers) and all(
        l is None or (model[l].kind == LayerKind.CONV2D and is_rgb_filter_bank(model[l].shape, model[l].groups))
        for l in seg_layers
    ):
        colour = np.full(n, None, dtype=object)
        freqcat = np.full(n, None, dtype=object)
        orient = np.full(n, None, dtype=object)
        vals = {k: np.full(n, np.nan) for k in ("colourfulness", "frequency", "orientedness")}
        ok = False
        for layer in {l for l in seg_layers if l is not None}:
            d = cache.rgb(layer)
            if d is None:
                continue
            ok = True
            c = rgb_categories(d, opts.colour_threshold)
            for i, (lname, ch, _) in enumerate(neurons):
                if lname == layer:
                    colour[i], orient[i] = c["colour"][ch], c["orientation"][ch]
                    for k in vals:
                        vals[k][i] = d.values()[k][ch]
        if ok:
            # frequency split at the median of the whole point (not per layer)
            f = vals["frequency"]
            med = np.nanmedian(f) if np.isfinite(f).any() else math.nan
            for i in range(n):
                if np.isfinite(f[i]):
                    freqcat[i] = "high-frequency" if f[i] > med else "low-frequency"
            cats["colour"], cats["frequency"], cats["orientation"] = colour, freqcat, orient
            for k in ("colour", "frequency", "orientation"):
                units[k] = "filters"
            conts.update(vals)
    # incoming weight patterns
    in_layers = [l for l in seg_layers if l is not None]
    if point.partition_in_weights:
        why_not.append("incoming weights are split by the branches themselves (not used)")
    elif in_layers and len(in_layers) == len(seg_layers):
        read_width = point.read_width
        usable = [l for l in set(in_layers) if read_width is None or model[l].in_features == read_width]
        if point.kind == "residual" or _same_input(model, in_layers):
            rows = []
            for i, (lname, ch, _) in enumerate(neurons):
                if lname not in usable:
                    continue
                w = cache.weight(lname)
                if w is None:
                    continue
                rows.append((i, lname, ch))
            if len(rows) >= max(4, opts.clusters):
                mats = {}
                for lname in {r[1] for r in rows}:
                    mats[lname] = pattern_matrix(cache.weight(lname), "in")
                widths = {m.shape[1] for m in mats.values()}
                if len(widths) == 1:
                    x = torch.stack([mats[l][ch] for _, l, ch in rows])
                    lab = pattern_clusters(x, opts.clusters, seed=opts.seed)
                    arr = np.full(n, None, dtype=object)
                    for (i, _, _), v in zip(rows, lab):
                        arr[i] = f"in-cluster {v}"
                    cats["in_cluster"] = arr
                    units["in_cluster"] = "neurons"
        else:
            why_not.append("the branches' neurons read different tensors (incoming weights not comparable)")
    # outgoing weight patterns
    if point.partition_out_weights:
        why_not.append("outgoing weights are split by the branches themselves (not used)")
    else:
        x = _outgoing(point, cache, neurons)
        if x is not None and x.shape[0] >= max(4, opts.clusters):
            lab = pattern_clusters(x, opts.clusters, seed=opts.seed)
            cats["out_cluster"] = np.array([f"out-cluster {v}" for v in lab], dtype=object)
            units["out_cluster"] = "neurons"
    # user labels
    if labels is not None:
        arr = np.full(n, None, dtype=object)
        for i, (lname, ch, _) in enumerate(neurons):
            if lname is not None:
                arr[i] = labels.for_layer(lname).get(ch)
        if any(v is not None for v in arr):
            cats["label"] = arr
            units["label"] = "neurons"
    return cats, conts, units, why_not


def _outgoing(point: BranchPoint, cache: _Cache, neurons) -> torch.Tensor | None:
    model = cache.model
    if point.kind == "residual":
        # each block's read neurons -> its write layer (only for two-layer blocks)
        rows = []
        for b in point.branches:
            convs = [l for l in b.layers if model[l].kind not in (LayerKind.NORM, LayerKind.OTHER)]
            if len(convs) != 2:
                return None
            read, write = convs
            w = cache.weight(write)
            if w is None or model[write].groups != 1 or model[write].in_features != model[read].out_features:
                return None
            rows.append(pattern_matrix(w, "out"))
        widths = {r.shape[1] for r in rows}
        return torch.cat(rows) if len(widths) == 1 else None
    for c in point.consumers:
        if c not in model:
            continue
        lay = model[c]
        if lay.kind in (LayerKind.NORM, LayerKind.OTHER) or lay.groups != 1 or lay.in_features != point.width:
            continue
        w = cache.weight(c)
        if w is None:
            continue
        m = pattern_matrix(w, "out")  # (width, out)
        if m.shape[0] != len(neurons):
            continue
        return m
    return None


def _point_record(point: BranchPoint, cache, opts, labels, result: BranchesResult) -> tuple[dict, list[Test]]:
    cats, conts, units, why_not = _describe_point(point, cache, opts, labels)
    neurons = _neurons(point)
    br = [b for _, _, b in neurons]
    names = [b.name if b.name.startswith(("group", "block")) else f"branch {b.index} ({b.name})" for b in point.branches]
    tests: list[Test] = []
    for kind, arr in cats.items():
        tests += category_tests(kind, arr, br, names, unit=units.get(kind, "neurons"))
    cont = []
    for kind, vals in conts.items():
        cont += continuous_tests(kind, vals, br, names)
    rec = point.to_dict()
    rec["record"] = "branch_point"
    rec["descriptors"] = sorted(cats)
    rec["descriptor_notes"] = why_not
    rec["continuous"] = cont
    result.neuron_branch[point.name] = {
        "branch": np.asarray(br),
        **{k: np.asarray(v) for k, v in cats.items()},
        **{k: np.asarray(v) for k, v in conts.items()},
    }
    return rec, tests


def _pairs(model: Model) -> list[tuple[str, str]]:
    """Consecutive conv layers (L1 feeds L2 directly, L2 ungrouped and reading
    all of L1's channels)."""
    convs = [l for l in model.layers if l.kind in CONV_KINDS]
    out = []
    if model.graph is not None:
        for l2 in convs:
            if l2.groups != 1:
                continue
            feeds = [e.src for e in model.predecessors(l2.name) if not ({"concat", "add"} & set(e.via))]
            for src in feeds:
                l1 = model[src]
                if l1.kind in CONV_KINDS and l1.out_features == l2.in_features and len(feeds) == 1:
                    out.append((l1.name, l2.name))
    else:
        for l1, l2 in zip(convs, convs[1:]):
            if l2.groups == 1 and l1.out_features == l2.in_features:
                out.append((l1.name, l2.name))
    return out


def _layer1_descriptors(l1: str, cache: _Cache, result: BranchesResult) -> dict[str, np.ndarray]:
    d: dict[str, np.ndarray] = {}
    rgb = cache.rgb(l1)
    if rgb is not None:
        d.update(rgb.values())
    w = cache.weight(l1)
    if w is not None:
        d["norm"] = w.reshape(w.shape[0], -1).norm(dim=1).double().numpy()
    # branch membership, when a two-branch point splits these very neurons
    for p in result.discovery.points:
        if len(p.branches) == 2 and p.segments and all(s.layer == l1 for s in p.segments):
            lab = np.zeros(model_out(cache, l1))
            for s in p.segments:
                lab[s.start : s.stop] = s.branch
            d["branch"] = lab
            break
    return d


def model_out(cache: _Cache, name: str) -> int:
    return cache.model[name].out_features


def _check(opts: BranchesOptions) -> None:
    if opts.correction not in ("holm", "bonferroni", "bh", "none"):
        raise UserError(f"branches.correction must be holm, bonferroni, bh or none, got {opts.correction!r}")
    if opts.clusters < 2:
        raise UserError("branches.clusters must be at least 2")


def _discover(model: Model, opts: BranchesOptions) -> Discovery:
    try:
        return discover(model, max_groups=opts.max_groups)
    except Exception as exc:  # a graph we misread must not cost the grouped-conv results
        from . import discovery as _d

        disc = _d.Discovery(points=[], graph_source=None, notes=[f"branch discovery failed ({type(exc).__name__}: {exc})"])
        saved, model.graph, model.module = (model.graph, model.module), None, None
        try:
            disc.points = _d._group_points(model, None, opts.max_groups, 2, disc.notes)
        finally:
            model.graph, model.module = saved
        return disc


@dataclass
class BranchesRun:
    """Per-run state of ``branches``: what was discovered, the weights read so
    far, and each branch point's record and tests until the multiple-testing
    correction over all of them (``finalize``)."""

    model: Model
    options: BranchesOptions
    labels: UserLabels | None
    result: BranchesResult
    cache: _Cache
    device: Any
    points_at: dict[str, list[int]] = field(default_factory=dict)  # layer -> indices of its points
    pairs_at: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # layer 2 -> pairs
    point_out: dict[int, tuple[dict, list[Test] | None]] = field(default_factory=dict)
    points_tried: set[int] = field(default_factory=set)
    layers_done: list[str] = field(default_factory=list)  # layers whose points and pairs were worked on
    pair_out: dict[tuple[str, str], PairMaps] = field(default_factory=dict)


def _do_point(i: int, context: BranchesRun) -> None:
    """The record and tests of branch point ``i`` (a descriptor that cannot be
    read becomes an error of the point; the other points go on)."""
    point = context.result.discovery.points[i]
    context.points_tried.add(i)
    if not point.segments:
        rec = point.to_dict()
        rec["record"] = "branch_point"
        rec["descriptors"] = []
        rec["tests"] = []
        context.point_out[i] = (rec, None)
        return
    try:
        context.point_out[i] = _point_record(point, context.cache, context.options, context.labels, context.result)
    except (LayerError, UserError) as exc:
        context.result.errors.append(
            {"layer": point.layer, "record": "error", "error": f"{point.name}: {exc}", "error_type": "user"}
        )


def _do_pair(l1: str, l2: str, context: BranchesRun) -> None:
    cache = context.cache
    w2 = cache.weight(l2)
    if w2 is None or cache.weight(l1) is None:
        return
    maps = svd_maps(w2, k=context.options.svd_vectors, device=context.device)
    desc = _layer1_descriptors(l1, cache, context.result)
    context.pair_out[(l1, l2)] = PairMaps(l1, l2, maps, correlate(maps, desc))


def compute(model: Model, opts: BranchesOptions | None = None) -> BranchesResult:
    """Run the whole analysis (no plotting, no printing)."""
    return BranchesAnalysis().run(model, opts or BranchesOptions()).extras["branches"]


def svd_record(pm: PairMaps, result: BranchesResult, opts: BranchesOptions) -> dict:
    rec = {
        "record": "svd",
        "layer": pm.layer2,
        "input_layer": pm.layer1,
        "singular_values_uncentred": pm.maps["uncentred"].singular_values,
        "singular_values_centred": pm.maps["centred"].singular_values,
        "explained_centred": pm.maps["centred"].explained,
        "correlations": pm.correlations,
        "headline": pm.headline(),
    }
    rgb = result.rgb.get(pm.layer1)
    if rgb is not None:
        colour = rgb.colourfulness >= opts.colour_threshold
        rec["colour_grey_auc"] = {
            v: [separation_auc(mp.left[:, j], colour) for j in range(mp.left.shape[1])] for v, mp in pm.maps.items()
        }
    return rec


# ---------------------------------------------------------------------------
# the registered analysis


@register_analysis("branches")
class BranchesAnalysis(Analysis):
    title = "Branch specialization"
    description = (
        "Branches (grouped convolutions, concatenated paths, residual blocks), per-neuron descriptors "
        "from the weights (colour, frequency, orientation of first-layer filters; clusters of weight "
        "patterns; user labels), hypergeometric tests of whether a kind of feature gathers in one branch, "
        "and SVD maps of |W| between consecutive conv layers."
    )
    Options = BranchesOptions

    def prepare(self, model: Model, options: BranchesOptions) -> BranchesRun:
        _check(options)
        labels = read_labels(options.labels) if options.labels else None
        disc = _discover(model, options)
        result = BranchesResult(discovery=disc, notes=list(disc.notes))
        ctx = BranchesRun(model, options, labels, result, _Cache(model, result), default_device())
        for i, point in enumerate(disc.points):
            ctx.points_at.setdefault(point.layer, []).append(i)
        for l1, l2 in _pairs(model):
            ctx.pairs_at.setdefault(l2, []).append((l1, l2))
        return ctx

    def select_layers(self, model: Model, options: BranchesOptions, context: BranchesRun) -> list[Layer]:
        """The layers that branch points are filed under or that end a pair of
        consecutive convs."""
        return [l for l in model.layers if l.name in context.points_at or l.name in context.pairs_at]

    def analyze_layer(self, layer: Layer, options: BranchesOptions, context: BranchesRun) -> list[dict]:
        """Describe the branch points filed under ``layer`` and map the pairs
        ending at it. The records are assembled in ``finalize``, after the
        multiple-testing correction over every point's tests."""
        for i in context.points_at.get(layer.name, []):
            _do_point(i, context)
        for l1, l2 in context.pairs_at.get(layer.name, []):
            _do_pair(l1, l2, context)
        context.layers_done.append(layer.name)
        return []

    def finalize(self, result: AnalysisResult, context: BranchesRun) -> None:
        res, opts = context.result, context.options
        filed = {l.name for l in context.model.layers}
        for i, point in enumerate(res.discovery.points):  # points filed under no layer of the model
            if i not in context.points_tried and point.layer not in filed:
                _do_point(i, context)
        outs = [context.point_out[i] for i in sorted(context.point_out)]
        res.point_records = [rec for rec, _ in outs]
        tested = [(rec, tests) for rec, tests in outs if tests is not None]
        apply_correction([t for _, ts in tested for t in ts], opts.correction)
        for rec, tests in tested:
            rec["tests"] = [t.to_dict() for t in tests]
            enriched = [t for t in tests if t.count > t.expected]
            if enriched:
                best = min(enriched, key=lambda t: (t.p_adjusted, -t.count))
                rec["best"] = best.sentence()
                rec["min_p_adjusted"] = best.p_adjusted
                rec["specialized"] = bool(best.p_adjusted < opts.alpha)
            else:
                rec["best"], rec["min_p_adjusted"], rec["specialized"] = "", math.nan, False
        res.pairs = [context.pair_out[p] for ps in context.pairs_at.values() for p in ps if p in context.pair_out]
        for r in result.records:  # a layer that failed outright
            r.setdefault("record", "error")
        res.errors.extend(result.records)
        result.records = list(res.point_records) + [svd_record(pm, res, opts) for pm in res.pairs] + list(res.errors)
        failed = {e["layer"] for e in res.errors}
        kinds: dict[str, int] = {}
        for p in res.discovery.points:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        result.summary.update(
            branch_points=len(res.discovery.points),
            graph=res.discovery.graph_source or "none (groups only)",
            specialized_points=sum(1 for r in res.point_records if r.get("specialized")),
            svd_pairs=len(res.pairs),
            kinds=kinds,
            notes=res.notes,
            # counted in layers, not records (a layer files several records)
            layers_analysed=len(set(context.layers_done) - failed),
            layers_failed=len(failed),
        )
        result.extras["branches"] = res
