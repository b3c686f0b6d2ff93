"""Small inline-SVG pictures drawn without matplotlib: cheap enough to make one per
layer of a 200-layer model (a few hundred microseconds and a few kB each).

Every function returns an ``<svg>`` element as a string. Text is XML-escaped
here; non-finite inputs (NaN, inf, non-positive values on a log axis) are
dropped, so every coordinate written is a finite number.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

# colour per group, in order of first appearance (colour-blind-safe Okabe-Ito)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999")


def _f(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") or "0"


def _finite(*vs) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(float(v)) for v in vs)


class _Axes:
    """Linear or log10 mapping of a data box onto a pixel box (y downwards)."""

    def __init__(self, x0, x1, y0, y1, box, logx=False, logy=False):
        self.logx, self.logy = logx, logy
        self.x0, self.x1 = self._t(x0, logx), self._t(x1, logx)
        self.y0, self.y1 = self._t(y0, logy), self._t(y1, logy)
        if not self.x1 > self.x0:
            self.x0, self.x1 = self.x0 - 0.5, self.x0 + 0.5
        if not self.y1 > self.y0:
            self.y0, self.y1 = self.y0 - 0.5, self.y0 + 0.5
        self.left, self.top, self.right, self.bottom = box

    @staticmethod
    def _t(v, log):
        return math.log10(v) if log else float(v)

    def px(self, x):
        return self.left + (self._t(x, self.logx) - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def py(self, y):
        return self.bottom - (self._t(y, self.logy) - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)


def _ticks(lo: float, hi: float, log: bool, n: int = 5) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, math.ceil((b - a) / n))
        return [10.0**e for e in range(a, b + 1, step) if lo <= 10.0**e <= hi] or [lo, hi]
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-12 * span and len(out) < 50:
        out.append(0.0 if abs(v) < 1e-12 * span else v)
        v += step
    return out


def _tick_label(v: float, log: bool) -> str:
    if log:
        e = math.log10(v)
        return f"1e{int(round(e))}" if abs(e - round(e)) < 1e-9 else f"{v:.2g}"
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _frame(ax: _Axes, W: int, H: int, xlabel: str, ylabel: str, title: str, xlog: bool, ylog: bool,
           xr: tuple[float, float], yr: tuple[float, float], xticks: bool = True) -> list[str]:
    out = [f'<rect x="{_f(ax.left)}" y="{_f(ax.top)}" width="{_f(ax.right - ax.left)}" '
           f'height="{_f(ax.bottom - ax.top)}" fill="none" stroke="#888" stroke-width="0.8"/>']
    if xticks:
        for t in _ticks(*xr, xlog):
            x = ax.px(t)
            out.append(f'<line x1="{_f(x)}" y1="{_f(ax.bottom)}" x2="{_f(x)}" y2="{_f(ax.bottom + 4)}" stroke="#888"/>')
            out.append(f'<text x="{_f(x)}" y="{_f(ax.bottom + 15)}" text-anchor="middle">{escape(_tick_label(t, xlog))}</text>')
    for t in _ticks(*yr, ylog):
        y = ax.py(t)
        out.append(f'<line x1="{_f(ax.left - 4)}" y1="{_f(y)}" x2="{_f(ax.left)}" y2="{_f(y)}" stroke="#888"/>')
        out.append(f'<text x="{_f(ax.left - 6)}" y="{_f(y + 3)}" text-anchor="end">{escape(_tick_label(t, ylog))}</text>')
    out.append(f'<text x="{_f((ax.left + ax.right) / 2)}" y="{H - 4}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{_f((ax.top + ax.bottom) / 2)}" text-anchor="middle" '
               f'transform="rotate(-90 12 {_f((ax.top + ax.bottom) / 2)})">{escape(ylabel)}</text>')
    if title:
        out.append(f'<text x="{_f(W / 2)}" y="13" text-anchor="middle" font-weight="600">{escape(title)}</text>')
    return out


def _svg(W: int, H: int, body: Iterable[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'role="img" aria-label={quoteattr(label)} font-family="sans-serif" font-size="10">'
            + "".join(body) + "</svg>")


def esd_svg(evals: Sequence[float], alpha: float = math.nan, xmin: float = math.nan, xmax: float = math.nan,
            n_tail: int = 0, title: str = "", bins: int = 40, width: int = 380, height: int = 250) -> str:
    """Log-log histogram (density) of positive eigenvalues, the fitted power law
    ``p(x) = (n_tail / n) (alpha - 1) / xmin (x / xmin)^-alpha`` on [xmin, xmax]
    dashed, and xmin as a vertical line."""
    ev = [float(v) for v in evals if _finite(v) and float(v) > 0]
    W, H = width, height
    box = (56, 22, W - 10, H - 34)
    if not ev:
        return _svg(W, H, [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">{escape(title)}: no positive eigenvalues</text>'],
                    f"{title}: no positive eigenvalues")
    top = max(ev)
    ev = [v for v in ev if v > top * 1e-9]  # numerically zero values only stretch the axis
    lo, hi = math.log10(min(ev)), math.log10(top)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = [10 ** (lo + (hi - lo) * i / bins) for i in range(bins + 1)]
    counts = [0] * bins
    for v in ev:
        j = min(bins - 1, int((math.log10(v) - lo) / (hi - lo) * bins))
        counts[max(j, 0)] += 1
    n = len(ev)
    dens = [c / (n * (edges[i + 1] - edges[i])) for i, c in enumerate(counts)]
    pos = [d for d in dens if d > 0]
    line = []
    if _finite(alpha, xmin) and alpha > 1 and xmin > 0 and n_tail > 0:
        xe = xmax if _finite(xmax) and xmax > xmin else top
        frac = n_tail / n
        for i in range(25):
            x = xmin * (xe / xmin) ** (i / 24)
            y = frac * (alpha - 1) / xmin * (x / xmin) ** (-alpha)
            if _finite(y) and y > 0:
                line.append((x, y))
    ys = pos + [y for _, y in line]
    ylo, yhi = min(ys) / 1.5, max(ys) * 1.5
    ax = _Axes(edges[0], edges[-1], ylo, yhi, box, logx=True, logy=True)
    body = _frame(ax, W, H, "eigenvalue of W^T W / N", "density", title, True, True, (edges[0], edges[-1]), (ylo, yhi))
    bars = []
    for i, d in enumerate(dens):
        if d <= 0:
            continue
        x0, x1, y = ax.px(edges[i]), ax.px(edges[i + 1]), ax.py(d)
        bars.append(f'<rect x="{_f(x0)}" y="{_f(y)}" width="{_f(max(x1 - x0 - 0.3, 0.3))}" height="{_f(ax.bottom - y)}"/>')
    body.append('<g fill="#0072B2" fill-opacity="0.55">' + "".join(bars) + "</g>")
    if line:
        pts = " ".join(f"{_f(ax.px(x))},{_f(min(max(ax.py(y), ax.top), ax.bottom))}" for x, y in line)
        body.append(f'<polyline points="{pts}" fill="none" stroke="#D55E00" stroke-width="1.6" stroke-dasharray="5,3"/>')
        xv = ax.px(xmin)
        if ax.left <= xv <= ax.right:
            body.append(f'<line x1="{_f(xv)}" y1="{_f(ax.top)}" x2="{_f(xv)}" y2="{_f(ax.bottom)}" stroke="#D55E00" '
                        f'stroke-opacity="0.6"/>')
        body.append(f'<text x="{_f(ax.right - 4)}" y="{_f(ax.top + 12)}" text-anchor="end" fill="#D55E00">'
                    f'{escape(f"alpha = {alpha:.2f}, tail {n_tail} of {n}")}</text>')
    return _svg(W, H, body, f"{title}: eigenvalue spectrum")


def scatter_svg(points: Sequence[tuple], title: str = "", xlabel: str = "", ylabel: str = "",
                band: tuple[float, float] | None = None, width: int = 760, height: int = 300,
                xticks: bool = True) -> str:
    """Scatter of ``(x, y, group, label)`` points, one colour per group (legend
    on top, in order of first appearance), an optional shaded y band, and the
    label as each point's tooltip. Points with a non-finite x or y are dropped."""
    pts = [(float(p[0]), float(p[1]), str(p[2]), str(p[3]) if len(p) > 3 else "") for p in points if _finite(p[0], p[1])]
    W, H = width, height
    groups: list[str] = []
    for p in pts:
        if p[2] not in groups:
            groups.append(p[2])
    box = (48, 36, W - 10, H - 32)
    if not pts:
        return _svg(W, H, [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">{escape(title)}: nothing to show</text>'],
                    f"{title}: nothing to show")
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    ylo, yhi = min(ys), max(ys)
    if band is not None:
        ylo, yhi = min(ylo, band[0]), max(yhi, band[1])
    pad = 0.05 * (yhi - ylo or 1.0)
    ylo, yhi = ylo - pad, yhi + pad
    xlo, xhi = min(xs) - 0.5, max(xs) + 0.5
    ax = _Axes(xlo, xhi, ylo, yhi, box)
    body = []
    if band is not None:
        y0, y1 = ax.py(band[1]), ax.py(band[0])
        body.append(f'<rect x="{_f(ax.left)}" y="{_f(y0)}" width="{_f(ax.right - ax.left)}" height="{_f(y1 - y0)}" '
                    f'fill="#009E73" fill-opacity="0.08"/>')
    body += _frame(ax, W, H, xlabel, ylabel, title, False, False, (xlo, xhi), (ylo, yhi), xticks=xticks)
    colour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    lx = 52
    for g in groups:
        body.append(f'<circle cx="{lx}" cy="27" r="4" fill="{colour[g]}"/>'
                    f'<text x="{lx + 7}" y="30">{escape(g)}</text>')
        lx += 14 + 6.5 * len(g)
    dots = []
    for x, y, g, lab in pts:
        tip = f"<title>{escape(lab)}</title>" if lab else ""
        dots.append(f'<circle cx="{_f(ax.px(x))}" cy="{_f(ax.py(y))}" r="3" fill="{colour[g]}" fill-opacity="0.85">{tip}</circle>')
    body.append("<g>" + "".join(dots) + "</g>")
    return _svg(W, H, body, title or "scatter")
