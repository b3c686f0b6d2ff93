"""The framework-free view of a network: a :class:`Model` is an ordered list of
:class:`Layer` objects plus what is known of the graph between them.

Loaders (``netanatomy.io``) are the only code that knows about file formats and
frameworks. Analyses see layers, shapes and tensors in one canonical layout:

* linear / attention / embedding weights as ``(out, in)`` (embedding: ``(num, dim)``);
* conv weights as ``(out, in // groups, *kernel)``, as PyTorch stores them.

Tensors are read lazily, one at a time, from a :class:`TensorStore`, so analysing
a model never needs the whole model in memory.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence

import torch

from .errors import NonFiniteWeightsError, UserError


class LayerKind(str, enum.Enum):
    CONV1D = "conv1d"
    CONV2D = "conv2d"
    CONV3D = "conv3d"
    LINEAR = "linear"
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    NORM = "norm"
    OTHER = "other"

    def __str__(self) -> str:  # so f-strings and tables show "conv2d"
        return self.value


CONV_KINDS = frozenset({LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.CONV3D})
MATRIX_KINDS = frozenset({LayerKind.LINEAR, LayerKind.EMBEDDING, LayerKind.ATTENTION})

# Normalised operation labels that loaders record on graph edges.
GLOBAL_POOL_OPS = frozenset({"global_avg_pool", "global_max_pool", "global_sum_pool"})
POOL_OPS = GLOBAL_POOL_OPS | frozenset(
    {"avg_pool", "max_pool", "lp_pool", "avg_pool_x", "avg_pool_y", "adaptive_pool"}
)


class TensorStore(Protocol):
    """Where a model's tensors live. ``get`` returns the tensor as stored."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> str: ...

    def get(self, key: str) -> torch.Tensor: ...


class DictStore:
    """A store over tensors already in memory (an ``nn.Module``'s state dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._t = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> str:
        return str(self._t[key].dtype).removeprefix("torch.")

    def get(self, key: str) -> torch.Tensor:
        return self._t[key]


# How a weight is laid out in its store, relative to the canonical torch layout.
LAYOUT_TORCH = "torch"  # as torch stores it
LAYOUT_TRANSPOSED = "transposed"  # 2-D (in, out): Keras/Flax dense, GPT-2 Conv1D, ONNX MatMul
LAYOUT_HWIO = "hwio"  # conv (*kernel, in, out): TensorFlow / Flax


def to_canonical(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == LAYOUT_TORCH:
        return t
    if layout == LAYOUT_TRANSPOSED:
        return t.t()
    if layout == LAYOUT_HWIO:
        # (*k, in, out) -> (out, in, *k)
        nd = t.dim()
        return t.permute(nd - 1, nd - 2, *range(nd - 2))
    raise ValueError(f"unknown layout {layout!r}")


def canonical_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if layout == LAYOUT_TRANSPOSED:
        return (shape[1], shape[0])
    if layout == LAYOUT_HWIO:
        return (shape[-1], shape[-2], *shape[:-2])
    return shape


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or Inf. A NaN or an Inf makes the
    sum NaN or Inf, so a finite sum settles it in one pass without a boolean
    copy of the tensor (twenty times faster on an embedding matrix); a sum that
    overflows (huge finite values) falls back to the elementwise test."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


@dataclass
class Layer:
    """One layer with weights.

    ``tensors`` maps roles (``weight``, ``bias``, ``running_mean`` ...) to keys in
    the store. ``shape`` is the canonical weight shape. ``fused`` is the number of
    projections stacked along dim 0 (3 for a fused q/k/v projection).
    """

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    tensors: dict[str, str]
    store: TensorStore = field(repr=False, compare=False)
    groups: int = 1
    layout: str = LAYOUT_TORCH
    module_type: str | None = None
    role: str | None = None
    fused: int = 1
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    note: str | None = None

    # -- shape facts --------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        """Input features (for convs, all input channels: ``shape[1] * groups``)."""
        return self.shape[1] * self.groups if len(self.shape) > 1 else 1

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.shape[2:]) if self.kind in CONV_KINDS else ()

    @property
    def is_conv(self) -> bool:
        return self.kind in CONV_KINDS

    @property
    def depthwise(self) -> bool:
        return self.is_conv and self.groups > 1 and self.shape[1] == 1 and self.groups == self.in_features

    @property
    def num_params(self) -> int:
        """Trainable parameters: weight and bias (norm running statistics excluded)."""
        return sum(_numel(self.store.shape(self.tensors[r])) for r in ("weight", "bias") if r in self.tensors)

    @property
    def dtype(self) -> str:
        return self.store.dtype(self.tensors["weight"])

    # -- tensor access ------------------------------------------------------
    def tensor(
        self,
        role: str = "weight",
        *,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Read one of the layer's tensors (canonical layout for the weight)."""
        key = self.tensors.get(role)
        if key is None:
            raise KeyError(f"layer {self.name!r} has no {role!r} tensor")
        t = self.store.get(key)
        if role == "weight":
            t = to_canonical(t, self.layout)
        if device is not None:
            t = t.to(device)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if check_finite and t.is_floating_point() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(
                f"{self.name}: {role} holds {bad} NaN/Inf value{'s' if bad != 1 else ''}"
            )
        return t

    def weight(self, **kw) -> torch.Tensor:
        return self.tensor("weight", **kw)

    def bias(self, **kw) -> torch.Tensor | None:
        return self.tensor("bias", **kw) if "bias" in self.tensors else None

    def split_fused(self, weight: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
        """The separate projections of a fused weight (q, k, v for ``fused == 3``)."""
        w = self.weight() if weight is None else weight
        if self.fused <= 1:
            return [(self.name, w)]
        labels = ("q", "k", "v") if self.fused == 3 else tuple(str(i) for i in range(self.fused))
        parts = torch.chunk(w, self.fused, dim=0)
        return [(f"{self.name}[{lab}]", p) for lab, p in zip(labels, parts)]

    def describe(self) -> dict:
        """A JSON-friendly summary (no tensor is read)."""
        return {
            "layer": self.name,
            "kind": str(self.kind),
            "shape": list(self.shape),
            "groups": self.groups,
            "depthwise": self.depthwise,
            "params": self.num_params,
            "dtype": self.dtype,
            "module_type": self.module_type,
            "role": self.role,
            "fused": self.fused,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "tensors": dict(self.tensors),
            "note": self.note,
        }


@dataclass
class SkippedTensor:
    """A tensor that belongs to no analysable layer, with the reason."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    reason: str


@dataclass
class Edge:
    """``src`` feeds ``dst`` through the operations listed in ``via``."""

    src: str
    dst: str
    via: tuple[str, ...] = ()


# Kinds of :class:`OpNode`.
OP_INPUT, OP_OUTPUT, OP_LAYER = "input", "output", "layer"
OP_CONCAT, OP_ADD, OP_POOL, OP_FLATTEN, OP_OTHER = "concat", "add", "pool", "flatten", "other"


@dataclass
class OpNode:
    """One operation of the data flow, in topological order.

    ``op`` is the kind: ``input``, ``output``, ``layer`` (computes one of the
    model's weight layers, named in ``layer``), ``concat``, ``add`` (of two
    tensors), ``pool``, ``flatten`` or ``other`` (activations, arithmetic with a
    constant, anything else). ``inputs`` are the ids of the nodes whose outputs it
    reads, in argument order (for a concatenation, the order of the joined
    tensors). An ``other`` node may still name a layer whose weights it uses
    without being a plain weight layer (a ``MultiheadAttention`` call, a transposed
    convolution, an embedding lookup): layer-to-layer edges end there, channel
    walks do not. ``label`` is the normalised operation recorded on edges
    (``global_avg_pool``, ``add``, ``flatten`` ..., ``""`` for a no-op).
    ``keeps_channels`` says dim 1 of the output is dim 1 of the input, channel for
    channel (false for reshapes, matrix products, splits ...). ``channels`` and
    ``rank`` describe the output when known; a concatenation records its ``axis``
    and, when every input's channel count is known, the ``offsets`` at which each
    input starts in the joined tensor.
    """

    id: int
    op: str
    inputs: list[int] = field(default_factory=list)
    layer: str | None = None
    label: str = ""
    keeps_channels: bool = True
    channels: int | None = None
    rank: int | None = None
    axis: int | None = None
    offsets: list[int] | None = None


@dataclass
class Graph:
    """What a loader learnt of the data flow.

    ``nodes`` is the data flow between operations (see :class:`OpNode`), when the
    loader recorded it; ``edges`` are the layer-to-layer edges with the operations
    on each path, derived from ``nodes`` when not given.
    """

    edges: list[Edge] = field(default_factory=list)
    source: str = ""  # "torch.fx", "onnx"
    nodes: list[OpNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes and not self.edges:
            self.edges = layer_edges(self.nodes)

    @property
    def has_flow(self) -> bool:
        return bool(self.nodes)

    def node(self, nid: int) -> OpNode:
        return self.nodes[nid]

    def users(self) -> dict[int, list[int]]:
        """For every node id, the ids of the nodes that read it (in node order)."""
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                if i in out:
                    out[i].append(n.id)
        return out

    def layer_nodes(self, name: str) -> list[OpNode]:
        return [n for n in self.nodes if n.op == OP_LAYER and n.layer == name]

    def successors(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.src == name]

    def predecessors(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == name]


def layer_edges(nodes: Sequence[OpNode]) -> list[Edge]:
    """Layer-to-layer edges of a data flow: from every node that names a layer,
    walk back through its inputs to the nearest nodes naming layers, recording
    the ``label`` of each operation passed (the shortest path wins)."""
    by_id = {n.id: n for n in nodes}
    edges: dict[tuple[str, str], tuple[str, ...]] = {}
    for n in nodes:
        if n.layer is None:
            continue
        stack = [(by_id[i], ()) for i in dict.fromkeys(n.inputs) if i in by_id]
        seen: set = set()
        while stack:
            cur, via = stack.pop()
            if cur.layer is not None:
                key = (cur.layer, n.layer)
                path = tuple(reversed(via))
                if key not in edges or len(path) < len(edges[key]):
                    edges[key] = path
                continue
            if (cur.id, via) in seen or len(via) > 64:
                continue
            seen.add((cur.id, via))
            nxt = via + ((cur.label,) if cur.label else ())
            for i in dict.fromkeys(cur.inputs):
                if i in by_id:
                    stack.append((by_id[i], nxt))
    return [Edge(s, d, v) for (s, d), v in edges.items()]


def fill_channels(nodes: Sequence[OpNode], layers: dict[str, "Layer"]) -> None:
    """Fill in the ``channels`` a loader could not measure (in node order): a weight
    layer's output features, the sum over a channel concatenation, else the first
    input's; then record every channel concatenation's ``offsets``."""
    by_id = {n.id: n for n in nodes}
    for n in nodes:
        if n.channels is None:
            lay = layers.get(n.layer) if n.op == OP_LAYER and n.layer is not None else None
            if n.op == OP_LAYER and lay is not None and lay.kind != LayerKind.NORM:
                n.channels = lay.out_features
            elif n.op == OP_CONCAT:
                cs = [by_id[i].channels for i in n.inputs]
                n.channels = sum(cs) if cs and all(c is not None for c in cs) and n.axis in (1, None) else None
            elif n.inputs:
                n.channels = by_id[n.inputs[0]].channels
        if n.op == OP_CONCAT and n.axis == 1:
            cs = [by_id[i].channels for i in n.inputs]
            if cs and all(c is not None for c in cs):
                starts, at = [], 0
                for c in cs:
                    starts.append(at)
                    at += c
                n.offsets = starts


@dataclass
class Model:
    name: str
    source: str
    format: str
    layers: list[Layer]
    skipped: list[SkippedTensor] = field(default_factory=list)
    graph: Graph | None = None
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    # the live torch.nn.Module when loaded from one (for tracing or hooks), else None
    module: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {layer.name: layer for layer in self.layers}
        if self.graph is not None:
            for layer in self.layers:
                layer.inputs = [e.src for e in self.graph.predecessors(layer.name)]
                layer.outputs = [e.dst for e in self.graph.successors(layer.name)]

    # -- container protocol -------------------------------------------------
    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> Layer:
        if isinstance(key, int):
            return self.layers[key]
        try:
            return self._by_name[key]
        except KeyError:
            raise KeyError(f"no layer named {key!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    # -- queries ------------------------------------------------------------
    def select(
        self, kinds: Iterable[LayerKind | str] | None = None, names: Iterable[str] | None = None
    ) -> list[Layer]:
        """Layers of the given kinds and/or names, in model order."""
        kinds_set = {LayerKind(k) for k in kinds} if kinds is not None else None
        wanted = set(names) if names is not None else None
        if wanted is not None:
            missing = wanted - set(self._by_name)
            if missing:
                raise UserError(f"no layer named {', '.join(sorted(missing))} in {self.name}")
        return [
            layer
            for layer in self.layers
            if (kinds_set is None or layer.kind in kinds_set)
            and (wanted is None or layer.name in wanted)
        ]

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    @property
    def has_graph(self) -> bool:
        return self.graph is not None

    def successors(self, name: str, skip: Iterable[LayerKind] = (LayerKind.NORM,)) -> list[Edge]:
        """Edges from layer ``name`` to the layers it feeds, passing through layers
        of the ``skip`` kinds (norms by default; recorded as ``norm`` in ``via``)."""
        return self._walk(name, set(skip), forward=True)

    def predecessors(self, name: str, skip: Iterable[LayerKind] = (LayerKind.NORM,)) -> list[Edge]:
        """Edges into layer ``name`` from the layers that feed it (see :meth:`successors`)."""
        return self._walk(name, set(skip), forward=False)

    def _walk(self, name: str, skip: set, forward: bool) -> list[Edge]:
        if self.graph is None:
            return []
        step = self.graph.successors if forward else self.graph.predecessors
        out: dict[str, tuple[str, ...]] = {}
        stack = [(e, ()) for e in step(name)]
        visited: set[str] = set()
        while stack:
            e, acc = stack.pop()
            other = e.dst if forward else e.src
            via = acc + e.via if forward else e.via + acc
            if other in self._by_name and self._by_name[other].kind in skip and other not in visited:
                visited.add(other)
                for e2 in step(other):
                    stack.append((e2, via + ("norm",) if forward else ("norm",) + via))
                continue
            if other not in out or len(via) < len(out[other]):
                out[other] = via
        return [Edge(name, o, v) if forward else Edge(o, name, v) for o, v in out.items()]

    def global_pool_after(self, name: str) -> bool | None:
        """Whether global pooling sits between layer ``name`` and the layers it feeds.

        ``None`` when the graph is unknown.
        """
        if self.graph is None:
            return None
        return any(GLOBAL_POOL_OPS & set(e.via) for e in self.successors(name))

    def pooling_after(self, name: str) -> list[str]:
        """Pooling operations between layer ``name`` and the layers it feeds."""
        ops: list[str] = []
        for e in self.successors(name):
            ops.extend(op for op in e.via if op in POOL_OPS and op not in ops)
        return ops

    def last_conv_before_global_pool(self) -> Layer | None:
        """The conv layer whose output is globally pooled, the last one if several."""
        found = [l for l in self.layers if l.is_conv and self.global_pool_after(l.name)]
        return found[-1] if found else None

    def overview(self) -> dict:
        kinds: dict[str, int] = {}
        for layer in self.layers:
            kinds[str(layer.kind)] = kinds.get(str(layer.kind), 0) + 1
        return {
            "name": self.name,
            "source": self.source,
            "format": self.format,
            "layers": len(self.layers),
            "params": self.num_params,
            "kinds": kinds,
            "graph": self.graph.source if self.graph else None,
            "skipped": len(self.skipped),
            "notes": list(self.notes),
        }

    def to_frame(self):
        import pandas as pd

        rows = []
        for layer in self.layers:
            d = layer.describe()
            d["shape"] = "x".join(map(str, d["shape"]))
            d["inputs"] = ",".join(d["inputs"])
            d["outputs"] = ",".join(d["outputs"])
            d.pop("tensors")
            rows.append(d)
        return pd.DataFrame(rows)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
