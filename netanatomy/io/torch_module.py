"""An in-memory ``torch.nn.Module``.

Kinds come from the module types; the data flow between layers comes from a
``torch.fx`` trace where the model traces (a model that does not is still
loaded, without a graph, and says so).
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from ..model import (
    LAYOUT_TRANSPOSED,
    OP_ADD,
    OP_CONCAT,
    OP_FLATTEN,
    OP_INPUT,
    OP_LAYER,
    OP_OTHER,
    OP_OUTPUT,
    OP_POOL,
    POOL_OPS,
    DictStore,
    Graph,
    LayerKind,
    Model,
    OpNode,
    fill_channels,
)
from ._infer import Hint, build_layers
from .trace import TraceError, propagate_shapes, trace

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
        graph, why = trace_graph(module, layers)
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


def trace_graph(module: nn.Module, layers) -> tuple[Graph | None, str]:
    """The data-flow graph of ``module`` from an fx trace that keeps ``layers``
    (the model's layers, or their names) whole; ``(None, why)`` when it does not trace.

    Channel counts come from fx shape propagation with a dummy input when the
    graph joins paths (``concat`` / ``add``) and the network starts with a
    convolution, and are otherwise inferred from the layers.
    """
    layer_list = [l for l in layers if not isinstance(l, str)]
    names = {l if isinstance(l, str) else l.name for l in layers}
    try:
        g = trace(module, names)
    except TraceError as exc:
        return None, exc.reason
    modules = dict(module.named_modules())
    ids: dict = {}
    pending = []
    for node in g.nodes:
        ids[node] = len(ids)
        pending.append(node)
    joins = False
    specs = []
    for node in pending:
        spec = _node_spec(node, ids, names, modules)
        joins = joins or spec["op"] in (OP_CONCAT, OP_ADD)
        specs.append((node, spec))
    shapes_ok = False
    if joins and layer_list:
        first = next((l for l in layer_list if l.kind not in (LayerKind.NORM, LayerKind.OTHER)), None)
        if first is not None:
            shapes_ok = propagate_shapes(module, g, first.kind, first.in_features)
    nodes: list[OpNode] = []
    for node, spec in specs:
        meta = node.meta.get("tensor_meta") if shapes_ok else None
        channels = rank = None
        if meta is not None and hasattr(meta, "shape"):
            rank = len(meta.shape)
            channels = int(meta.shape[1]) if rank >= 2 else None
        axis = spec["axis"]
        if spec["op"] == OP_CONCAT and axis is not None and rank is not None and axis < 0:
            axis = axis + rank
        nodes.append(
            OpNode(
                id=ids[node],
                op=spec["op"],
                inputs=spec["inputs"],
                layer=spec["layer"],
                label=_op_label(node, modules),
                keeps_channels=spec["keeps"],
                channels=channels,
                rank=rank,
                axis=axis,
            )
        )
    fill_channels(nodes, {l.name: l for l in layer_list})
    return Graph(source="torch.fx", nodes=nodes), ""


def _node_spec(node, ids, names, modules) -> dict:
    """The kind, ordered inputs and layer of one fx node."""
    ins = [ids[a] for a in list(node.all_input_nodes) if a in ids]
    op, layer, axis, keeps = OP_OTHER, None, None, True
    if node.op == "placeholder":
        return {"op": OP_INPUT, "inputs": ins, "layer": None, "axis": None, "keeps": False}
    if node.op == "output":
        return {"op": OP_OUTPUT, "inputs": ins, "layer": None, "axis": None, "keeps": False}
    if node.op == "call_module" and node.target in names:
        return {"op": OP_LAYER, "inputs": ins, "layer": node.target, "axis": None, "keeps": True}
    if node.op == "call_module" and f"{node.target}.in_proj" in names:
        layer = f"{node.target}.in_proj"  # MultiheadAttention: its weights, not a plain layer
    fname = getattr(node.target, "__name__", str(node.target))
    if node.op in ("call_function", "call_method") and fname in ("cat", "concat", "concatenate"):
        op = OP_CONCAT
        axis = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        ins = [ids[a] for a in (node.args[0] if node.args else node.kwargs.get("tensors", [])) if a in ids]
    elif (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)) or (
        node.op == "call_method" and fname in ("add", "add_")
    ):
        tensor_ins = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        op = OP_ADD if len(tensor_ins) == 2 else OP_OTHER
    elif fname in ("flatten", "view", "reshape", "linear", "matmul", "mm", "bmm", "split", "chunk"):
        keeps = False
    elif node.op == "call_module" and isinstance(modules.get(node.target), (nn.Flatten, nn.Linear)):
        keeps = False
    if fname == "getattr":
        keeps = False  # x.shape and friends: not a channel path
    if op == OP_OTHER:
        label = _op_label(node, modules)
        if label == "flatten":
            op = OP_FLATTEN
        elif label in POOL_OPS:
            op = OP_POOL
    return {"op": op, "inputs": ins, "layer": layer, "axis": axis, "keeps": keeps}


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
