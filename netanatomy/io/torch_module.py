"""An in-memory ``torch.nn.Module``.

Kinds come from the module types; the data flow between layers comes from a
``torch.fx`` trace where the model traces (a model that does not is still
loaded, without a graph, and says so).
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from ..model import LAYOUT_TRANSPOSED, DictStore, Edge, Graph, LayerKind, Model
from ._infer import Hint, build_layers

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def _hint_for(name: str, mod: nn.Module) -> Hint | None:
    t = type(mod).__name__
    if isinstance(mod, nn.Conv1d):
        return Hint(LayerKind.CONV1D, t, groups=mod.groups)
    if isinstance(mod, nn.Conv2d):
        return Hint(LayerKind.CONV2D, t, groups=mod.groups)
    if isinstance(mod, nn.Conv3d):
        return Hint(LayerKind.CONV3D, t, groups=mod.groups)
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return Hint(LayerKind.OTHER, t, note="transposed convolution: listed, not analysed")
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return Hint(LayerKind.EMBEDDING, t)
    if isinstance(mod, _NORM_TYPES) or "Norm" in t:
        return Hint(LayerKind.NORM, t)
    if t == "Conv1D" and hasattr(mod, "nf"):  # Hugging Face GPT-2 style: weight is (in, out)
        return _linear_hint(name, t, LAYOUT_TRANSPOSED)
    if isinstance(mod, nn.Linear):
        return _linear_hint(name, t)
    return None


def _linear_hint(name: str, t: str, layout: str = "torch") -> Hint:
    from ._infer import _guess

    guess = _guess(name, "weight", (2, 2), {}, "torch", False, False)
    if guess is not None and guess.kind == LayerKind.ATTENTION:
        return Hint(LayerKind.ATTENTION, t, layout=layout, fused=guess.fused, role=guess.role)
    return Hint(LayerKind.LINEAR, t, layout=layout)


def load(module: nn.Module, *, name: str | None = None, trace: bool = True) -> Model:
    hints: dict[str, Hint] = {}
    for mname, mod in module.named_modules():
        h = _hint_for(mname, mod)
        if h is not None and mname not in hints:
            hints[mname] = h
        if isinstance(mod, nn.MultiheadAttention) and getattr(mod, "in_proj_weight", None) is not None:
            hints[f"{mname}.in_proj" if mname else "in_proj"] = Hint(
                LayerKind.ATTENTION, "MultiheadAttention", fused=3, role="qkv"
            )
        if isinstance(mod, nn.MultiheadAttention):
            hints[f"{mname}.out_proj" if mname else "out_proj"] = Hint(
                LayerKind.ATTENTION, "MultiheadAttention", role="o"
            )
    tensors = {k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
    store = DictStore(tensors)
    layers, skipped = build_layers(store, hints=hints, layout="torch")
    notes: list[str] = []
    graph = None
    if trace:
        graph, why = trace_graph(module, {layer.name for layer in layers})
        if graph is None:
            notes.append(f"no graph: torch.fx could not trace the model ({why})")
    return Model(
        name=name or type(module).__name__,
        source=f"<in-memory {type(module).__name__}>",
        format="torch.nn.Module",
        layers=layers,
        skipped=skipped,
        graph=graph,
        notes=notes,
        module=module,
    )


# ---------------------------------------------------------------------------
# graph from torch.fx


def trace_graph(module: nn.Module, layer_names: set[str]) -> tuple[Graph | None, str]:
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        # keep layer modules as leaves so each appears as one call_module node
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in layer_names or super().is_leaf_module(m, qualname)

    try:
        g = _Tracer().trace(module)
    except Exception as exc:  # fx raises many kinds; a model that does not trace has no graph
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    modules = dict(module.named_modules())
    layer_node = {}
    for node in g.nodes:
        if node.op == "call_module" and node.target in layer_names:
            layer_node[node] = node.target
        elif node.op == "call_module" and f"{node.target}.in_proj" in layer_names:
            layer_node[node] = f"{node.target}.in_proj"  # MultiheadAttention

    edges: dict[tuple[str, str], tuple[str, ...]] = {}
    for node, dst in layer_node.items():
        for src, via in _sources(node, layer_node, modules):
            key = (src, dst)
            if key not in edges or len(via) < len(edges[key]):
                edges[key] = via
    return Graph(edges=[Edge(s, d, v) for (s, d), v in edges.items()], source="torch.fx"), ""


def _sources(node, layer_node, modules):
    """Walk back from ``node``'s inputs to the nearest layer nodes, recording ops."""
    out = []
    stack = [(arg, ()) for arg in list(node.all_input_nodes)]
    seen = set()
    while stack:
        cur, via = stack.pop()
        if cur in layer_node:
            out.append((layer_node[cur], tuple(reversed(via))))
            continue
        if (cur, via) in seen or len(via) > 64:
            continue
        seen.add((cur, via))
        label = _op_label(cur, modules)
        nxt = via + ((label,) if label else ())
        for arg in cur.all_input_nodes:
            stack.append((arg, nxt))
    return out


_SPATIAL_ALL = ({2, 3}, {-1, -2}, {2, -1}, {-2, 3})


def _reduce_label(dims, kind: str) -> str:
    if dims is None:
        return f"global_{kind}_pool"
    if isinstance(dims, int):
        dims = (dims,)
    d = set(int(x) for x in dims)
    if d in _SPATIAL_ALL:
        return f"global_{kind}_pool"
    if d in ({3}, {-1}):
        return "avg_pool_x" if kind == "avg" else f"{kind}_pool"
    if d in ({2}, {-2}):
        return "avg_pool_y" if kind == "avg" else f"{kind}_pool"
    return f"reduce_{kind}"


def _is_global_size(size) -> bool:
    if isinstance(size, int):
        return size == 1
    if isinstance(size, (tuple, list)):
        return all(s == 1 for s in size)
    return False


def _op_label(node, modules) -> str:
    if node.op == "placeholder" or node.op == "get_attr" or node.op == "output":
        return ""
    if node.op == "call_module":
        mod = modules.get(node.target)
        t = type(mod).__name__
        if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return "global_avg_pool" if _is_global_size(mod.output_size) else "adaptive_pool"
        if isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return "global_max_pool" if _is_global_size(mod.output_size) else "adaptive_pool"
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return "avg_pool"
        if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return "max_pool"
        if isinstance(mod, (nn.LPPool1d, nn.LPPool2d)):
            return "lp_pool"
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return "flatten"
        if isinstance(mod, nn.Identity):
            return ""
        return t.lower()
    target = node.target
    name = getattr(target, "__name__", str(target))
    if node.op == "call_function" and target in (operator.add, torch.add, operator.iadd):
        return "add"
    if name in ("cat", "concat", "concatenate", "stack"):
        return "concat"
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d"):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return "global_avg_pool" if _is_global_size(size) else "adaptive_pool"
    if name in ("adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return "global_max_pool" if _is_global_size(size) else "adaptive_pool"
    if name in ("avg_pool1d", "avg_pool2d", "avg_pool3d"):
        return "avg_pool"
    if name in ("max_pool1d", "max_pool2d", "max_pool3d"):
        return "max_pool"
    if name in ("lp_pool1d", "lp_pool2d"):
        return "lp_pool"
    if name in ("mean", "sum", "amax", "max", "nanmean"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        kind = "max" if name in ("amax", "max") else ("sum" if name == "sum" else "avg")
        return _reduce_label(dims, kind)
    if name in ("flatten", "view", "reshape", "squeeze", "unsqueeze"):
        return "flatten"
    if name in ("getitem", "size", "contiguous", "clone", "to", "float", "type_as"):
        return ""
    return name.lower()
