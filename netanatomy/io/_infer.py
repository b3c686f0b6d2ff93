"""Turn a flat listing of named tensors into layers.

Used by every loader. Keys are grouped by their module prefix (``a.b.weight`` ->
layer ``a.b``); each group with a weight becomes a :class:`Layer`; the kind
comes from a hint (module or op type) when the loader has one, else from names
and shapes. Every tensor that ends in no layer is returned with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..model import (
    LAYOUT_HWIO,
    LAYOUT_TORCH,
    LAYOUT_TRANSPOSED,
    Layer,
    LayerKind,
    SkippedTensor,
    TensorStore,
    canonical_shape,
)

# leaf name -> role
_ROLE = {
    "weight": "weight",
    "kernel": "weight",
    "w": "weight",
    "embedding": "weight",
    "scale": "weight",
    "gamma": "weight",
    "bias": "bias",
    "b": "bias",
    "beta": "bias",
    "running_mean": "running_mean",
    "moving_mean": "running_mean",
    "mean": "running_mean",
    "running_var": "running_var",
    "moving_variance": "running_var",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}
_LEADING_PREFIXES = ("module.", "_orig_mod.", "model.module.")

_EMBED_RE = re.compile(
    r"(embed|embedding|embeddings|wte|wpe|tok_emb|pos_emb|word_emb|token_type|shared$)", re.I
)
_NORM_RE = re.compile(r"(norm|^bn|\.bn|_bn|bn\d|^ln|\.ln|_ln|ln_\w|layernorm|batchnorm|rmsnorm|groupnorm)", re.I)
_ATTN_CTX_RE = re.compile(r"(attn|attention|self_attn|mha|mixer)", re.I)
_FUSED_QKV_RE = re.compile(r"^(qkv|c_attn|wqkv|in_proj|query_key_value|qkv_proj|w_pack)$", re.I)
_QKV_ROLE = [
    (re.compile(r"^(q|q_proj|query|wq|q_lin)$", re.I), "q"),
    (re.compile(r"^(k|k_proj|key|wk|k_lin)$", re.I), "k"),
    (re.compile(r"^(v|v_proj|value|wv|v_lin)$", re.I), "v"),
    (re.compile(r"^(o|o_proj|out_proj|wo|out_lin|dense|proj|c_proj|output)$", re.I), "o"),
]
_GPT2_CONV1D = re.compile(r"(^|\.)(c_attn|c_proj|c_fc)$")


@dataclass
class Hint:
    """What a loader knows of a layer from its module or op type."""

    kind: LayerKind
    module_type: str | None = None
    groups: int = 1
    layout: str = LAYOUT_TORCH
    fused: int = 1
    role: str | None = None
    note: str | None = None


def split_key(key: str) -> tuple[str, str]:
    """``'a.b.weight'`` -> ``('a.b', 'weight')``; also ``/`` and Keras ``:0``."""
    clean = key.split(":")[0] if re.search(r":\d+$", key) else key
    for sep in (".", "/"):
        if sep in clean:
            head, _, leaf = clean.rpartition(sep)
            return head.replace("/", "."), leaf
    return "", clean


def strip_prefix(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _LEADING_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "half", "double"))


def build_layers(
    store: TensorStore,
    hints: dict[str, Hint] | None = None,
    layout: str = "auto",
    keys: list[str] | None = None,
) -> tuple[list[Layer], list[SkippedTensor]]:
    """Group ``store``'s tensors into layers.

    ``hints`` maps a layer name (prefix, after stripping DDP/compile prefixes) to
    what the loader knows. ``layout`` is ``auto`` (``kernel`` leaves are
    TensorFlow/Flax layout), ``torch`` or ``tf``.
    """
    if layout not in ("auto", "torch", "tf"):
        from ..errors import UserError

        raise UserError(f"unknown layout {layout!r} (use auto, torch or tf)")
    hints = hints or {}
    keys = store.keys() if keys is None else keys
    groups: dict[str, dict[str, str]] = {}
    leaf_of: dict[str, str] = {}
    skipped: list[SkippedTensor] = []
    order: list[str] = []

    def skip(key: str, reason: str) -> None:
        skipped.append(SkippedTensor(key, tuple(store.shape(key)), store.dtype(key), reason))

    for key in keys:
        prefix, leaf = split_key(key)
        prefix = strip_prefix(prefix + "." if prefix else "").rstrip(".")
        if leaf in ("in_proj_weight", "in_proj_bias"):  # torch MultiheadAttention
            prefix = f"{prefix}.in_proj" if prefix else "in_proj"
            leaf = leaf.removeprefix("in_proj_")
        role = _ROLE.get(leaf)
        shape = tuple(store.shape(key))
        if role is None:
            # an unnamed parameter: a 2-D float tensor is taken as a weight matrix
            if _is_float(store.dtype(key)) and len(shape) == 2 and min(shape) > 1:
                prefix, role = (f"{prefix}.{leaf}" if prefix else leaf), "weight"
            else:
                skip(key, _why_not(leaf, shape, store.dtype(key)))
                continue
        if role != "num_batches_tracked" and not _is_float(store.dtype(key)):
            skip(key, f"{store.dtype(key)} tensor is not a weight")
            continue
        g = groups.setdefault(prefix, {})
        if prefix not in leaf_of:
            order.append(prefix)
        if role in g:  # e.g. both 'w' and 'weight' under one prefix
            skip(key, f"second {role!r} tensor under {prefix or '(top level)'}")
            continue
        g[role] = key
        if role == "weight":
            leaf_of[prefix] = leaf
        else:
            leaf_of.setdefault(prefix, "")

    gpt2_style = any(_GPT2_CONV1D.search(p) for p in groups) and any(
        p.endswith("c_attn") for p in groups
    )
    layers: list[Layer] = []
    seen_conv = False
    for prefix in order:
        g = groups[prefix]
        if "weight" not in g:
            for role, key in g.items():
                skip(key, f"{role} with no weight beside it in {prefix or '(top level)'}")
            continue
        wkey = g["weight"]
        stored = tuple(store.shape(wkey))
        name = prefix or split_key(wkey)[1]
        hint = hints.get(name)
        if hint is None:
            hint = _guess(name, leaf_of[prefix], stored, g, layout, gpt2_style, seen_conv)
        if hint is None:
            for key in g.values():
                skip(key, f"{len(stored)}-D weight that matches no supported layer")
            continue
        if len(stored) == 0:
            skip(wkey, "scalar parameter")
            continue
        shape = canonical_shape(stored, hint.layout)
        fused = hint.fused
        if fused > 1 and shape[0] % fused != 0:
            fused = 1
        layer = Layer(
            name=name,
            kind=hint.kind,
            shape=shape,
            tensors=dict(g),
            store=store,
            groups=hint.groups,
            layout=hint.layout,
            module_type=hint.module_type,
            role=hint.role,
            fused=fused,
            note=hint.note,
        )
        if layer.is_conv:
            seen_conv = True
        layers.append(layer)
    return layers, skipped


def _why_not(leaf: str, shape: tuple[int, ...], dtype: str) -> str:
    if not _is_float(dtype):
        return f"{dtype} tensor is not a weight"
    if len(shape) == 0:
        return "scalar parameter"
    return f"{len(shape)}-D parameter {leaf!r} is not part of a recognised layer"


def _guess(
    name: str,
    leaf: str,
    stored: tuple[int, ...],
    group: dict[str, str],
    layout: str,
    gpt2_style: bool,
    seen_conv: bool,
) -> Hint | None:
    nd = len(stored)
    last = name.rsplit(".", 1)[-1]
    tf = layout == "tf" or (layout == "auto" and leaf == "kernel")
    if nd == 1:
        note = None if (_NORM_RE.search(name) or "running_mean" in group) else "1-D weight taken as a norm scale"
        return Hint(LayerKind.NORM, note=note)
    if nd == 2:
        lay = LAYOUT_TRANSPOSED if tf or (gpt2_style and _GPT2_CONV1D.search(name)) else LAYOUT_TORCH
        if leaf == "embedding" or (_EMBED_RE.search(last) and not tf):
            return Hint(LayerKind.EMBEDDING, layout=LAYOUT_TORCH)
        if _FUSED_QKV_RE.match(last):
            return Hint(LayerKind.ATTENTION, layout=lay, fused=3, role="qkv")
        in_attn = bool(_ATTN_CTX_RE.search(name.rsplit(".", 1)[0] if "." in name else ""))
        for rx, role in _QKV_ROLE:
            if rx.match(last) and (in_attn or role != "o"):
                if role == "o" and last in ("dense", "output") and not in_attn:
                    break
                return Hint(LayerKind.ATTENTION, layout=lay, role=role)
        if in_attn and last in ("dense", "output"):
            return Hint(LayerKind.ATTENTION, layout=lay, role="o")
        return Hint(LayerKind.LINEAR, layout=lay)
    if nd in (3, 4, 5):
        kind = {3: LayerKind.CONV1D, 4: LayerKind.CONV2D, 5: LayerKind.CONV3D}[nd]
        lay = LAYOUT_HWIO if tf else LAYOUT_TORCH
        shape = canonical_shape(stored, lay)
        groups, note = 1, None
        if shape[1] == 1 and shape[0] > 1 and seen_conv:
            groups, note = shape[0], "groups inferred from shape (depthwise)"
        return Hint(kind, groups=groups, layout=lay, note=note)
    return None
