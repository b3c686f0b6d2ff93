"""A permutation spec from weights alone, for plain sequential networks.

Aligning two checkpoints needs to know which tensor axes move together. A live
module says so through its graph (:func:`~netanatomy.synthesis.permute.spec_from_module`);
a state dict does not record the graph, and a command-line tool must never
execute code from a file to learn it. :func:`spec_from_state` therefore infers a
*sequential chain* from what the file does say, and refuses anything it cannot
tell apart from a chain:

* the conv / linear / norm layers are the ones :func:`netanatomy.load` finds
  (same grouping of keys by module prefix and the same kind guesses);
* the conv / linear layers are taken in the file's key order (insertion order
  for PyTorch files; natural name order for safetensors, whose writers sort
  keys) and must link by shape: each layer's output width is the next layer's
  input width; a conv followed by a linear layer whose input is a multiple
  ``k`` of the conv's channels is a flatten of a ``C x H x W`` map (blocks of
  ``k`` inputs per channel). When the key order does not link, an order is
  searched for by shapes alone and used only if it is the only one;
* every norm vector rides with the conv / linear layer it follows: in PyTorch
  files and state dicts (module order) the weight layer right before it; in
  safetensors (sorted keys) the layer with the same parent and number in its
  name (``bn2`` with ``conv2``), else the one right before it; else the only
  layer of its width. A norm before every layer normalises the input and stays
  fixed. Refused as ambiguous: a norm whose position and name disagree
  (``conv1, conv2, bn1, bn2`` declared in that order), and two norms that would
  follow the same layer;
* the last layer's outputs and the first layer's inputs are fixed.

Refused with a one-line :class:`~netanatomy.errors.UserError` naming the
unsupported part: residual connections (keys named ``downsample``,
``shortcut``, ``skip``, ``residual``), attention and embedding layers, grouped
or depthwise convs, a linear layer feeding a conv, norms after a conv without
running statistics (possibly a GroupNorm, whose groups a state dict does not
record), tensors that belong to no layer, and layers that do not link into one
chain. Numbered blocks that hold more than one conv / linear layer
(``layer1.0.conv1``, ``layer1.0.conv2``: the shape of a residual block) are
refused too. A residual network that escapes all of these (no such names, no
such blocks, widths that agree) looks like a chain to this inference: pass the
module (``align(a, b, spec=module)``) for such networks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..io import CheckpointStore, build_layers, open_store
from ..model import CONV_KINDS, Layer, LayerKind
from .spec import PermutationSpec

_RESIDUAL_RE = re.compile(r"(^|[._/])(downsample|shortcut|skip|residual|res_?conv|identity)([._/\d]|$)", re.I)
_NAME_RE = re.compile(r"^(.*?)([A-Za-z_]*)(\d*)$")


class _SourceStore:
    """A :class:`~netanatomy.model.TensorStore` over a :class:`~netanatomy.io.CheckpointStore`."""

    def __init__(self, src: CheckpointStore):
        self.src = src

    def keys(self) -> list[str]:
        return self.src.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.src.shape(key))

    def dtype(self, key: str) -> str:
        return str(self.src.dtype(key)).removeprefix("torch.")

    def get(self, key: str) -> torch.Tensor:
        return self.src.get(key)


@dataclass
class ChainLayer:
    name: str
    kind: str
    in_width: int
    out_width: int
    inner: int = 1  # inputs per unit of the previous layer (flatten of a conv map)
    norms: list[str] = field(default_factory=list)


@dataclass
class Chain:
    """What :func:`infer_chain` found: layers in order and how the order was found."""

    layers: list[ChainLayer]
    order: str  # "key order" or "shapes"

    def describe(self) -> str:
        parts = []
        for i, l in enumerate(self.layers):
            link = "" if i == 0 else (f" -[flatten x{l.inner}]-> " if l.inner > 1 else " -> ")
            norms = f" (+{', '.join(l.norms)})" if l.norms else ""
            parts.append(f"{link}{l.name} {l.kind} {l.in_width}->{l.out_width}{norms}")
        return "".join(parts)


def _unsupported(what: str) -> UserError:
    return UserError(
        f"cannot align without the architecture: {what}; "
        "supported from a state dict: plain chains of conv/linear layers with norms"
    )


def _width_in(layer: Layer) -> int:
    return layer.shape[1] if len(layer.shape) > 1 else 1


def _link(p: Layer, q: Layer) -> int:
    """``inner`` when ``q`` can read ``p``'s output, else raise ``ValueError(reason)``."""
    n_out, n_in = p.shape[0], _width_in(q)
    if q.is_conv:
        if not p.is_conv:
            raise ValueError(f"linear layer {p.name!r} feeds conv {q.name!r} (a reshape)")
        if q.kind != p.kind:
            raise ValueError(f"{p.kind} {p.name!r} feeds {q.kind} {q.name!r}")
        if n_in == n_out:
            return 1
        if n_in < n_out and n_out % n_in == 0:
            raise ValueError(f"conv {q.name!r} reads {n_in} of {n_out} channels per filter (grouped or depthwise conv)")
        raise ValueError(f"{q.name!r} takes {n_in} inputs but {p.name!r} gives {n_out}")
    if n_in == n_out:
        return 1
    if p.is_conv and n_in % n_out == 0:
        return n_in // n_out
    raise ValueError(f"{q.name!r} takes {n_in} inputs but {p.name!r} gives {n_out}")


def _chain_ok(order: list[Layer]) -> tuple[list[int] | None, str | None]:
    inner = [1]
    for p, q in zip(order, order[1:]):
        try:
            inner.append(_link(p, q))
        except ValueError as exc:
            return None, str(exc)
    return inner, None


def _unique_order_by_shapes(layers: list[Layer], budget: int = 200_000) -> list[Layer] | None:
    """The only ordering of ``layers`` that links by shape, or None (none, several, or too many to search)."""
    n = len(layers)
    ok = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j:
                try:
                    _link(layers[i], layers[j])
                    ok[i][j] = True
                except ValueError:
                    pass
    found: list[list[int]] = []
    steps = 0

    def dfs(path: list[int], used: set[int]) -> bool:
        nonlocal steps
        steps += 1
        if steps > budget or len(found) > 1:
            return False
        if len(path) == n:
            found.append(list(path))
            return len(found) <= 1
        for j in range(n):
            if j not in used and ok[path[-1]][j]:
                path.append(j)
                used.add(j)
                dfs(path, used)
                path.pop()
                used.discard(j)
        return True

    for s in range(n):
        dfs([s], {s})
    if steps > budget or len(found) != 1:
        return None
    return [layers[i] for i in found[0]]


def _name_parts(name: str) -> tuple[str, str]:
    head, _, last = name.rpartition(".")
    m = _NAME_RE.match(last)
    return head, (m.group(3) if m else "")


def infer_chain(src: CheckpointStore) -> tuple[Chain, PermutationSpec]:
    """Infer a sequential chain from a checkpoint's keys and shapes (see module docs)."""
    for key in src.keys():
        if _RESIDUAL_RE.search(key):
            raise _unsupported(f"residual connections ({key!r}); pass the module to the Python API: align(a, b, spec=module)")
    # PyTorch files and in-memory state dicts keep the module order; safetensors
    # writers sort keys, so there names say more than positions
    ordered = not (src.name.endswith((".safetensors", ".index.json")) or os.path.isdir(src.name))
    layers, skipped = build_layers(_SourceStore(src), layout="torch")
    for s in skipped:
        if len(s.shape) and int(torch.tensor(s.shape).prod()) > 1:
            raise _unsupported(f"tensor {s.key!r} {list(s.shape)} belongs to no conv/linear/norm layer ({s.reason})")
    weights: list[Layer] = []
    norms: list[tuple[int, Layer]] = []  # (number of weight layers before it in key order, layer)
    for layer in layers:
        if layer.kind in (LayerKind.ATTENTION, LayerKind.EMBEDDING) or layer.fused > 1:
            raise _unsupported(f"{layer.kind} layer {layer.name!r}")
        if layer.kind == LayerKind.NORM:
            norms.append((len(weights), layer))
        elif layer.kind == LayerKind.LINEAR or layer.kind in CONV_KINDS:
            weights.append(layer)
        else:
            raise _unsupported(f"layer {layer.name!r} of unknown kind, weight shape {list(layer.shape)}")
    blocks: dict[str, list[str]] = {}
    for l in weights:
        parts = l.name.split(".")
        numbered = [i for i, part in enumerate(parts[:-1]) if part.isdigit()]
        if numbered:
            blocks.setdefault(".".join(parts[: numbered[-1] + 1]), []).append(l.name)
    for block, names in blocks.items():
        if len(names) > 1:
            raise _unsupported(
                f"block {block!r} holds {len(names)} conv/linear layers ({', '.join(names[:3])}), "
                "possibly a residual block; pass the module to the Python API: align(a, b, spec=module)"
            )
    if len(weights) < 2:
        raise _unsupported(f"{len(weights)} conv/linear layer(s), so no hidden units to permute")

    order, how = weights, "key order"
    inner, why = _chain_ok(order)
    if inner is None:
        alt = _unique_order_by_shapes(weights) if len(weights) <= 64 else None
        if alt is None:
            raise _unsupported(f"the layers do not form one sequential chain ({why})")
        order, how = alt, "shapes"
        inner, _ = _chain_ok(order)

    # attach every norm to the weight layer whose outputs it normalises
    attach: dict[str, list[Layer]] = {}
    for before, nl in norms:
        n = nl.shape[0]
        cands = [l for l in order if l.shape[0] == n]
        head, num = _name_parts(nl.name)
        by_name = [l for l in cands if _name_parts(l.name) == (head, num)]
        prev = weights[before - 1] if before > 0 and weights[before - 1].shape[0] == n else None
        feeds_input = n == _width_in(order[0])
        if ordered and how == "key order":
            # module order: a norm follows the layer whose outputs it normalises
            if before == 0:
                if not feeds_input:
                    raise _unsupported(f"norm {nl.name!r} (width {n}) comes before every conv/linear layer")
                continue  # normalises the network's input: a fixed space
            if prev is not None and by_name and prev not in by_name:
                # conv1, conv2, bn1, bn2: declaration order is not the order of the forward pass
                raise _unsupported(
                    f"cannot tell which layer norm {nl.name!r} follows: it comes after {prev.name!r} "
                    f"but its name pairs it with {by_name[0].name!r}"
                )
            target = prev or (by_name[0] if len(by_name) == 1 else cands[0] if len(cands) == 1 else None)
        elif len(by_name) == 1:
            target = by_name[0]
        elif prev is not None and how == "key order":
            target = prev
        elif len(cands) == 1 and not feeds_input:
            target = cands[0]
        elif not cands and feeds_input:
            continue  # normalises the network's input: a fixed space
        else:
            target = None
        if target is None:
            raise _unsupported(f"cannot tell which layer norm {nl.name!r} (width {n}) follows")
        if target.is_conv and "running_mean" not in nl.tensors and n > 1:
            raise _unsupported(
                f"norm {nl.name!r} after conv {target.name!r} has no running statistics "
                "(a GroupNorm's groups are not in the state dict)"
            )
        if target.name in attach:
            raise _unsupported(
                f"norms {attach[target.name][0].name!r} and {nl.name!r} would both follow {target.name!r}; "
                "cannot tell the order of the forward pass"
            )
        attach.setdefault(target.name, []).append(nl)

    sizes: dict[str, int] = {}
    axes: dict[str, list[tuple[str, int, int]]] = {}
    cost: set[str] = set()
    chain_layers = []
    for i, l in enumerate(order):
        chain_layers.append(ChainLayer(l.name, str(l.kind), _width_in(l), l.shape[0], inner[i],
                                       [nl.name for nl in attach.get(l.name, [])]))
        if i == len(order) - 1:
            continue  # the network's outputs stay fixed
        p = l.name
        sizes[p] = l.shape[0]
        items = [(l.tensors["weight"], 0, 1)]
        cost.add(l.tensors["weight"])
        if "bias" in l.tensors:
            items.append((l.tensors["bias"], 0, 1))
            cost.add(l.tensors["bias"])
        for nl in attach.get(l.name, []):
            for role, key in nl.tensors.items():
                if role == "num_batches_tracked" or len(src.shape(key)) == 0:
                    continue
                items.append((key, 0, 1))
                if role in ("weight", "bias"):
                    cost.add(key)
        nxt = order[i + 1]
        items.append((nxt.tensors["weight"], 1, inner[i + 1]))
        axes[p] = items
    return Chain(chain_layers, how), PermutationSpec(sizes, axes, cost, [order[-1].name])


def spec_from_state(state, name: str = "model") -> PermutationSpec:
    """The permutation spec of a plain chain, from a path, state dict or module's weights."""
    return infer_chain(open_store(state, name))[1]
