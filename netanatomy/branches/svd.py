"""SVD maps of the connections between two consecutive conv layers.

``M = |W2|`` summed over kernel positions, arranged as ``(in x out)``: rows are
layer-1 neurons, columns layer-2 neurons. ``M = U S V^T``; layer-1 neurons are
placed by the left singular vectors (columns of ``U``), layer-2 neurons by the
right ones. The uncentred SVD's first vector of a non-negative matrix is the
all-positive Perron vector (roughly "how strongly connected"); the centred
variant subtracts the mean row first (PCA of the layer-1 neurons' outgoing
patterns), so its first vector is the main direction of variation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class SVDMap:
    """One variant (uncentred or centred) of the map between two layers."""

    variant: str
    singular_values: np.ndarray
    left: np.ndarray  # (in, k): layer-1 neuron coordinates
    right: np.ndarray  # (out, k): layer-2 neuron coordinates

    @property
    def explained(self) -> np.ndarray:
        s2 = self.singular_values**2
        return s2 / s2.sum() if s2.sum() > 0 else s2


@dataclass
class PairMaps:
    layer1: str
    layer2: str
    maps: dict[str, SVDMap]
    correlations: list[dict] = field(default_factory=list)  # variant, sv, descriptor, r

    def headline(self, min_abs_r: float = 0.0) -> str:
        if not self.correlations:
            return ""
        best = max(self.correlations, key=lambda c: abs(c["r"]) if math.isfinite(c["r"]) else -1)
        if not math.isfinite(best["r"]) or abs(best["r"]) < min_abs_r:
            return ""
        return f"SV{best['sv']} ({best['variant']}) vs {best['descriptor']}: r = {best['r']:.2f}"


def connection_matrix(w2: torch.Tensor) -> torch.Tensor:
    """``|W2|`` summed over kernel positions, as ``(in x out)``."""
    a = w2.detach().abs().to(torch.float64)
    if a.dim() > 2:
        a = a.reshape(a.shape[0], a.shape[1], -1).sum(-1)
    return a.t().contiguous()


def svd_maps(w2: torch.Tensor, k: int = 4, device: torch.device | str | None = None) -> dict[str, SVDMap]:
    """Uncentred and centred SVD of the connection matrix, the first ``k`` vectors.

    Signs are fixed so that each left vector's largest-magnitude entry is positive
    (uncentred SV0 then comes out all-positive)."""
    m = connection_matrix(w2)
    if device is not None:
        m = m.to(device)
    out = {}
    for variant in ("uncentred", "centred"):
        x = m - m.mean(dim=0, keepdim=True) if variant == "centred" else m
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        kk = min(k, s.numel())
        u, s, v = u[:, :kk], s[:kk], vh[:kk].t()
        idx = u.abs().argmax(dim=0)
        sign = torch.sign(u[idx, torch.arange(kk, device=u.device)])
        sign[sign == 0] = 1
        u, v = u * sign, v * sign
        out[variant] = SVDMap(variant, s.cpu().numpy(), u.cpu().numpy(), v.cpu().numpy())
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    d = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / d) if d > 0 else math.nan


def correlate(maps: dict[str, SVDMap], descriptors: dict[str, np.ndarray]) -> list[dict]:
    """Pearson r of each left singular vector with each layer-1 descriptor."""
    rows = []
    for variant, mp in maps.items():
        for j in range(mp.left.shape[1]):
            for name, vals in descriptors.items():
                rows.append({"variant": variant, "sv": j, "descriptor": name, "r": pearson(mp.left[:, j], vals)})
    return rows


def separation_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """How well ``scores`` separate positive from negative neurons: the area under
    the ROC curve, folded so that 0.5 is chance and 1 perfect (sign-free)."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=float)
    pos = np.asarray(positive, dtype=bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    r = rankdata(s)
    auc = (r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(max(auc, 1 - auc))
