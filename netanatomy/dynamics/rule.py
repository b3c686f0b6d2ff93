"""The IS / DS / undecided rule for one variance curve, stated as code.

Input: the per-layer curve ``v(x)`` of the mean-normalised variance of coupled
channel norms, with ``x[0]`` the initialisation (epoch 0) and ``T = x[-1] - x[0]``.

1. Smooth with a centred moving average of ``window`` points (5; shrinking at the
   ends). ``v0`` = the raw value at init.
2. ``peak`` = the largest smoothed value after the init point, reached at ``t_p``.
   ``final`` = the mean of the raw values over the last 20% of the points.
   ``sigma`` = the standard deviation of the residual (raw - smoothed).
3. Amplitude floor: if the smoothed curve spans ``floor`` (0.02) or less, the layer is
   ``undecided`` (noise, not a pattern).
4. **DS** (decrease to saturate: too narrow) when all of
   ``t_p - x[0] <= 2T/3``, ``peak - v0 >= k*sigma``, ``final <= (1 - tau) * peak`` and
   ``peak - final >= k*sigma`` (k = 3).
5. **IS** (increase to saturate: wide enough) when all of
   ``final >= (1 - tau) * peak``, ``final >= (1 + tau) * v0`` and ``final - v0 >= k*sigma``.
6. Otherwise ``undecided``.

``tau`` = 0.3 separates narrow from wide layers under a constant learning rate with
weight decay (DESIGN.md, measured on Fashion-MNIST MLPs and CNNs here); 0.15 is
enough with a cosine schedule.

Confidence, in [0, 1]: each condition ``i`` of a verdict has an excess ``e_i`` (how far
it is met; negative when it fails) and a scale ``s_i`` (``tau * peak`` for the ratio
tests, ``k * sigma`` for the noise tests, ``T / 3`` for the timing test); its score
is ``clip(0.5 + 0.5 * e_i / s_i, 0, 1)``. A verdict's score is the smallest of its
conditions' scores (>= 0.5 exactly when the verdict holds). The confidence of an IS or
DS verdict is its score; of ``undecided`` it is ``1 - 2 * max(score_DS, score_IS)``
clipped to [0, 1] (near 0 when a verdict was narrowly missed); of a flat curve
``1 - span / floor``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

IS, DS, UNDECIDED = "IS", "DS", "undecided"


@dataclass
class RuleOptions:
    tau: float = 0.3
    window: int = 5
    floor: float = 0.02
    k_sigma: float = 3.0
    final_share: float = 0.2
    peak_by: float = 2.0 / 3.0


@dataclass
class Verdict:
    label: str
    confidence: float
    v0: float
    peak: float
    t_peak: float
    final: float
    sigma: float
    span: float
    score_ds: float
    score_is: float
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def smooth(v: np.ndarray, window: int = 5) -> np.ndarray:
    """Centred moving average; the window shrinks at both ends."""
    v = np.asarray(v, dtype=float)
    h = max(0, int(window) // 2)
    out = np.empty_like(v)
    for i in range(len(v)):
        lo, hi = max(0, i - h), min(len(v), i + h + 1)
        out[i] = v[lo:hi].mean()
    return out


def _score(excess: float, scale: float) -> float:
    if not np.isfinite(excess):
        return 0.0
    scale = max(scale, 1e-12)
    return float(np.clip(0.5 + 0.5 * excess / scale, 0.0, 1.0))


def classify_curve(x, v, options: RuleOptions | None = None) -> Verdict:
    """IS / DS / undecided for one curve (see the module docstring)."""
    o = options or RuleOptions()
    x = np.asarray(x, dtype=float)
    v = np.asarray(v, dtype=float)
    ok = np.isfinite(v) & np.isfinite(x)
    x, v = x[ok], v[ok]
    if len(v) < 4:
        return Verdict(UNDECIDED, 0.0, *(float("nan"),) * 5, 0.0, 0.0, 0.0, [f"only {len(v)} points (need 4)"])
    s = smooth(v, o.window)
    v0 = float(v[0])
    i_peak = 1 + int(np.argmax(s[1:]))
    peak = float(s[i_peak])
    t_peak = float(x[i_peak])
    n_final = max(1, int(round(o.final_share * len(v))))
    final = float(v[-n_final:].mean())
    resid = v - s
    sigma = float(resid.std(ddof=1)) if len(v) > 2 else 0.0
    span = float(s.max() - s.min())
    T = float(x[-1] - x[0]) or 1.0
    ks = o.k_sigma * sigma

    ds_terms = {
        "peak early": ((x[0] + o.peak_by * T) - t_peak, T / 3.0),
        "rise above noise": ((peak - v0) - ks, max(ks, 1e-6)),
        "final below (1-tau) peak": ((1 - o.tau) * peak - final, o.tau * max(peak, 1e-12)),
        "drop above noise": ((peak - final) - ks, max(ks, 1e-6)),
    }
    is_terms = {
        "final near peak": (final - (1 - o.tau) * peak, o.tau * max(peak, 1e-12)),
        "final above (1+tau) v0": (final - (1 + o.tau) * v0, o.tau * max(abs(v0), 1e-12)),
        "rise above noise": ((final - v0) - ks, max(ks, 1e-6)),
    }
    ds_scores = {k: _score(e, sc) for k, (e, sc) in ds_terms.items()}
    is_scores = {k: _score(e, sc) for k, (e, sc) in is_terms.items()}
    # a condition holds exactly when its excess is >= 0
    ds_ok = all(e >= 0 for e, _ in ds_terms.values())
    is_ok = all(e >= 0 for e, _ in is_terms.values())
    score_ds, score_is = min(ds_scores.values()), min(is_scores.values())
    base = dict(v0=v0, peak=peak, t_peak=t_peak, final=final, sigma=sigma, span=span, score_ds=score_ds, score_is=score_is)
    if span <= o.floor:
        conf = float(np.clip(1 - span / o.floor, 0, 1)) if o.floor > 0 else 1.0
        return Verdict(UNDECIDED, conf, reasons=[f"curve spans {span:.3g} <= floor {o.floor:g}"], **base)
    if ds_ok and not is_ok:
        return Verdict(DS, max(0.5, score_ds), reasons=[f"{k}" for k in ds_terms], **base)
    if is_ok and not ds_ok:
        return Verdict(IS, max(0.5, score_is), reasons=[f"{k}" for k in is_terms], **base)
    if is_ok and ds_ok:  # cannot both hold with tau > 0; kept for safety
        label = DS if score_ds >= score_is else IS
        return Verdict(label, 0.5, reasons=["both rules hold"], **base)
    failed = [f"DS: {k} fails" for k, (e, _) in ds_terms.items() if e < 0]
    failed += [f"IS: {k} fails" for k, (e, _) in is_terms.items() if e < 0]
    conf = float(np.clip(1 - 2 * max(score_ds, score_is), 0, 1))
    return Verdict(UNDECIDED, conf, reasons=failed, **base)


def stages(x, v, sign=None, threshold_lo: float = 0.1, threshold_hi: float = 0.9, window: int = 5) -> dict:
    """The three training stages of one curve.

    Early stage: from init until the smoothed curve first climbs ``threshold_lo`` of
    the way from ``v0`` to its peak; rapid growth: until it first reaches
    ``threshold_hi`` of the way; saturation: after that. ``sign`` (the sign-change
    share, same x) adds the share at the end of the early stage and at epoch 5.
    """
    x = np.asarray(x, dtype=float)
    v = np.asarray(v, dtype=float)
    out = {"early_end": float("nan"), "growth_end": float("nan")}
    if len(v) < 3:
        return out
    s = smooth(v, window)
    v0 = float(v[0])
    peak = float(s[1:].max())
    rise = peak - v0
    if rise > 0:
        lo = np.nonzero(s >= v0 + threshold_lo * rise)[0]
        hi = np.nonzero(s >= v0 + threshold_hi * rise)[0]
        lo = lo[lo > 0]
        hi = hi[hi > 0]
        if len(lo):
            out["early_end"] = float(x[lo[0]])
        if len(hi):
            out["growth_end"] = float(x[hi[0]])
    if sign is not None:
        sign = np.asarray(sign, dtype=float)
        i5 = int(np.argmin(np.abs(x - 5))) if len(x) else 0
        out["sign_changed_at_5"] = float(sign[i5]) if len(sign) else float("nan")
        out["sign_changed_at_5_x"] = float(x[i5]) if len(x) else float("nan")
    return out
