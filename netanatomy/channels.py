"""Channel spaces: which layers' output channels are tied together.

Channel ``c`` of a conv / linear layer's output is the same channel after a norm,
an activation, pooling or dropout; when two tensors are added (a residual
connection), channel ``c`` of one operand and channel ``c`` of the other become
one channel of the sum. A *channel space* is such a set of tied channels: the
layers that write it (``writers``: every block that adds into a residual stream
writes the stream's space), the norms applied in it and the layers that read it.
Reordering the channels of a space consistently (in every writer's rows, every
norm's parameters, every reader's columns) leaves the network's function
unchanged; a space that reaches the network's input or output or passes through
an operation that mixes or moves channels (concatenation, reshape, attention,
grouped convolution) is ``fixed``.

:func:`channel_spaces` derives the spaces from a model's data-flow graph
(:class:`netanatomy.model.Graph` nodes). :class:`ChannelUnion` is the union-find
both this and permutation alignment's finer walk of an fx trace build the spaces
with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import (
    CONV_KINDS,
    OP_ADD,
    OP_FLATTEN,
    OP_INPUT,
    OP_LAYER,
    OP_OTHER,
    OP_OUTPUT,
    OP_POOL,
    POOL_OPS,
    LayerKind,
    Model,
)

_WRITER_KINDS = CONV_KINDS | {LayerKind.LINEAR}

# operations (graph labels, as torch.fx and ONNX loaders record them) that act on
# each channel alone, so a channel stays itself through them
PASS_THROUGH = frozenset(
    {
        "", "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "leakyrelu", "leaky_relu", "elu",
        "selu", "celu", "hardswish", "hardsigmoid", "hardtanh", "mish", "softplus", "clip",
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alphadropout", "alpha_dropout", "identity",
        "neg", "abs", "detach", "float", "to", "type_as", "contiguous", "clone",
        # with one tensor operand: arithmetic with a constant
        "add", "sub", "mul", "iadd", "isub", "imul", "add_", "sub_", "mul_", "truediv", "div", "floordiv", "pow",
    }
) | POOL_OPS


class ChannelUnion:
    """Union-find over channel spaces, each with a size (None: not known yet), a
    label (the layer that opened it) and whether it is fixed. Merging two spaces
    of different known sizes fixes the result (not a plain channel space)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int | None] = []
        self.fixed: list[bool] = []
        self.label: list[str] = []

    def new(self, size: int | None, label: str, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        self.label.append(label)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        sa, sb = self.size[ra], self.size[rb]
        if sa is not None and sb is not None and sa != sb:
            self.fixed[ra] = True  # operands of different width: not a plain channel space
        self.size[ra] = sa if sa is not None else sb
        self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        return ra

    def fix(self, i: int) -> None:
        self.fixed[self.find(i)] = True


@dataclass
class ChannelSpace:
    """One set of tied channels (see the module docstring)."""

    size: int | None
    writers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    fixed: bool = False

    def to_dict(self) -> dict:
        return {
            "size": self.size,
            "writers": list(self.writers),
            "norms": list(self.norms),
            "readers": list(self.readers),
            "fixed": self.fixed,
        }


def channel_spaces(model: Model) -> list[ChannelSpace] | None:
    """The channel spaces opened by the conv / linear layers of ``model``, in the
    order of their first writer; None when the model has no data-flow graph.

    Walks the graph's nodes once: a conv / linear layer opens a space (a depthwise
    convolution keeps its input's); a norm whose width matches, activations,
    dropout, pooling and arithmetic with a constant (:data:`PASS_THROUGH`) pass
    their input's space on; an
    ``add`` of two tensors merges its operands' spaces; a flatten keeps the
    space for a linear layer that reads each channel's positions as a block;
    anything else (a
    concatenation, a reshape, a grouped convolution, the network's input and
    output, a layer used by a composite operation) fixes what it reads.
    """
    graph = model.graph
    if graph is None or not graph.nodes:
        return None
    uf = ChannelUnion()
    space: dict[int, int] = {}  # node id -> space id
    flat: set[int] = set()  # nodes carrying a channel map flattened to (N, C*H*W)
    writes: list[tuple[int, str]] = []
    norms: list[tuple[int, str]] = []
    reads: list[tuple[int, str]] = []

    def opaque(node) -> int:
        for i in node.inputs:
            if i in space:
                uf.fix(space[i])
        return uf.new(None, "", fixed=True)

    for n in graph.nodes:
        ins = [space[i] for i in n.inputs if i in space]
        if n.op == OP_INPUT:
            space[n.id] = uf.new(None, "input", fixed=True)
        elif n.op == OP_OUTPUT:
            for s in ins:
                uf.fix(s)
        elif n.op == OP_LAYER and n.layer in model and len(ins) == 1:
            layer = model[n.layer]
            x = ins[0]
            if layer.kind == LayerKind.NORM:
                if uf.size[uf.find(x)] in (None, layer.shape[0] if layer.shape else None):
                    norms.append((x, layer.name))
                    space[n.id] = x
                else:
                    space[n.id] = opaque(n)
            elif layer.kind in _WRITER_KINDS and layer.fused == 1:
                if layer.is_conv and layer.groups > 1:
                    if layer.depthwise and layer.out_features == layer.in_features:
                        norms.append((x, layer.name))  # channel i reads input channel i only
                        space[n.id] = x
                    else:
                        space[n.id] = opaque(n)
                    continue
                r = uf.find(x)
                if uf.size[r] is None and not uf.fixed[r]:
                    uf.size[r] = layer.in_features
                if uf.size[r] == layer.in_features:
                    reads.append((x, layer.name))
                elif not layer.is_conv and n.inputs[0] in flat and uf.size[r] and layer.in_features % uf.size[r] == 0:
                    reads.append((x, layer.name))  # each channel's positions move as a block
                else:
                    uf.fix(x)  # reads a flattened map or a mismatched width
                out = uf.new(layer.out_features, layer.name)
                writes.append((out, layer.name))
                space[n.id] = out
            else:
                space[n.id] = opaque(n)
        elif n.op == OP_ADD and len(ins) == 2:
            space[n.id] = uf.find(uf.union(ins[0], ins[1]))
        elif n.op in (OP_OTHER, OP_POOL) and n.layer is None and n.label in PASS_THROUGH and len(ins) == 1:
            space[n.id] = ins[0]
            if n.inputs[0] in flat:
                flat.add(n.id)
        elif n.op == OP_FLATTEN and n.inputs and n.inputs[0] in space:
            space[n.id] = space[n.inputs[0]]  # further inputs are target sizes
            flat.add(n.id)
        else:
            space[n.id] = opaque(n)

    out: dict[int, ChannelSpace] = {}
    for sid, name in writes:
        r = uf.find(sid)
        cs = out.setdefault(r, ChannelSpace(uf.size[r]))
        cs.writers.append(name)
    for sid, name in norms:
        r = uf.find(sid)
        if r in out and name not in out[r].norms:
            out[r].norms.append(name)
    for sid, name in reads:
        r = uf.find(sid)
        if r in out and name not in out[r].readers:
            out[r].readers.append(name)
    for r, cs in out.items():
        cs.fixed = bool(uf.fixed[r])
    return list(out.values())


def space_of(spaces: list[ChannelSpace] | None) -> dict[str, ChannelSpace]:
    """Writer layer name -> its channel space."""
    return {w: cs for cs in spaces or [] for w in cs.writers}
