"""Branch discovery: where a network splits into parallel paths and joins them.

Three kinds of branch point are found:

* ``groups``: a grouped convolution (each group is a branch). Its output
  channels are split by group; when one layer feeds it directly, that layer's
  output channels are split too (the AlexNet towers: ``conv1`` feeding a
  two-group ``conv2``), recorded as a second point on the feeding layer.
* ``concat``: parallel paths joined by concatenation (Inception blocks); each
  input of the concatenation is a branch owning a channel range of the joined
  tensor, whose neurons are the output channels of the branch's last layer.
* ``add`` / ``residual``: paths joined by addition. Each ``add`` point lists the
  residual path and the skip path (both own every channel of the sum); a chain of
  additions into the same stream is a ``residual`` point whose branches are the
  blocks, with the blocks' first ("read") layers as their neurons.

Grouped convolutions need only the layers. Everything else needs the data flow
the loader recorded in ``model.graph.nodes`` (the ``torch.fx`` trace of an
in-memory module, with shape propagation for channel counts, or the ONNX graph
with its inferred shapes); a model without it falls back to grouped convolutions
and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ..model import OP_ADD, OP_CONCAT, OP_INPUT, OP_LAYER, OP_OUTPUT, Layer, LayerKind, Model

# ops that keep the channel axis as it is (anything else unknown is assumed to, too,
# except these, which end a channel walk)
_CHANNEL_BREAKERS = frozenset({"flatten", "linear_op", "matmul", "input", "output", "concat", "add", "split"})


@dataclass
class Segment:
    """A run of neurons in a joined tensor: output channels ``[start, stop)`` of
    ``layer`` (``None`` when the channels come from no single layer)."""

    layer: str | None
    start: int
    stop: int
    branch: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Branch:
    index: int
    name: str
    layers: list[str]
    channels: tuple[int, int]  # [start, stop) in the joined tensor

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "layers": list(self.layers),
            "channels": [int(self.channels[0]), int(self.channels[1])],
            "size": int(self.channels[1] - self.channels[0]),
        }


@dataclass
class BranchPoint:
    """One place where branches exist, with the neurons the branches own.

    ``segments`` list the neurons of the joined tensor in order and the branch
    each belongs to; an ``add`` point has none (every branch owns every channel).
    ``consumers`` are the layers that read the joined tensor (for outgoing-weight
    descriptors); ``partition_in_weights`` says the neurons' incoming weights are
    themselves split by the branches (so they cannot describe the neurons fairly),
    ``partition_out_weights`` the same for the outgoing weights.
    """

    name: str
    kind: str  # groups, concat, add, residual
    layer: str  # the layer the record is filed under
    branches: list[Branch]
    segments: list[Segment] = field(default_factory=list)
    width: int = 0
    consumers: list[str] = field(default_factory=list)
    source: str = ""
    partition_in_weights: bool = False
    partition_out_weights: bool = False
    read_width: int | None = None  # residual: the stream width the read layers see
    note: str = ""

    @property
    def num_neurons(self) -> int:
        return sum(s.size for s in self.segments)

    def branch_labels(self) -> list[int]:
        out: list[int] = []
        for s in self.segments:
            out.extend([s.branch] * s.size)
        return out

    def to_dict(self) -> dict:
        return {
            "point": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "width": int(self.width),
            "neurons": int(self.num_neurons),
            "branches": [b.to_dict() for b in self.branches],
            "segments": [
                {"layer": s.layer, "channels": [int(s.start), int(s.stop)], "branch": int(s.branch)}
                for s in self.segments
            ],
            "consumers": list(self.consumers),
            "graph_source": self.source,
            "note": self.note,
        }


@dataclass
class Discovery:
    points: list[BranchPoint]
    graph_source: str | None  # "torch.fx", "onnx", or None (groups only)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# a tiny framework-free data-flow graph


@dataclass
class _Node:
    id: int
    op: str  # input, layer, concat, add, other
    inputs: list[int]
    layer: str | None = None
    axis: int | None = None
    channels: int | None = None  # size of dim 1 of the output, when known
    rank: int | None = None
    label: str = ""


class _Flow:
    def __init__(self, nodes: list[_Node], model: Model):
        self.nodes = {n.id: n for n in nodes}
        self.order = [n.id for n in nodes]  # topological (both sources give that)
        self.model = model
        self.users: dict[int, list[int]] = {n.id: [] for n in nodes}
        for n in nodes:
            for i in n.inputs:
                if i in self.users:
                    self.users[i].append(n.id)
        self._anc: dict[int, frozenset[int]] = {}

    def layer_of(self, nid: int) -> Layer | None:
        n = self.nodes[nid]
        return self.model[n.layer] if n.layer is not None and n.layer in self.model else None

    def _is_norm(self, nid: int) -> bool:
        lay = self.layer_of(nid)
        return lay is not None and lay.kind == LayerKind.NORM

    def ancestors(self, nid: int) -> frozenset[int]:
        """Every node ``nid`` depends on, itself included."""
        if nid in self._anc:
            return self._anc[nid]
        for x in self.order:  # fill in topological order (no deep recursion)
            if x in self._anc:
                continue
            acc = {x}
            for i in self.nodes[x].inputs:
                acc |= self._anc.get(i, frozenset({i}))
            self._anc[x] = frozenset(acc)
            if x == nid:
                break
        return self._anc[nid]

    def producer_layer(self, nid: int) -> str | None:
        """The weight layer whose output channels ``nid`` carries unchanged
        (walking back through activations, pooling and norms), else None."""
        seen = 0
        cur = nid
        while seen < 256:
            n = self.nodes[cur]
            if n.op == "layer" and not self._is_norm(cur):
                return n.layer
            if n.op in ("input", "concat", "add") or n.label in _CHANNEL_BREAKERS or len(n.inputs) != 1:
                return None
            cur, seen = n.inputs[0], seen + 1
        return None

    def consumers(self, nid: int) -> list[str]:
        """Weight layers that read ``nid``'s channels unchanged (through
        activations, pooling and norms)."""
        out: list[str] = []
        stack = list(self.users.get(nid, []))
        seen: set[int] = set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            n = self.nodes[u]
            if n.op == "layer" and not self._is_norm(u):
                if n.layer not in out:
                    out.append(n.layer)
                continue
            if n.op in ("concat", "add", "output") or n.label in _CHANNEL_BREAKERS:
                continue
            stack.extend(self.users.get(u, []))
        return out

    def layers_in(self, ids) -> list[str]:
        pos = {nid: k for k, nid in enumerate(self.order)}
        return [self.nodes[i].layer for i in sorted(ids, key=pos.__getitem__) if self.nodes[i].op == "layer"]


# ---------------------------------------------------------------------------
# the model's data flow

_FLOW_OPS = (OP_INPUT, OP_OUTPUT, OP_LAYER, OP_CONCAT, OP_ADD)


def _flow(model: Model) -> tuple[_Flow | None, str]:
    """The model's data-flow graph as recorded by its loader."""
    graph = model.graph
    if graph is None or not graph.nodes:
        if model.module is not None:
            why = next((n.removeprefix("no graph: ") for n in model.notes if n.startswith("no graph")), "")
            return None, why or "the model was loaded without tracing"
        if model.format == "onnx":
            return None, "the ONNX file's data flow was not recorded"
        return None, f"the {model.format} format carries no data-flow graph"
    nodes = []
    for n in graph.nodes:
        op = n.op if n.op in _FLOW_OPS else "other"
        if op in (OP_INPUT, OP_OUTPUT, OP_CONCAT, OP_ADD):
            label = op
        else:
            label = "" if n.keeps_channels else "flatten"
        nodes.append(
            _Node(
                n.id,
                op,
                list(n.inputs),
                layer=n.layer if op == OP_LAYER else None,
                axis=n.axis,
                channels=n.channels,
                rank=n.rank,
                label=label,
            )
        )
    return _Flow(nodes, model), graph.source


# ---------------------------------------------------------------------------
# discovery


def discover(model: Model, *, max_groups: int = 64, min_group_width: int = 2) -> Discovery:
    """Find the branch points of ``model`` (see the module docstring)."""
    notes: list[str] = []
    flow, why = _flow(model)
    if flow is None:
        extra = "" if model.module is not None or model.format == "onnx" else (
            "; a bare weights file does not record convolution groups either"
        )
        notes.append(f"no graph ({why}): only grouped convolutions are treated as branches{extra}")
    points = _group_points(model, flow, max_groups, min_group_width, notes)
    if flow is not None:
        points += _concat_points(model, flow, notes)
        points += _add_points(model, flow)
    points = _dedupe(points)
    return Discovery(points=points, graph_source=why if flow is not None else None, notes=notes)


def _group_points(model, flow, max_groups, min_group_width, notes) -> list[BranchPoint]:
    points: list[BranchPoint] = []
    src = "groups"
    for layer in model.layers:
        if not layer.is_conv or layer.groups <= 1:
            continue
        g = layer.groups
        if layer.depthwise or g > max_groups or layer.shape[1] < min_group_width:
            notes.append(
                f"{layer.name}: {g} groups of {layer.shape[1]} input channel(s) (depthwise or very many groups) "
                "not treated as branches"
            )
            continue
        out_per, in_per = layer.out_features // g, layer.shape[1]
        consumers = [e.dst for e in model.successors(layer.name)] if model.graph else []
        if flow is not None:
            nid = next((n.id for n in flow.nodes.values() if n.layer == layer.name), None)
            if nid is not None:
                consumers = flow.consumers(nid)
        branches = [
            Branch(i, f"group {i}", [f"{layer.name}[{i * out_per}:{(i + 1) * out_per}]"], (i * out_per, (i + 1) * out_per))
            for i in range(g)
        ]
        points.append(
            BranchPoint(
                name=f"{layer.name} (groups={g}, outputs)",
                kind="groups",
                layer=layer.name,
                branches=branches,
                segments=[Segment(layer.name, i * out_per, (i + 1) * out_per, i) for i in range(g)],
                width=layer.out_features,
                consumers=consumers,
                source=src,
                partition_in_weights=True,
                note=f"output channels of the grouped convolution {layer.name}, {out_per} per group",
            )
        )
        feeder = _single_feeder(model, flow, layer)
        if feeder is not None:
            fl = model[feeder]
            branches = [
                Branch(
                    i,
                    f"group {i}",
                    [f"{feeder}[{i * in_per}:{(i + 1) * in_per}]", f"{layer.name}[{i * out_per}:{(i + 1) * out_per}]"],
                    (i * in_per, (i + 1) * in_per),
                )
                for i in range(g)
            ]
            points.append(
                BranchPoint(
                    name=f"{feeder} -> {layer.name} (groups={g}, inputs)",
                    kind="groups",
                    layer=feeder,
                    branches=branches,
                    segments=[Segment(feeder, i * in_per, (i + 1) * in_per, i) for i in range(g)],
                    width=fl.out_features,
                    consumers=[layer.name],
                    source=src,
                    partition_out_weights=True,
                    note=f"output channels of {feeder}, split by the group of {layer.name} that reads them",
                )
            )
    return points


def _single_feeder(model: Model, flow: _Flow | None, layer: Layer) -> str | None:
    """The one layer whose output channels ``layer`` reads unchanged, if any."""
    if flow is not None:
        nid = next((n.id for n in flow.nodes.values() if n.layer == layer.name), None)
        if nid is None or len(flow.nodes[nid].inputs) != 1:
            return None
        name = flow.producer_layer(flow.nodes[nid].inputs[0])
    else:
        return None
    if name is None or name not in model:
        return None
    f = model[name]
    if f.kind in (LayerKind.NORM, LayerKind.OTHER) or f.out_features != layer.in_features:
        return None
    return name


def _concat_points(model: Model, flow: _Flow, notes: list[str]) -> list[BranchPoint]:
    points: list[BranchPoint] = []
    k = 0
    for nid in flow.order:
        n = flow.nodes[nid]
        if n.op != "concat" or len(n.inputs) < 2:
            continue
        if n.axis not in (1,):
            continue
        chans = [flow.nodes[i].channels for i in n.inputs]
        if any(c is None for c in chans):
            notes.append("a concatenation whose input channel counts are unknown was skipped")
            continue
        anc = [flow.ancestors(i) for i in n.inputs]
        branches, segments, start = [], [], 0
        for bi, (i, c) in enumerate(zip(n.inputs, chans)):
            others = frozenset().union(*(a for j, a in enumerate(anc) if j != bi))
            own = flow.layers_in(anc[bi] - others)
            prod = flow.producer_layer(i)
            if prod is not None and model[prod].out_features != c:
                prod = None
            label = (own[-1] if own else (prod or f"input {bi}"))
            branches.append(Branch(bi, label, own, (start, start + c)))
            segments.append(Segment(prod, 0 if prod else start, c if prod else start + c, bi))
            start += c
        consumers = flow.consumers(nid)
        k += 1
        first_layers = [b.layers[0] for b in branches if b.layers]
        name = f"concat {k}" + (f" ({', '.join(b.name for b in branches)})" if len(branches) <= 6 else "")
        # file the record under the first consumer, else the last layer of the last branch
        layer = consumers[0] if consumers else (branches[-1].layers[-1] if branches[-1].layers else "")
        points.append(
            BranchPoint(
                name=name,
                kind="concat",
                layer=layer,
                branches=branches,
                segments=segments,
                width=start,
                consumers=consumers,
                source=flow_source(flow),
                note=f"{len(branches)} paths joined by concatenation into {start} channels"
                + ("" if first_layers else "; no branch has layers of its own"),
            )
        )
    return points


def flow_source(flow: _Flow) -> str:
    return "onnx" if flow.model.format == "onnx" else "torch.fx"


def _through(flow: _Flow, nid: int) -> int:
    """Walk back from ``nid`` through single-input non-layer nodes (activations)."""
    cur = nid
    for _ in range(64):
        n = flow.nodes[cur]
        if n.op != "other" or len(n.inputs) != 1 or n.label in _CHANNEL_BREAKERS:
            return cur
        cur = n.inputs[0]
    return cur


def _add_points(model: Model, flow: _Flow) -> list[BranchPoint]:
    adds = [nid for nid in flow.order if flow.nodes[nid].op == "add"]
    points: list[BranchPoint] = []
    blocks: dict[int, dict] = {}
    for k, nid in enumerate(adds):
        a, b = flow.nodes[nid].inputs[:2]
        anc_a, anc_b = flow.ancestors(a), flow.ancestors(b)
        own_a, own_b = flow.layers_in(anc_a - anc_b), flow.layers_in(anc_b - anc_a)
        src_a, src_b = _through(flow, a), _through(flow, b)
        # the skip path is the one with fewer layers of its own (identity: none)
        if len(own_a) <= len(own_b):
            (skip, skip_layers), res_layers = (src_a, own_a), own_b
        else:
            (skip, skip_layers), res_layers = (src_b, own_b), own_a
        width = flow.nodes[nid].channels or 0
        branches = [
            Branch(0, "residual", [l for l in res_layers if model[l].kind != LayerKind.NORM], (0, width)),
            Branch(1, "skip" if not skip_layers else "projection", [l for l in skip_layers if model[l].kind != LayerKind.NORM], (0, width)),
        ]
        if not branches[0].layers:
            continue
        file_under = branches[0].layers[-1]
        points.append(
            BranchPoint(
                name=f"add {k + 1} ({file_under})",
                kind="add",
                layer=file_under,
                branches=branches,
                width=width,
                consumers=flow.consumers(nid),
                source=flow_source(flow),
                note="paths joined by addition: every branch writes all channels",
            )
        )
        # the stream position this block read from (the skip path's source, walked back)
        blocks[nid] = {"skip_src": skip, "skip_layers": skip_layers, "res_layers": branches[0].layers, "width": width}
    # chains of additions into one stream -> residual stages
    stages: list[list[int]] = []
    stage_of: dict[int, int] = {}
    for nid in adds:
        if nid not in blocks:
            continue
        s = _through(flow, blocks[nid]["skip_src"])
        prev = s if flow.nodes[s].op == "add" and s in blocks else None
        if prev is not None and prev in stage_of and not blocks[nid]["skip_layers"]:
            stage_of[nid] = stage_of[prev]
            stages[stage_of[nid]].append(nid)
        else:
            stage_of[nid] = len(stages)
            stages.append([nid])
    for si, members in enumerate(stages):
        if len(members) < 2:
            continue
        width = blocks[members[-1]]["width"]
        branches, segments, start = [], [], 0
        for bi, nid in enumerate(members):
            layers = blocks[nid]["res_layers"]
            read = layers[0]
            c = model[read].out_features
            branches.append(Branch(bi, f"block {bi} ({read})", layers, (start, start + c)))
            segments.append(Segment(read, 0, c, bi))
            start += c
        points.append(
            BranchPoint(
                name=f"residual stage {si + 1} ({len(members)} blocks, width {width})",
                kind="residual",
                layer=branches[0].layers[0],
                branches=branches,
                segments=segments,
                width=start,
                consumers=[],
                source=flow_source(flow),
                read_width=width,
                note="residual blocks adding into one stream, read as parallel branches; "
                "the neurons are each block's first layer, described by how they read the stream",
            )
        )
    return points


def _dedupe(points: list[BranchPoint]) -> list[BranchPoint]:
    """Merge points that split the same neurons the same way (chained grouped convs)."""
    out: list[BranchPoint] = []
    key_of: dict[tuple, BranchPoint] = {}
    for p in points:
        if not p.segments:
            out.append(p)
            continue
        key = tuple((s.layer, s.start, s.stop, s.branch) for s in p.segments)
        if key in key_of:
            q = key_of[key]
            for bq, bp in zip(q.branches, p.branches):
                bq.layers += [l for l in bp.layers if l not in bq.layers]
            q.consumers += [c for c in p.consumers if c not in q.consumers]
            q.partition_in_weights |= p.partition_in_weights
            q.partition_out_weights |= p.partition_out_weights
            q.note += f"; also {p.note}"
            continue
        key_of[key] = p
        out.append(p)
    return out
