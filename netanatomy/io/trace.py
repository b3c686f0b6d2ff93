"""The one ``torch.fx`` tracer of the package.

:func:`trace` turns a live ``nn.Module`` into an fx graph, keeping the modules
named in ``leaves`` (the model's weight layers) as single ``call_module`` nodes;
:func:`propagate_shapes` runs fx shape propagation with a small dummy input so the
nodes carry their output shapes. The module loader (:mod:`netanatomy.io.torch_module`)
builds the model's data-flow :class:`~netanatomy.model.Graph` from the trace, and
permutation alignment walks the trace to find which axes move together.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from ..model import CONV_KINDS, LayerKind


class TraceError(Exception):
    """The module does not trace; ``reason`` is a one-line account of why."""

    def __init__(self, reason: str, exc: BaseException):
        super().__init__(reason)
        self.reason = reason
        self.exc = exc


class _Tracer(fx.Tracer):
    def __init__(self, leaves: frozenset[str]):
        super().__init__()
        self._leaves = leaves

    # keep layer modules as leaves so each appears as one call_module node
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self._leaves or super().is_leaf_module(m, qualname)


def trace(module: nn.Module, leaves: Iterable[str] = ()) -> fx.Graph:
    """The fx graph of ``module``, with the modules named in ``leaves`` kept whole
    (besides torch's own leaf modules). Raises :class:`TraceError` when fx fails."""
    try:
        return _Tracer(frozenset(leaves)).trace(module)
    except Exception as exc:  # fx raises many kinds; the caller decides what a failure means
        msg = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise TraceError(f"{type(exc).__name__}: {msg}", exc) from None


def propagate_shapes(module: nn.Module, graph: fx.Graph, first_kind: LayerKind | None, in_channels: int) -> bool:
    """Annotate ``graph``'s nodes with ``tensor_meta`` by running a dummy input of
    ``in_channels`` channels through it (input sizes 64, 32, 224, 16 are tried for
    a network whose first layer is a convolution), in eval mode, leaving every
    submodule's train / eval mode as it was. False when no guess fits or the
    network does not start with a convolution."""
    from torch.fx.passes.shape_prop import ShapeProp

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or first_kind not in CONV_KINDS:
        return False
    gm = fx.GraphModule(module, graph)
    nd = {LayerKind.CONV1D: 1, LayerKind.CONV2D: 2, LayerKind.CONV3D: 3}[first_kind]
    sizes = (64, 32, 224, 16) if nd < 3 else (16, 32)
    modes = [(m, m.training) for m in module.modules()]  # restored one by one afterwards
    gm.eval()
    try:
        for s in sizes:
            x = torch.zeros((1, in_channels) + (s,) * nd)
            try:
                with torch.no_grad():
                    ShapeProp(gm).propagate(x)
                return True
            except Exception:  # wrong guess of the input size: try the next
                continue
        return False
    finally:
        for m, mode in modes:
            m.training = mode
