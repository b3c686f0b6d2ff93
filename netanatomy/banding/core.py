"""Weight banding: reduced pictures, colour alignment, ordering, scores, types.

Everything here is computation on tensors (no plotting, no printing).

Pictures
    ``reduce_layer`` turns a conv layer's weight ``(N, in, kh, kw)`` into one
    ``(kh, kw, 3)`` picture per neuron: posneg NMF with 3 components
    (:mod:`netanatomy.banding.nmf`) for ordinary convs; depthwise kernels
    (one input channel per neuron) are pictured directly (posneg of the kernel
    as two colour channels, the third left empty).

Colour alignment
    NMF's components come in arbitrary order. ``align_colours`` permutes each
    neuron's components to best match a layer template (Hungarian matching on
    cosine similarity, ``scipy.optimize.linear_sum_assignment``), re-estimating
    the template as the mean of the aligned pictures a few times.

Banding score (our definition; no published one exists)
    For a picture ``P`` (kh x kw x c), centre each channel around its mean
    over positions, ``D = P - mean``. With ``SS = sum D^2`` (over y, x, c),

        V_y = kw * sum_{y,c} (mean_x D[y, x, c])^2 / SS   (share explained by row means)
        V_x = kh * sum_{x,c} (mean_y D[y, x, c])^2 / SS   (share explained by column means)

    ``V_y = 1``: constant along x, i.e. horizontal stripes; ``V_x = 1``:
    vertical stripes. For i.i.d. entries the expected value is
    ``(kh - 1) / (kh*kw - 1)`` for V_y and ``(kw - 1) / (kh*kw - 1)`` for V_x
    (0.25 for 3x3, 0.167 for 5x5): the null value. A neuron is horizontally
    banded when ``V_y >= band_min`` (0.6) and ``V_y >= V_x + margin`` (0.2);
    vertically banded likewise with x and y swapped.

Banding types
    k-means (k = 4 by default, k-means++ starts, several restarts) over the
    aligned pictures, each centred per channel and scaled to unit norm; the
    cluster centres are pictures of the types, their sizes the type shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .nmf import reduce_kernels

# ---------------------------------------------------------------------------
# pictures


@dataclass
class Reduced:
    """Per-neuron pictures of one layer: ``pictures`` is ``(N, kh, kw, 3)`` >= 0."""

    pictures: torch.Tensor
    method: str  # "nmf" or "direct"
    nmf_error: torch.Tensor | None = None  # (N,) relative error ||X-AB|| / ||X||
    iterations: int = 0


def reduce_layer(weight: torch.Tensor, depthwise: bool = False, k: int = 3, **nmf_kw) -> Reduced:
    """Pictures for all neurons of a conv layer (weight in ``(out, in, kh, kw)``)."""
    if weight.dim() != 4:
        raise ValueError(f"banding pictures need 2-d conv kernels, got shape {tuple(weight.shape)}")
    w = weight.float()
    if depthwise or w.shape[1] == 1:
        x = w[:, 0]
        pics = torch.stack([x.clamp(min=0), (-x).clamp(min=0), torch.zeros_like(x)], dim=-1)
        return Reduced(pictures=pics, method="direct")
    res = reduce_kernels(w, k=k, **nmf_kw)
    norm = w.reshape(w.shape[0], -1).norm(dim=1)
    rel = res.err / norm.clamp(min=1e-12)
    return Reduced(pictures=res.A, method="nmf", nmf_error=rel, iterations=res.iterations)


def normalise_pictures(pics: torch.Tensor) -> torch.Tensor:
    """Each neuron scaled by its own maximum (as the published figures do)."""
    m = pics.reshape(pics.shape[0], -1).amax(dim=1).clamp(min=1e-12)
    return pics / m[:, None, None, None]


# ---------------------------------------------------------------------------
# colour alignment and ordering


def _unit_columns(pics: torch.Tensor) -> torch.Tensor:
    """(N, kh, kw, c) -> (N, kh*kw, c) with every component centred and unit-norm."""
    n, kh, kw, c = pics.shape
    a = pics.reshape(n, kh * kw, c).double()
    a = a - a.mean(dim=1, keepdim=True)
    return a / a.norm(dim=1, keepdim=True).clamp(min=1e-12)


def align_colours(pics: torch.Tensor, rounds: int = 4, template: torch.Tensor | None = None):
    """Permute each neuron's components to match a shared template.

    Returns ``(aligned_pictures, permutations (N, c), template (kh*kw, c))``.
    Matching maximises the summed cosine similarity between each neuron's
    centred components and the template's (Hungarian algorithm). The template
    starts from the strongest neuron's own components (or ``template``) and is
    then the mean of the aligned, normalised components.
    """
    from scipy.optimize import linear_sum_assignment

    n, kh, kw, c = pics.shape
    if n == 0:
        return pics, torch.zeros(0, c, dtype=torch.long), torch.zeros(kh * kw, c)
    u = _unit_columns(pics)  # (N, S, c)
    weight = pics.reshape(n, -1).norm(dim=1)
    if template is None:
        t = u[int(weight.argmax())].clone()
    else:
        t = template.double().reshape(kh * kw, c)
        t = t - t.mean(dim=0, keepdim=True)
        t = t / t.norm(dim=0, keepdim=True).clamp(min=1e-12)
    perms = np.tile(np.arange(c), (n, 1))
    for _ in range(max(1, rounds)):
        sim = (u.transpose(1, 2) @ t).numpy()  # (N, c_neuron, c_template)
        new = np.empty_like(perms)
        for i in range(n):
            rows, cols = linear_sum_assignment(-sim[i])
            new[i, cols] = rows  # template slot cols[j] takes neuron component rows[j]
        stable = np.array_equal(new, perms)
        perms = new
        idx = torch.from_numpy(perms)
        aligned_u = torch.gather(u, 2, idx[:, None, :].expand(n, kh * kw, c))
        t = (aligned_u * weight.double()[:, None, None]).sum(0)
        t = t - t.mean(dim=0, keepdim=True)
        t = t / t.norm(dim=0, keepdim=True).clamp(min=1e-12)
        if stable:
            break
    idx = torch.from_numpy(perms)
    flat = pics.reshape(n, kh * kw, c)
    aligned = torch.gather(flat, 2, idx[:, None, :].expand(n, kh * kw, c)).reshape(n, kh, kw, c)
    return aligned, idx, t.float()


def similarity_order(features: torch.Tensor) -> np.ndarray:
    """Neuron order that puts similar ones next to each other (average-linkage
    clustering on cosine distance, optimal leaf ordering up to 512 neurons)."""
    from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
    from scipy.spatial.distance import pdist

    n = features.shape[0]
    if n < 3:
        return np.arange(n)
    f = features.reshape(n, -1).double().numpy()
    f = f - f.mean(axis=1, keepdims=True)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    d = np.clip(pdist(f, "sqeuclidean") / 2.0, 0, None)  # = 1 - cosine
    z = linkage(d, "average")
    if n <= 512:  # optimal leaf ordering grows fast (about 5 s at 1024 neurons)
        z = optimal_leaf_ordering(z, d)
    return leaves_list(z)


# ---------------------------------------------------------------------------
# scores


def null_v(kh: int, kw: int) -> tuple[float, float]:
    """Expected (V_y, V_x) for i.i.d. entries."""
    s = kh * kw
    if s <= 1:
        return math.nan, math.nan
    return (kh - 1) / (s - 1), (kw - 1) / (s - 1)


def band_scores(pics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V_y and V_x per neuron for pictures ``(N, kh, kw, c)`` (any c, signed or not)."""
    p = pics.double()
    d = p - p.mean(dim=(1, 2), keepdim=True)
    ss = (d * d).sum(dim=(1, 2, 3))
    kh, kw = p.shape[1], p.shape[2]
    row = d.mean(dim=2)  # (N, kh, c)
    col = d.mean(dim=1)  # (N, kw, c)
    vy = kw * (row * row).sum(dim=(1, 2)) / ss.clamp(min=1e-30)
    vx = kh * (col * col).sum(dim=(1, 2)) / ss.clamp(min=1e-30)
    flat = ss <= 1e-30
    vy = torch.where(flat, torch.full_like(vy, math.nan), vy)
    vx = torch.where(flat, torch.full_like(vx, math.nan), vx)
    return vy, vx


def classify(vy: torch.Tensor, vx: torch.Tensor, band_min: float = 0.6, margin: float = 0.2):
    """Boolean masks (horizontal, vertical) of banded neurons."""
    h = (vy >= band_min) & (vy >= vx + margin)
    v = (vx >= band_min) & (vx >= vy + margin)
    return h, v


def banding_score(v_y_median: float, v_x_median: float, kh: int, kw: int) -> float:
    """How far a layer's median V sits above the i.i.d. null, on a 0..1 scale:
    ``max((V_y - null_y) / (1 - null_y), (V_x - null_x) / (1 - null_x), 0)``.
    Used to rank layers; 0 for unbanded layers, 1 for perfect stripes."""
    ny, nx = null_v(kh, kw)
    if math.isnan(v_y_median) or math.isnan(v_x_median) or math.isnan(ny):
        return math.nan
    return max((v_y_median - ny) / (1 - ny), (v_x_median - nx) / (1 - nx), 0.0)


def layer_orientation(h_frac: float, v_frac: float, min_fraction: float = 0.25, dominance: float = 2.0) -> str:
    """``horizontal`` when at least ``min_fraction`` of neurons are horizontally
    banded and ``dominance`` times more than vertically; ``vertical`` likewise;
    else ``none``."""
    if h_frac >= min_fraction and h_frac >= dominance * v_frac:
        return "horizontal"
    if v_frac >= min_fraction and v_frac >= dominance * h_frac:
        return "vertical"
    return "none"


# ---------------------------------------------------------------------------
# banding types (k-means)


def type_features(pics: torch.Tensor) -> torch.Tensor:
    """Aligned pictures, centred per channel and scaled to unit norm, flattened."""
    n = pics.shape[0]
    d = pics.double() - pics.double().mean(dim=(1, 2), keepdim=True)
    f = d.reshape(n, -1)
    return f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)


@dataclass
class KMeansResult:
    labels: np.ndarray  # (N,)
    centres: np.ndarray  # (k, D)
    inertia: float


def kmeans(x: torch.Tensor | np.ndarray, k: int = 4, restarts: int = 8, iters: int = 100, seed: int = 0) -> KMeansResult:
    """Plain Lloyd's k-means with k-means++ starts; the best of ``restarts`` runs.
    Clusters are numbered by decreasing size. Deterministic for a given seed."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    n = x.shape[0]
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(restarts):
        first = int(torch.randint(n, (1,), generator=g))
        centres = [x[first]]
        d2 = ((x - centres[0]) ** 2).sum(1)
        for _ in range(1, k):
            tot = float(d2.sum())
            if tot <= 0:
                j = int(torch.randint(n, (1,), generator=g))
            else:
                j = int(torch.multinomial(d2 / tot, 1, generator=g))
            centres.append(x[j])
            d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
        c = torch.stack(centres)
        labels = None
        for _ in range(iters):
            dist = torch.cdist(x, c) ** 2
            new = dist.argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for j in range(k):
                m = labels == j
                if m.any():
                    c[j] = x[m].mean(0)
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best[2] - 1e-12:
            best = (labels.clone(), c.clone(), inertia)
    labels, c, inertia = best
    sizes = torch.bincount(labels, minlength=k)
    order = torch.argsort(-sizes, stable=True)
    remap = torch.empty_like(order)
    remap[order] = torch.arange(k)
    return KMeansResult(labels=remap[labels].numpy(), centres=c[order].numpy(), inertia=inertia)


def describe_type(centre_picture: np.ndarray, band_min: float = 0.6, margin: float = 0.2) -> str:
    """A word for a cluster centre picture (kh, kw, c): horizontal / vertical / unbanded."""
    vy, vx = band_scores(torch.as_tensor(centre_picture)[None])
    h, v = classify(vy, vx, band_min, margin)
    if bool(h[0]):
        return "horizontal"
    if bool(v[0]):
        return "vertical"
    return "unbanded"


# ---------------------------------------------------------------------------
# one layer, end to end


@dataclass
class LayerBanding:
    """Everything about one layer; ``pictures`` aligned and ordered for display."""

    layer: str
    kernel: tuple[int, int]
    method: str
    v_y: np.ndarray
    v_x: np.ndarray
    horizontal: np.ndarray
    vertical: np.ndarray
    pictures: np.ndarray  # (N, kh, kw, 3), aligned, in display order, scaled to [0,1] per neuron
    order: np.ndarray
    types: KMeansResult | None
    type_shares: list[float] = field(default_factory=list)
    type_names: list[str] = field(default_factory=list)
    type_pictures: np.ndarray | None = None  # (k, kh, kw, 3)
    nmf_error_mean: float = math.nan
    record: dict = field(default_factory=dict)


def analyse_weight(
    name: str,
    weight: torch.Tensor,
    depthwise: bool = False,
    k_types: int = 4,
    band_min: float = 0.6,
    margin: float = 0.2,
    min_fraction: float = 0.25,
    max_neurons: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
    **nmf_kw,
) -> LayerBanding:
    """Reduce, align, order, score and type one conv layer's weight."""
    if weight.dim() != 4:
        raise ValueError(f"need a 2-d conv weight (out, in, kh, kw), got shape {tuple(weight.shape)}")
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    w = weight
    if max_neurons and w.shape[0] > max_neurons:
        g = torch.Generator().manual_seed(seed)
        keep = torch.sort(torch.randperm(w.shape[0], generator=g)[:max_neurons]).values
        w = w[keep]
    if device is not None:
        w = w.to(device)
    red = reduce_layer(w, depthwise=depthwise, **nmf_kw)
    pics = red.pictures.detach().cpu().float()
    vy, vx = band_scores(pics)
    h, v = classify(vy, vx, band_min, margin)
    if red.method == "nmf":
        pics, _, _ = align_colours(pics)
    n = pics.shape[0]
    types = None
    shares: list[float] = []
    names: list[str] = []
    tpics = None
    feats = type_features(pics)
    if n >= 2 and k_types >= 1:
        types = kmeans(feats, k=min(k_types, n), seed=seed)
        kk = types.centres.shape[0]
        counts = np.bincount(types.labels, minlength=kk)
        shares = [float(c) / n for c in counts]
        tpics = types.centres.reshape(kk, kh, kw, -1)
        names = [describe_type(tp, band_min, margin) for tp in tpics]
    order = similarity_order(feats) if n >= 3 else np.arange(n)
    if types is not None:  # group by type first, similarity inside a type
        rank = np.empty(n, dtype=int)
        rank[order] = np.arange(n)
        order = np.lexsort((rank, types.labels))
    disp = normalise_pictures(pics)[torch.as_tensor(order)].numpy()
    valid_y = vy[~torch.isnan(vy)]
    valid_x = vx[~torch.isnan(vx)]
    hf = float(h.double().mean()) if n else math.nan
    vf = float(v.double().mean()) if n else math.nan
    ny, nx = null_v(kh, kw)
    rec = {
        "layer": name,
        "neurons": int(weight.shape[0]),
        "neurons_analysed": n,
        "kernel": f"{kh}x{kw}",
        "picture": red.method,
        "v_y_median": float(valid_y.median()) if valid_y.numel() else math.nan,
        "v_x_median": float(valid_x.median()) if valid_x.numel() else math.nan,
        "v_null_y": ny,
        "v_null_x": nx,
        "horizontal_fraction": hf,
        "vertical_fraction": vf,
        "banded_fraction": hf + vf,
        "orientation": layer_orientation(hf, vf, min_fraction),
        "banding_score": banding_score(float(valid_y.median()) if valid_y.numel() else math.nan,
                                       float(valid_x.median()) if valid_x.numel() else math.nan, kh, kw),
    }
    if red.nmf_error is not None:
        rec["nmf_rel_error"] = float(red.nmf_error.mean())
    for i, (s, nm) in enumerate(zip(shares, names)):
        rec[f"type{i}_share"] = s
        rec[f"type{i}_kind"] = nm
    return LayerBanding(
        layer=name,
        kernel=(kh, kw),
        method=red.method,
        v_y=vy.numpy(),
        v_x=vx.numpy(),
        horizontal=h.numpy(),
        vertical=v.numpy(),
        pictures=disp,
        order=order,
        types=types,
        type_shares=shares,
        type_names=names,
        type_pictures=tpics,
        nmf_error_mean=rec.get("nmf_rel_error", math.nan),
        record=rec,
    )
