"""Per-neuron feature descriptors computed from the weights alone.

* First-layer (RGB) filters: colourfulness (share of the filter's energy that is
  not grey), mean and dominant spatial frequency, orientation, and how oriented
  the filter is, from the 2-D FFT of the zero-padded kernel.
* Any layer: clusters of neurons by their incoming or outgoing weight pattern
  (``|W|`` summed over kernel positions, rows scaled to unit length, k-means).
* User labels: a CSV of ``layer,neuron,category`` rows.

Categories derived from the descriptors (for the specialization counts):
``colour`` / ``grey`` by a colourfulness threshold, ``low`` / ``high`` frequency
split at the layer's median, four orientation bins for oriented filters.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

FFT_SIZE = 32


@dataclass
class RGBDescriptors:
    """Descriptors of first-layer filters, one entry per filter (output channel)."""

    colourfulness: np.ndarray  # share of energy off the grey axis, 0 (grey) .. 1 (opponent colour)
    frequency: np.ndarray  # power-weighted mean radial frequency, cycles / pixel (0 .. 0.71)
    peak_frequency: np.ndarray  # radial frequency of the strongest FFT bin
    orientation: np.ndarray  # degrees in [0, 180) of the strongest non-DC bin's wave vector
    orientedness: np.ndarray  # 0 (isotropic) .. 1 (one orientation), from the doubled-angle mean
    mean_colour: np.ndarray  # (n, 3) the filter's mean over space, per channel

    def values(self) -> dict[str, np.ndarray]:
        return {
            "colourfulness": self.colourfulness,
            "frequency": self.frequency,
            "orientedness": self.orientedness,
        }


def is_rgb_filter_bank(weight_shape: tuple[int, ...], groups: int = 1) -> bool:
    """A 2-D conv reading three input channels (the image)."""
    return len(weight_shape) == 4 and weight_shape[1] * groups == 3 and groups == 1


def rgb_descriptors(w: torch.Tensor, fft_size: int = FFT_SIZE) -> RGBDescriptors:
    """Descriptors of conv filters ``w`` of shape ``(n, 3, kh, kw)`` (batched)."""
    if w.dim() != 4 or w.shape[1] != 3:
        raise ValueError(f"expected (n, 3, kh, kw) filters, got {tuple(w.shape)}")
    w = w.detach().to(torch.float64)
    n, _, kh, kw = w.shape
    energy = (w**2).sum(dim=(1, 2, 3)).clamp_min(1e-30)
    grey = w.mean(dim=1, keepdim=True)
    chroma = w - grey
    colourfulness = ((chroma**2).sum(dim=(1, 2, 3)) / energy).clamp(0, 1)

    size = max(fft_size, kh, kw)
    spec = torch.fft.fft2(w, s=(size, size))  # (n, 3, size, size)
    power = (spec.abs() ** 2).sum(dim=1)  # summed over colour channels
    fy = torch.fft.fftfreq(size, dtype=torch.float64)
    fx = torch.fft.fftfreq(size, dtype=torch.float64)
    FY, FX = torch.meshgrid(fy, fx, indexing="ij")
    radius = torch.sqrt(FX**2 + FY**2)
    total = power.sum(dim=(1, 2)).clamp_min(1e-30)
    frequency = (power * radius).sum(dim=(1, 2)) / total
    flat = power.reshape(n, -1)
    peak = flat.argmax(dim=1)
    peak_frequency = radius.reshape(-1)[peak]
    # orientation: angle of the wave vector, from the non-DC spectrum (doubled angles)
    angle = torch.atan2(FY, FX)  # radians
    nondc = power.clone()
    nondc[:, 0, 0] = 0
    nondc_tot = nondc.sum(dim=(1, 2)).clamp_min(1e-30)
    c2 = (nondc * torch.cos(2 * angle)).sum(dim=(1, 2)) / nondc_tot
    s2 = (nondc * torch.sin(2 * angle)).sum(dim=(1, 2)) / nondc_tot
    orientedness = torch.sqrt(c2**2 + s2**2)
    orientation = (torch.rad2deg(0.5 * torch.atan2(s2, c2)) % 180.0)
    mean_colour = w.mean(dim=(2, 3))
    return RGBDescriptors(
        colourfulness=colourfulness.numpy(),
        frequency=frequency.numpy(),
        peak_frequency=peak_frequency.numpy(),
        orientation=orientation.numpy(),
        orientedness=orientedness.numpy(),
        mean_colour=mean_colour.numpy(),
    )


def rgb_categories(
    d: RGBDescriptors, colour_threshold: float = 1 / 3, oriented_threshold: float = 0.3
) -> dict[str, np.ndarray]:
    """Categorical descriptors: kind -> array of category names (None = undefined).

    ``colour``: colour if colourfulness >= threshold, else grey. Random filters sit
    at 2/3, a grey filter at 0, a pure opponent-colour filter at 1.
    ``frequency``: high above the median mean frequency, else low.
    ``orientation``: nearest of 0/45/90/135 degrees for oriented filters.
    """
    n = len(d.colourfulness)
    colour = np.where(d.colourfulness >= colour_threshold, "colour", "grey").astype(object)
    med = float(np.median(d.frequency)) if n else 0.0
    freq = np.where(d.frequency > med, "high", "low").astype(object)
    orient = np.empty(n, dtype=object)
    bins = np.round(d.orientation / 45.0).astype(int) % 4
    for i in range(n):
        orient[i] = f"{bins[i] * 45} deg" if d.orientedness[i] >= oriented_threshold else None
    return {"colour": colour, "frequency": freq, "orientation": orient}


# ---------------------------------------------------------------------------
# weight-pattern clusters


def pattern_matrix(w: torch.Tensor, side: str) -> torch.Tensor:
    """``|W|`` summed over kernel positions; rows are neurons.

    ``side="in"``: each output neuron's incoming pattern, shape ``(out, in)``.
    ``side="out"``: each input channel's outgoing pattern, shape ``(in, out)``.
    """
    a = w.detach().abs().to(torch.float64)
    if a.dim() > 2:
        a = a.reshape(a.shape[0], a.shape[1], -1).sum(-1)
    return a if side == "in" else a.t().contiguous()


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100, restarts: int = 4) -> np.ndarray:
    """Plain k-means (k-means++ seeding, several restarts, best inertia)."""
    x = x.to(torch.float64)
    n = x.shape[0]
    k = max(1, min(k, n))
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = x[torch.randint(n, (1,), generator=gen)]
        for _ in range(1, k):
            d2 = torch.cdist(x, centres).min(dim=1).values ** 2
            if float(d2.sum()) <= 0:
                idx = torch.randint(n, (1,), generator=gen)
            else:
                idx = torch.multinomial(d2 / d2.sum(), 1, generator=gen)
            centres = torch.cat([centres, x[idx]])
        labels = None
        for _ in range(iters):
            new = torch.cdist(x, centres).argmin(dim=1)
            if labels is not None and bool((new == labels).all()):
                break
            labels = new
            for j in range(k):
                m = labels == j
                if bool(m.any()):
                    centres[j] = x[m].mean(dim=0)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels.clone(), inertia
    return _relabel_by_size(best.numpy())


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster 0 is the largest, then 1 ... (stable names across runs)."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    remap = {int(old): new for new, old in enumerate(order)}
    return np.array([remap[int(v)] for v in labels])


def pattern_clusters(patterns: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """Cluster rows of a pattern matrix after scaling each row to unit length."""
    p = patterns.to(torch.float64)
    p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return kmeans(p, k, seed=seed)


# ---------------------------------------------------------------------------
# user labels


@dataclass
class UserLabels:
    """``labels[layer][neuron] = category`` from a CSV file."""

    labels: dict[str, dict[int, str]] = field(default_factory=dict)
    path: str = ""

    def for_layer(self, layer: str) -> dict[int, str]:
        return self.labels.get(layer) or self.labels.get("*", {})


def read_labels(path: str | Path) -> UserLabels:
    """Read ``layer,neuron,category`` rows (a header row with those names is
    optional; a two-column file ``neuron,category`` applies to every layer)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: no such labels file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: cannot read labels ({type(exc).__name__})") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"{p}: the labels file is empty")
    head = [c.strip().lower() for c in rows[0]]
    if "category" in head or "neuron" in head:
        rows = rows[1:]
    out: dict[str, dict[int, str]] = {}
    for line_no, r in enumerate(rows, start=2 if head and ("category" in head or "neuron" in head) else 1):
        cells = [c.strip() for c in r]
        if len(cells) == 2:
            layer, neuron, cat = "*", cells[0], cells[1]
        elif len(cells) == 3:
            layer, neuron, cat = cells
        else:
            raise UserError(f"{p}:{line_no}: expected layer,neuron,category (got {len(cells)} fields)")
        try:
            idx = int(neuron)
        except ValueError:
            raise UserError(f"{p}:{line_no}: neuron must be an integer channel index, got {neuron!r}") from None
        if idx < 0 or not cat:
            raise UserError(f"{p}:{line_no}: bad row {','.join(cells)!r}")
        out.setdefault(layer, {})[idx] = cat
    return UserLabels(out, str(p))
