"""The role of a weight matrix read from its name: attention projections (q, k, v,
o), MLP matrices, embeddings / LM head, conv, other.

Only the name is used (and the layer kind, when known, for embeddings and convs),
so the same rules classify safetensors keys, ``state_dict`` keys and ``esd`` row
names (``...qkv[q]`` for a part of a fused projection). ``depth`` is the first
integer path component (the block index) or -1.
"""

from __future__ import annotations

import re

LAYER_TYPES = ("q", "k", "v", "o", "qkv", "mlp", "embedding", "conv", "other")

_PART = re.compile(r"\[([^\]]*)\]$")
_TOKEN = re.compile(r"[./]+")
# matched against the dot-separated path components, last (most specific) first
_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("embedding", ("embed", "embeddings", "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                   "token_type_embeddings", "tok_embeddings", "lm_head", "shared", "embed_positions", "embedding")),
    ("qkv", ("qkv", "qkv_proj", "c_attn", "in_proj", "in_proj_weight", "query_key_value", "wqkv", "w_pack")),
    ("q", ("q", "q_proj", "query", "wq", "q_lin", "to_q")),
    ("k", ("k", "k_proj", "key", "wk", "k_lin", "to_k")),
    ("v", ("v", "v_proj", "value", "wv", "v_lin", "to_v")),
    ("o", ("o", "o_proj", "out_proj", "wo", "out_lin", "to_out", "dense_out", "c_proj_attn")),
    ("mlp", ("mlp", "ffn", "feed_forward", "fc1", "fc2", "c_fc", "up_proj", "down_proj", "gate_proj", "w1", "w2",
             "w3", "intermediate", "lin1", "lin2", "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj", "experts")),
]
_LOOKUP = {tok: kind for kind, toks in _RULES for tok in toks}
_ATTN = ("attn", "attention", "self_attn", "self_attention", "selfattention", "crossattention", "encdecattention")


def layer_type(name: str, kind: str | None = None) -> str:
    """One of :data:`LAYER_TYPES` for a layer (or row) name."""
    m = _PART.search(name)
    if m:
        part = m.group(1).strip().lower()
        if part in ("q", "k", "v"):
            return part
        name = name[: m.start()]
    k = (kind or "").lower()
    if k.startswith("conv"):
        return "conv"
    if k == "embedding":
        return "embedding"
    parts = [p for p in _TOKEN.split(name.lower()) if p and p != "weight"]
    for p in reversed(parts):
        t = _LOOKUP.get(p)
        if t is not None:
            return t
    # BERT-style: attention.output.dense is o, output.dense (outside attention) is MLP
    in_attn = any(p in _ATTN for p in parts)
    if parts and parts[-1] == "dense" and len(parts) >= 2 and parts[-2] == "output":
        return "o" if in_attn else "mlp"
    if "c_proj" in parts:
        return "o" if in_attn else "mlp"
    if in_attn:
        return "other"
    if k.startswith("conv") or any(p.startswith("conv") for p in parts):
        return "conv"
    return "other"


def layer_depth(name: str) -> int:
    """The block index: the first purely numeric path component, or -1."""
    for p in _TOKEN.split(name):
        if p.isdigit():
            return int(p)
    return -1
