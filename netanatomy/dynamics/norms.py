"""The numbers behind the tracker, on whatever device the weights live on.

``coupled_norms`` gives, per channel, ``||w_in|| * ||w_out||`` where ``w_in`` is the
channel's incoming filter (plus, optionally, its 1-D parameters) and ``w_out`` the
concatenation of its outgoing slices in every successor (see :mod:`.groups`).
``variance_ratio`` is the unbiased variance across channels divided by the mean
(the paper's logged quantity). Nothing here synchronises with the host.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..model import to_canonical
from .groups import ChannelGroup, OutSlice

Getter = Callable[[str], torch.Tensor]


def out_sq(w: torch.Tensor, sl: OutSlice, channels: int, squared: bool = False) -> torch.Tensor:
    """Squared norm of each channel's slice of the successor weight ``w`` -> ``(C,)``
    (``squared``: ``w`` already holds the squares, canonical layout)."""
    sq = w if squared else to_canonical(w, sl.layout).detach().float().square()
    if sl.mode == "column":
        dims = [d for d in range(sq.dim()) if d != 1]
        return sq.sum(dim=dims)
    if sl.mode == "flatten":
        return sq.reshape(sq.shape[0], channels, sl.positions).sum(dim=(0, 2))
    if sl.mode == "depthwise":
        return sq.reshape(channels, -1).sum(dim=1)
    if sl.mode == "grouped":
        g = sl.groups
        return sq.reshape(g, sq.shape[0] // g, channels // g, -1).sum(dim=(1, 3)).reshape(channels)
    raise ValueError(f"unknown slice mode {sl.mode!r}")


def out_vectors(w: torch.Tensor, sl: OutSlice, channels: int) -> torch.Tensor:
    """Each channel's outgoing slice as a row -> ``(C, m)``."""
    w = to_canonical(w, sl.layout).detach().float()
    if sl.mode == "column":
        return w.transpose(0, 1).reshape(channels, -1)
    if sl.mode == "flatten":
        return w.reshape(w.shape[0], channels, sl.positions).transpose(0, 1).reshape(channels, -1)
    if sl.mode == "depthwise":
        return w.reshape(channels, -1)
    if sl.mode == "grouped":
        g = sl.groups
        v = w.reshape(g, w.shape[0] // g, channels // g, -1).permute(0, 2, 1, 3)
        return v.reshape(channels, -1)
    raise ValueError(f"unknown slice mode {sl.mode!r}")


def in_weight(group: ChannelGroup, get: Getter) -> torch.Tensor:
    return to_canonical(get(group.in_key), group.in_layout).detach()


class SquareCache:
    """Squares of canonical weights, each computed once per record point."""

    def __init__(self, get: Getter):
        self.get = get
        self._sq: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, key: str, layout: str) -> torch.Tensor:
        k = (key, layout)
        if k not in self._sq:
            self._sq[k] = to_canonical(self.get(key), layout).detach().float().square()
        return self._sq[k]


def in_sq(group: ChannelGroup, get: Getter, include_1d: bool = False, cache: SquareCache | None = None) -> torch.Tensor:
    if cache is not None:
        sq = cache(group.in_key, group.in_layout).reshape(group.channels, -1).sum(dim=1)
    else:
        sq = in_weight(group, get).float().square().reshape(group.channels, -1).sum(dim=1)
    if include_1d:
        for key in ([group.bias_key] if group.bias_key else []) + list(group.norm_keys):
            sq = sq + get(key).detach().float().square()
    return sq


def coupled_norms(
    group: ChannelGroup, get: Getter, include_1d: bool = False, cache: SquareCache | None = None
) -> torch.Tensor:
    """``||w_in|| * ||w_out||`` per channel (the incoming norm alone when no successor)."""
    n = in_sq(group, get, include_1d, cache).sqrt()
    if group.outs:
        o = None
        for sl in group.outs:
            if cache is not None:
                s = out_sq(cache(sl.key, sl.layout), sl, group.channels, squared=True)
            else:
                s = out_sq(get(sl.key), sl, group.channels)
            o = s if o is None else o + s
        n = n * o.sqrt()
    return n


def variance_ratio(norms: torch.Tensor) -> torch.Tensor:
    """Unbiased variance across channels divided by the mean norm (0-d tensor)."""
    if norms.numel() < 2:
        return torch.zeros((), device=norms.device)
    return norms.var(unbiased=True) / norms.mean().clamp_min(torch.finfo(norms.dtype).tiny)


def channel_vectors(group: ChannelGroup, get: Getter) -> torch.Tensor:
    """Each channel's incoming filter and outgoing slices, concatenated -> ``(C, m)``."""
    parts = [in_weight(group, get).float().reshape(group.channels, -1)]
    for sl in group.outs:
        parts.append(out_vectors(get(sl.key), sl, group.channels))
    return torch.cat(parts, dim=1)


def sorted_cosine(group: ChannelGroup, get: Getter, norms: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between channels, rows and columns sorted by norm (largest first)."""
    v = channel_vectors(group, get)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    order = torch.argsort(norms, descending=True)
    v = v[order]
    return v @ v.t()


def sign_bits(group: ChannelGroup, get: Getter) -> torch.Tensor:
    return torch.signbit(in_weight(group, get))


def sign_changed(group: ChannelGroup, get: Getter, init_bits: torch.Tensor) -> torch.Tensor:
    """Share of the layer's weights whose sign differs from ``init_bits`` (0-d tensor)."""
    w = in_weight(group, get)
    return (torch.signbit(w) != init_bits.to(w.device)).float().mean()
