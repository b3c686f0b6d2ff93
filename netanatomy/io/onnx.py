"""ONNX models (needs the ``onnx`` extra).

Weights are the graph's initializers and ``Constant`` nodes. They become layers
through the ops that use them (Conv, ConvTranspose, Gemm, MatMul, Gather,
BatchNormalization, LayerNormalization); the data flow between those ops, with
the pooling nodes on each path, becomes the model's graph. External data is read
lazily and only from files inside the model's folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import LoadError, UnsafeFileError, UserError
from ..model import (
    LAYOUT_TORCH,
    LAYOUT_TRANSPOSED,
    OP_ADD,
    OP_CONCAT,
    OP_FLATTEN,
    OP_INPUT,
    OP_LAYER,
    OP_OTHER,
    OP_POOL,
    POOL_OPS,
    Graph,
    Layer,
    LayerKind,
    Model,
    OpNode,
    SkippedTensor,
    fill_channels,
)

_PASS_THROUGH = {"Identity", "Cast"}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("reading ONNX files needs the onnx package: pip install 'netanatomy[onnx]'") from None
    return onnx


class OnnxStore:
    """Tensors of an ONNX model: in-proto data, or external data read on request."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self._protos: dict = {}
        self._external: dict[str, tuple[Path, int, int | None]] = {}

    def add(self, name: str, proto) -> None:
        onnx = _onnx()
        self._protos[name] = proto
        if proto.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in proto.external_data}
            loc = info.get("location", "")
            target = (self.folder / loc).resolve()
            if not loc or os.path.isabs(loc) or self.folder not in target.parents:
                raise UnsafeFileError(
                    f"external data of tensor {name!r} points outside the model folder ({loc!r}); refused"
                )
            if not target.is_file():
                raise LoadError(f"external data file {loc!r} of tensor {name!r} is missing")
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
            self._external[name] = (target, offset, length)

    def keys(self) -> list[str]:
        return list(self._protos)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self._protos[key].dims)

    def dtype(self, key: str) -> str:
        onnx = _onnx()
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(self._protos[key].data_type)
        return "bfloat16" if self._protos[key].data_type == onnx.TensorProto.BFLOAT16 else np.dtype(np_dtype).name

    def get(self, key: str) -> torch.Tensor:
        onnx = _onnx()
        proto = self._protos[key]
        if key in self._external:
            path, offset, length = self._external[key]
            np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(proto.data_type))
            n = int(np.prod(self.shape(key), dtype=np.int64))
            want = n * np_dtype.itemsize
            if length is not None and length != want:
                raise LoadError(f"external data of {key!r} has length {length}, expected {want}")
            with open(path, "rb") as fh:
                fh.seek(offset)
                raw = fh.read(want)
            if len(raw) != want:
                raise LoadError(f"external data file of {key!r} is truncated")
            arr = np.frombuffer(raw, dtype=np_dtype).reshape(self.shape(key))
        else:
            try:
                arr = onnx.numpy_helper.to_array(proto)
            except Exception as exc:  # malformed raw_data sizes and the like
                raise LoadError(f"tensor {key!r} is malformed ({exc})") from None
        return torch.from_numpy(np.array(arr, copy=True))


def load(path: str | os.PathLike, *, name: str | None = None) -> Model:
    onnx = _onnx()
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise LoadError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from None
    graph = proto.graph
    if not graph.node and not graph.initializer:
        raise LoadError(f"{path}: not a valid ONNX model (empty graph)")
    store = OnnxStore(path.parent)
    for init in graph.initializer:
        store.add(init.name, init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    store.add(node.output[0], attr.t)

    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    def weight_source(tensor_name: str) -> str | None:
        seen = 0
        while tensor_name not in store._protos and seen < 8:
            node = producer.get(tensor_name)
            if node is None or node.op_type not in _PASS_THROUGH or not node.input:
                return None
            tensor_name, seen = node.input[0], seen + 1
        return tensor_name if tensor_name in store._protos else None

    layers: list[Layer] = []
    node_layer: dict[int, str] = {}  # id(node) -> layer name
    used: set[str] = set()
    bias_adds: set[int] = set()
    names_taken: set[str] = set()

    def layer_name(node, wkey: str, i: int) -> str:
        if wkey.endswith(".weight"):
            base = wkey[: -len(".weight")]
        else:
            parts = [p for p in (node.name or "").split("/") if p]
            if len(parts) > 1 and parts[-1].split("_")[0] == node.op_type:
                parts = parts[:-1]  # "/features/0/Conv" -> "features.0"
            merged: list[str] = []
            for part in parts:  # "/blocks/blocks.0/c1" -> "blocks.0.c1"
                if merged and part.startswith(merged[-1] + "."):
                    merged[-1] = part
                else:
                    merged.append(part)
            base = ".".join(merged)
        base = base or f"{node.op_type.lower()}_{i}"
        n, k = base, 1
        while n in names_taken:
            k += 1
            n = f"{base}_{k}"
        names_taken.add(n)
        return n

    for i, node in enumerate(graph.node):
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        tensors: dict[str, str] = {}
        kind, layout, groups = None, LAYOUT_TORCH, 1
        if op in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = weight_source(node.input[1])
            if w is None:
                continue
            rank = len(store.shape(w))
            kind = {3: LayerKind.CONV1D, 4: LayerKind.CONV2D, 5: LayerKind.CONV3D}.get(rank, LayerKind.OTHER)
            if op == "ConvTranspose":
                kind = LayerKind.OTHER
            groups = int(attrs.get("group", 1))
            tensors["weight"] = w
            if len(node.input) > 2 and (b := weight_source(node.input[2])):
                tensors["bias"] = b
        elif op == "Gemm" and len(node.input) > 1:
            w = weight_source(node.input[1])
            if w is None or len(store.shape(w)) != 2:
                continue
            kind = LayerKind.LINEAR
            layout = LAYOUT_TORCH if int(attrs.get("transB", 0)) else LAYOUT_TRANSPOSED
            tensors["weight"] = w
            if len(node.input) > 2 and (b := weight_source(node.input[2])):
                tensors["bias"] = b
        elif op == "MatMul" and len(node.input) == 2:
            w = weight_source(node.input[1])
            if w is None or len(store.shape(w)) != 2:
                continue
            kind, layout = LayerKind.LINEAR, LAYOUT_TRANSPOSED
            tensors["weight"] = w
            for c in consumers.get(node.output[0], []):
                if c.op_type == "Add":
                    other = [x for x in c.input if x != node.output[0]]
                    if other and (b := weight_source(other[0])) and len(store.shape(b)) == 1:
                        tensors["bias"] = b
                        bias_adds.add(id(c))
        elif op == "Gather" and len(node.input) == 2:
            w = weight_source(node.input[0])
            if w is None or len(store.shape(w)) != 2:
                continue
            kind = LayerKind.EMBEDDING
            tensors["weight"] = w
        elif op in ("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization"):
            w = weight_source(node.input[1]) if len(node.input) > 1 else None
            if w is None:
                continue
            kind = LayerKind.NORM
            tensors["weight"] = w
            roles = ["bias", "running_mean", "running_var"] if op == "BatchNormalization" else ["bias"]
            for role, inp in zip(roles, node.input[2:]):
                if (t := weight_source(inp)) is not None:
                    tensors[role] = t
        if kind is None:
            continue
        lname = layer_name(node, tensors["weight"], i)
        shape = tuple(store.shape(tensors["weight"]))
        if layout == LAYOUT_TRANSPOSED:
            shape = (shape[1], shape[0])
        layers.append(
            Layer(
                name=lname,
                kind=kind,
                shape=shape,
                tensors=tensors,
                store=store,
                groups=groups,
                layout=layout,
                module_type=op,
                note="transposed convolution: listed, not analysed" if op == "ConvTranspose" else None,
            )
        )
        node_layer[id(node)] = lname
        used.update(tensors.values())

    skipped = []
    for key in store.keys():
        if key in used:
            continue
        users = sorted({n.op_type for n in consumers.get(key, [])})
        reason = f"used by {', '.join(users)}, not a weight layer" if users else "not used by any node"
        skipped.append(SkippedTensor(key, store.shape(key), store.dtype(key), reason))

    flow = _flow(proto, layers, node_layer, bias_adds, store, onnx)
    return Model(
        name=name or path.stem,
        source=str(path),
        format="onnx",
        layers=layers,
        skipped=skipped,
        graph=Graph(source="onnx", nodes=flow),
        metadata={"opset": ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in proto.opset_import)},
    )


_LAYER_OPS = ("Conv", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
              "LayerNormalization", "GroupNormalization")
_RESHAPING = ("Flatten", "Reshape", "Gemm", "MatMul", "Split", "Slice")


def _flow(proto, layers, node_layer, bias_adds, store, onnx) -> list[OpNode]:
    """The data flow of the graph as :class:`OpNode` s, in the file's (topological)
    order. ``Constant`` nodes and initializers are weights, not data."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shapes are a bonus
        inferred = proto
    g = inferred.graph
    inits = {t.name for t in g.initializer}
    consts = {n.output[0] for n in g.node if n.op_type == "Constant" and n.output}
    weight_to_layer = {layer.tensors.get("weight"): layer.name for layer in layers}
    producer_of = {o: n for n in g.node for o in n.output}

    def weight_name(t: str) -> str | None:
        for _ in range(8):
            if t in inits or t in consts:
                return t
            n = producer_of.get(t)
            if n is None or n.op_type not in _PASS_THROUGH or not n.input:
                return None
            t = n.input[0]
        return None

    shapes: dict[str, list] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]

    nodes: list[OpNode] = []
    tensor_node: dict[str, int] = {}
    for inp in g.input:
        if inp.name in inits:
            continue
        tensor_node[inp.name] = len(nodes)
        nodes.append(OpNode(len(nodes), OP_INPUT, keeps_channels=False))
    # the proto's nodes and the inferred copy's are the same nodes in the same order
    for orig, n in zip(proto.graph.node, g.node):
        if n.op_type == "Constant":
            continue
        op, layer, axis = OP_OTHER, node_layer.get(id(orig)), None
        data_inputs = [t for t in n.input if t and t not in inits and t not in consts and t in tensor_node]
        keeps = not (n.op_type in _RESHAPING or n.op_type.lower() in ("add", "split", "matmul"))
        if n.op_type in _LAYER_OPS and len(n.input) > 1:
            w = weight_name(n.input[1] if n.op_type != "MatMul" or n.input[1] not in tensor_node else "")
            if w is not None and w in weight_to_layer:
                op, keeps = OP_LAYER, True
                layer = layer or weight_to_layer[w]
                data_inputs = [n.input[0]] if n.input[0] in tensor_node else []
        label = "" if id(orig) in bias_adds else _label(n, store, onnx)
        if n.op_type == "Concat":
            op, keeps = OP_CONCAT, False
            axis = next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), None)
        elif n.op_type == "Add" and len(data_inputs) == 2:
            op, keeps = OP_ADD, False
        elif op == OP_OTHER and label in POOL_OPS:
            op = OP_POOL
        elif op == OP_OTHER and label == "flatten":
            op = OP_FLATTEN
        out = n.output[0] if n.output else ""
        shp = shapes.get(out)
        rank = len(shp) if shp else None
        ch = shp[1] if shp and len(shp) >= 2 and shp[1] else None
        if op == OP_CONCAT and axis is not None and axis < 0 and rank:
            axis += rank
        nid = len(nodes)
        nodes.append(OpNode(nid, op, [tensor_node[t] for t in data_inputs], layer=layer, label=label,
                            keeps_channels=keeps, channels=ch, rank=rank, axis=axis))
        for o in n.output:
            tensor_node[o] = nid
    fill_channels(nodes, {layer.name: layer for layer in layers})
    return nodes


def _axes(node, store, onnx):
    for a in node.attribute:
        if a.name == "axes":
            return list(onnx.helper.get_attribute_value(a))
    if len(node.input) > 1 and node.input[1] in store._protos:
        return [int(x) for x in store.get(node.input[1]).tolist()]
    return None


def _label(node, store, onnx) -> str:
    op = node.op_type
    if op == "GlobalAveragePool":
        return "global_avg_pool"
    if op == "GlobalMaxPool":
        return "global_max_pool"
    if op in ("ReduceMean", "ReduceSum", "ReduceMax"):
        kind = {"ReduceMean": "avg", "ReduceSum": "sum", "ReduceMax": "max"}[op]
        axes = _axes(node, store, onnx)
        if axes is None:
            return f"global_{kind}_pool"
        s = set(axes)
        if s in ({2, 3}, {-1, -2}, {2, -1}, {-2, 3}):
            return f"global_{kind}_pool"
        if s in ({3}, {-1}):
            return "avg_pool_x" if kind == "avg" else f"reduce_{kind}"
        if s in ({2}, {-2}):
            return "avg_pool_y" if kind == "avg" else f"reduce_{kind}"
        return f"reduce_{kind}"
    if op == "AveragePool":
        return "avg_pool"
    if op == "MaxPool":
        return "max_pool"
    if op == "LpPool":
        return "lp_pool"
    if op == "Concat":
        return "concat"
    if op == "Add":
        return "add"
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        return "flatten"
    if op in _PASS_THROUGH or op in ("Shape", "Gather", "Constant"):
        return ""
    return op.lower()
