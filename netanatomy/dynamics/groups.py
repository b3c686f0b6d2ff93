"""Channel groups: for every conv / linear layer, the tensors indexed by each of its
output channels.

A channel ``c`` of layer ``L`` owns

* its incoming filter ``L.weight[c]`` (and ``L.bias[c]``),
* its parameters in the norm layer(s) right after ``L`` (``bn.weight[c]`` ...),
* its outgoing slice in every layer that reads ``L``'s output, found by walking the
  graph through norms, activations, pooling, flattening and residual adds:
  ``next.weight[:, c]`` for a plain successor, ``next.weight.view(out, C, k)[:, c]``
  when the output is flattened (``k`` positions per channel), ``next.weight[c]`` for a
  depthwise successor, the matching column of its group for a grouped one.

Successors reached through a concatenation are not followed (the channel offset in
the concatenated tensor is unknown); the group says so in ``notes``.

Each group also records its layer's channel space (:mod:`netanatomy.channels`):
``tied`` lists the other layers whose output channels are the same channels
(the blocks writing one residual stream), ``space_fixed`` whether that space
cannot be reordered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..channels import channel_spaces, space_of
from ..model import LAYOUT_TORCH, CONV_KINDS, Layer, LayerKind, Model

TRACKED_KINDS = CONV_KINDS | {LayerKind.LINEAR}


@dataclass
class OutSlice:
    """How channel ``c`` indexes a successor's weight (canonical layout)."""

    layer: str
    key: str  # state-dict key of the successor's weight
    layout: str
    mode: str  # "column" | "flatten" | "depthwise" | "grouped"
    positions: int = 1  # flattened positions per channel ("flatten")
    groups: int = 1  # successor groups ("grouped")
    residual: bool = False  # the path goes through a residual add


@dataclass
class ChannelGroup:
    layer: str
    kind: str
    channels: int
    in_key: str  # state-dict key of the layer's weight
    in_layout: str = LAYOUT_TORCH
    bias_key: str | None = None
    norm_layers: list[str] = field(default_factory=list)
    norm_keys: list[str] = field(default_factory=list)  # 1-D params indexed by channel
    outs: list[OutSlice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)  # other writers of the same channel space
    space_fixed: bool | None = None  # None: no graph, space unknown

    @property
    def coupled(self) -> bool:
        """Whether an outgoing side was found (else the norm is the incoming one only)."""
        return bool(self.outs)

    @property
    def residual(self) -> bool:
        return any(o.residual for o in self.outs)

    def describe(self) -> dict:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "channels": self.channels,
            "in": self.in_key,
            "norm_layers": list(self.norm_layers),
            "outs": [f"{o.layer}[{o.mode}{'x' + str(o.positions) if o.mode == 'flatten' else ''}]" for o in self.outs],
            "residual": self.residual,
            "notes": list(self.notes),
        }


def _out_slice(src: Layer, dst: Layer, via: tuple[str, ...]) -> tuple[OutSlice | None, str | None]:
    C = src.out_features
    if "concat" in via:
        return None, f"{dst.name}: reached through a concatenation, not followed"
    if dst.kind not in TRACKED_KINDS:
        return None, f"{dst.name}: {dst.kind} successor not followed"
    residual = "add" in via
    key = dst.tensors["weight"]
    if dst.is_conv and dst.groups > 1:
        if dst.depthwise and dst.in_features == C:
            return OutSlice(dst.name, key, dst.layout, "depthwise", residual=residual), None
        if dst.in_features == C:
            return OutSlice(dst.name, key, dst.layout, "grouped", groups=dst.groups, residual=residual), None
        return None, f"{dst.name}: grouped successor with {dst.in_features} inputs for {C} channels"
    n_in = dst.in_features
    if n_in == C:
        return OutSlice(dst.name, key, dst.layout, "column", residual=residual), None
    if n_in % C == 0 and not dst.is_conv:
        return OutSlice(dst.name, key, dst.layout, "flatten", positions=n_in // C, residual=residual), None
    return None, f"{dst.name}: {n_in} inputs do not match {C} channels"


def find_channel_groups(model: Model, layers: list[str] | None = None) -> list[ChannelGroup]:
    """The channel group of every conv / linear layer of ``model`` (in model order).

    Without a graph (a model loaded from a file), the successor of a layer is taken
    to be the next tracked layer whose input size matches (a sequential guess) and
    the group notes it.
    """
    tracked = [l for l in model.layers if l.kind in TRACKED_KINDS and l.fused == 1 and "weight" in l.tensors]
    if layers is not None:
        wanted = set(layers)
        missing = wanted - {l.name for l in tracked}
        if missing:
            from ..errors import UserError

            raise UserError(f"no conv/linear layer named {', '.join(sorted(missing))}")
        tracked_names = wanted
    else:
        tracked_names = {l.name for l in tracked}
    spaces = space_of(channel_spaces(model))
    groups: list[ChannelGroup] = []
    for i, layer in enumerate(tracked):
        if layer.name not in tracked_names:
            continue
        g = ChannelGroup(
            layer=layer.name,
            kind=str(layer.kind),
            channels=layer.out_features,
            in_key=layer.tensors["weight"],
            in_layout=layer.layout,
            bias_key=layer.tensors.get("bias"),
        )
        if layer.name in spaces:
            g.tied = [w for w in spaces[layer.name].writers if w != layer.name]
            g.space_fixed = spaces[layer.name].fixed
        if model.graph is not None:
            # norms directly after the layer (possibly through an activation)
            stack = [e.dst for e in model.graph.successors(layer.name)]
            seen = set()
            while stack:
                n = stack.pop()
                if n in seen or n not in model:
                    continue
                seen.add(n)
                nl = model[n]
                if nl.kind == LayerKind.NORM and nl.shape and nl.shape[0] == layer.out_features:
                    g.norm_layers.append(n)
                    g.norm_keys.extend(
                        nl.tensors[r] for r in ("weight", "bias") if r in nl.tensors
                    )
                    stack.extend(e.dst for e in model.graph.successors(n))
            for e in sorted(model.successors(layer.name), key=lambda e: model.layers.index(model[e.dst])):
                dst = model[e.dst]
                sl, why = _out_slice(layer, dst, e.via)
                if sl is not None:
                    g.outs.append(sl)
                elif why:
                    g.notes.append(why)
        else:
            for nxt in tracked[i + 1 :]:
                sl, _ = _out_slice(layer, nxt, ())
                if sl is not None:
                    g.outs.append(sl)
                    g.notes.append(f"no graph: successor {nxt.name} guessed from layer order and shape")
                    break
        if not g.outs:
            g.notes.append("no successor: the norm is the incoming side only")
        groups.append(g)
    return groups
