"""Metrics of one ESD: norms, ranks, entropy, the Marchenko-Pastur bulk fit and
the comparison with the ESD of the entry-shuffled matrix.

Scales: ``Spectrum.evals`` are normalised (``sigma^2 / N``); the norm metrics
(log_norm, log_spectral_norm, alpha_weighted, log_alpha_norm) use the
unnormalised ``sigma^2`` so that they equal the usual definitions on ``W`` (and
WeightWatcher's numbers) and do not depend on how a conv layer is sliced.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .esd import EPS64, Spectrum


def norm_metrics(sp: Spectrum, alpha: float) -> dict:
    raw = sp.raw_evals
    lmax = float(raw[-1]) if raw.size else 0.0
    out: dict = {}
    if lmax <= 0 or sp.fro2 <= 0:
        out.update(
            log_norm=math.nan if sp.fro2 <= 0 else math.log10(sp.fro2),
            log_spectral_norm=math.nan,
            alpha_weighted=math.nan,
            log_alpha_norm=math.nan,
            stable_rank=math.nan,
            matrix_rank=0,
            entropy=math.nan,
        )
        return out
    out["log_norm"] = math.log10(sp.fro2)
    out["log_spectral_norm"] = math.log10(lmax)
    out["alpha_weighted"] = alpha * math.log10(lmax) if math.isfinite(alpha) else math.nan
    if math.isfinite(alpha):
        pos = raw[raw > 0]
        # log10(sum lambda^alpha) without overflow
        la = alpha * np.log(pos)
        mx = float(la.max())
        out["log_alpha_norm"] = (mx + math.log(float(np.exp(la - mx).sum()))) / math.log(10.0)
    else:
        out["log_alpha_norm"] = math.nan
    out["stable_rank"] = sp.fro2 / lmax
    if getattr(sp, "partial", False):
        # rank and entropy need every eigenvalue; log_alpha_norm above sums the
        # computed top only (the omitted values are the smallest: a lower bound)
        out["matrix_rank"] = None
        out["entropy"] = math.nan
        return out
    rank = matrix_rank(sp)
    out["matrix_rank"] = rank
    out["entropy"] = matrix_entropy(raw, rank)
    return out


def matrix_rank(sp: Spectrum) -> int:
    """Number of singular values above max(N * eps64 * sigma_max, resolution).

    The first term is numpy's ``matrix_rank`` tolerance; the second is the
    resolution of the Gram + eigvalsh computation (relevant only in float32, where
    singular values below about 1e-3 * sigma_max are not resolved)."""
    lmax = sp.lambda_max
    tol = max((sp.N * EPS64) ** 2 * lmax, sp.floor)
    return int(np.count_nonzero(sp.evals > tol))


def matrix_entropy(raw: np.ndarray, rank: int) -> float:
    """Shannon entropy of the normalised eigenvalues, divided by log(rank) (1 for a
    flat spectrum)."""
    total = float(raw.sum())
    if total <= 0 or rank <= 1:
        return math.nan
    p = raw[raw > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(rank))


# ---------------------------------------------------------------------------
# Marchenko-Pastur


def mp_edges(var: float, y: float) -> tuple[float, float]:
    """Bulk edges of W^T W / N for i.i.d. entries of variance ``var``, y = M/N <= 1."""
    r = math.sqrt(y)
    return var * (1 - r) ** 2, var * (1 + r) ** 2


def tw_margin(var: float, N: int, M: int) -> float:
    """One Tracy-Widom scale of the largest eigenvalue of W^T W / N (Johnstone 2001)."""
    a, b = math.sqrt(max(N - 1, 1)), math.sqrt(M)
    return var * (a + b) * (1 / a + 1 / b) ** (1 / 3) / N


@functools.lru_cache(maxsize=256)
def _mp_cdf_table(y: float, points: int = 4001) -> tuple[np.ndarray, np.ndarray]:
    """(x, CDF) of the unit-variance MP law for ratio y, on the continuous part."""
    a, b = mp_edges(1.0, y)
    th = np.linspace(0.0, math.pi / 2, points)
    x = a + (b - a) * np.sin(th) ** 2
    # density * dx/dtheta = (b-a)^2 2 sin^2 cos^2 / (2 pi y x); finite at x = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (b - a) ** 2 * 2 * np.sin(th) ** 2 * np.cos(th) ** 2 / (2 * math.pi * y * x)
    # at theta = 0: 0 when a > 0; the limit b cos^2(0) / (pi y) when a = 0 (y = 1)
    g[0] = 0.0 if a > 0 else b / (math.pi * y)
    cdf = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(th))])
    cdf /= cdf[-1]
    return x, cdf


def mp_quantile(q: float, y: float) -> float:
    x, cdf = _mp_cdf_table(round(float(y), 6))
    return float(np.interp(q, cdf, x))


def mp_fit(sp: Spectrum, tw_sigmas: float = 4.0) -> dict:
    """Fit the MP bulk by matching the median eigenvalue (spikes barely move it).

    ``sigma_mp`` is the implied entry standard deviation, ``mp_lambda_minus`` /
    ``mp_lambda_plus`` the bulk edges (normalised units), ``num_spikes`` the
    eigenvalues above ``lambda_plus`` plus ``tw_sigmas`` Tracy-Widom scales,
    ``mp_softrank = lambda_plus / lambda_max``.
    """
    ev = sp.evals
    out = dict(sigma_mp=math.nan, mp_lambda_minus=math.nan, mp_lambda_plus=math.nan, num_spikes=None, mp_softrank=math.nan)
    if ev.size < 2 or sp.lambda_max <= 0:
        return out
    y = sp.M / sp.N
    med = float(np.median(ev))
    qmed = mp_quantile(0.5, y)
    if med <= 0 or qmed <= 0:
        return out
    var = med / qmed
    lo, hi = mp_edges(var, y)
    thr = hi + tw_sigmas * tw_margin(var, sp.N, sp.M)
    out.update(
        sigma_mp=math.sqrt(var),
        mp_lambda_minus=lo,
        mp_lambda_plus=hi,
        num_spikes=int(np.count_nonzero(ev > thr)),
        mp_softrank=hi / sp.lambda_max,
    )
    return out


# ---------------------------------------------------------------------------
# randomisation


def js_distance(a: np.ndarray, b: np.ndarray, bins: int = 100) -> float:
    """Jensen-Shannon distance (natural log; 0 .. sqrt(log 2)) between the
    histograms of log10 eigenvalues of two ESDs on common bins."""
    a = a[a > 0]
    b = b[b > 0]
    if a.size == 0 or b.size == 0:
        return math.nan
    la, lb = np.log10(a), np.log10(b)
    lo, hi = min(la.min(), lb.min()), max(la.max(), lb.max())
    if hi <= lo:
        return 0.0
    edges = np.linspace(lo, hi, bins + 1)
    p = np.histogram(la, edges)[0].astype(float)
    q = np.histogram(lb, edges)[0].astype(float)
    p /= p.sum()
    q /= q.sum()
    m = (p + q) / 2
    def kl(u, v):
        mask = u > 0
        return float((u[mask] * np.log(u[mask] / v[mask])).sum())
    return math.sqrt(max(0.0, (kl(p, m) + kl(q, m)) / 2))


def randomization_metrics(sp: Spectrum, rand: Spectrum, entry_var: float, tw_sigmas: float = 4.0) -> dict:
    """Compare the ESD with that of the entry-shuffled matrix.

    A shuffled matrix has i.i.d. entries drawn from W's own entries, so its ESD
    should be MP with variance ``entry_var``; eigenvalues above that edge (plus
    ``tw_sigmas`` Tracy-Widom scales) are correlation traps: structure that
    survives shuffling, i.e. a few unusually large entries.
    """
    y = sp.M / sp.N
    _, hi = mp_edges(entry_var, y)
    thr = hi + tw_sigmas * tw_margin(entry_var, sp.N, sp.M)
    rmax = rand.lambda_max
    return {
        "rand_lambda_max": rmax,
        "rand_mp_lambda_plus": hi,
        "rand_distance": js_distance(sp.evals, rand.evals),
        "rand_softrank": rmax / sp.lambda_max if sp.lambda_max > 0 else math.nan,
        "num_traps": int(np.count_nonzero(rand.evals > thr)),
    }
