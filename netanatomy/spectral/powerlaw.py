"""Power-law fit of an eigenvalue tail (Clauset, Shalizi & Newman 2009) and the
likelihood-ratio comparison against a truncated power law and an exponential.

Everything here works on a 1-D array of positive eigenvalues; the xmin scan is
vectorised: with the eigenvalues sorted, the MLE for every candidate xmin comes
from one reverse cumulative sum of logs, and the KS distances of all candidates
are computed in blocks of a (candidates x eigenvalues) matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# KS distance variants, evaluated at the sorted tail values x_0 <= ... <= x_{n-1}:
# "plfit": max_j |F(x_j) - j/n|, as in Clauset's reference code plfit.m, the
#          `powerlaw` package and WeightWatcher 0.7.7 (the default here);
# "sup":   the exact supremum of |empirical CDF - F| over the tail, i.e. both sides
#          of every jump, max_j max(|F(x_j) - j/n|, |F(x_j) - (j+1)/n|). It never is
#          smaller than "plfit" and penalises short tails more (by up to 1/n).
KS_VARIANTS = ("plfit", "sup")


@dataclass
class PowerLawFit:
    """Result of :func:`fit_power_law`. Failed fits carry NaN and a ``reason``."""

    alpha: float = math.nan
    xmin: float = math.nan
    xmax: float = math.nan
    D: float = math.nan
    sigma: float = math.nan
    n_tail: int = 0
    n: int = 0
    reason: str | None = None
    # per-candidate arrays (for pictures / diagnostics); not serialised
    xmins: np.ndarray | None = field(default=None, repr=False)
    alphas: np.ndarray | None = field(default=None, repr=False)
    Ds: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.reason is None and math.isfinite(self.alpha)


def fit_power_law(
    evals,
    *,
    min_tail: int = 5,
    ks: str = "plfit",
    xmin: float | None = None,
    block_elems: int = 1 << 22,
    keep_scan: bool = False,
) -> PowerLawFit:
    """Fit p(x) ~ x^-alpha for x >= xmin to the positive values in ``evals``.

    For every candidate xmin (each distinct-position eigenvalue with at least
    ``min_tail`` eigenvalues at or above it) the MLE is
    ``alpha = 1 + n / sum(log(x_i / xmin))`` and the KS distance D between the
    empirical and fitted tail CDFs is computed; the candidate with the smallest D
    wins. ``xmin`` fixes the lower cut instead of scanning. ``sigma`` is the
    standard error ``(alpha - 1) / sqrt(n_tail)``.
    """
    if ks not in KS_VARIANTS:
        raise ValueError(f"ks must be one of {KS_VARIANTS}")
    x = torch.as_tensor(np.asarray(evals, dtype=np.float64)).reshape(-1)
    x = x[torch.isfinite(x) & (x > 0)]
    x, _ = torch.sort(x)
    n = int(x.numel())
    fit = PowerLawFit(n=n)
    if n == 0:
        fit.reason = "no positive eigenvalues"
        return fit
    fit.xmax = float(x[-1])
    min_tail = max(2, int(min_tail))
    if n < min_tail:
        fit.reason = f"too few positive eigenvalues for a tail fit ({n} < {min_tail})"
        return fit
    logx = torch.log(x)
    # suffix sums: S[i] = sum_{j >= i} log x_j
    S = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])
    m_all = torch.arange(n, 0, -1, dtype=torch.float64)  # tail sizes n - i

    if xmin is not None:
        i0 = int(torch.searchsorted(x, torch.tensor([float(xmin)], dtype=torch.float64))[0])
        if n - i0 < min_tail:
            fit.reason = f"fixed xmin leaves {n - i0} eigenvalues (< {min_tail})"
            return fit
        cand = torch.tensor([i0])
    else:
        cand = torch.arange(0, n - min_tail + 1)
    m = m_all[cand]
    denom = S[cand] - m * logx[cand]
    alphas = torch.where(denom > 0, 1.0 + m / denom, torch.full_like(denom, math.nan))
    Ds = torch.full_like(alphas, math.inf)
    valid = torch.isfinite(alphas) & (alphas > 1.0)

    # KS distances, in blocks of candidates so that memory stays bounded
    nc = int(cand.numel())
    step = max(1, block_elems // max(n, 1))
    j_all = torch.arange(n, dtype=torch.float64)
    safe_alphas = torch.where(valid, alphas, torch.full_like(alphas, 2.0))
    for b0 in range(0, nc, step):
        b1 = min(nc, b0 + step)
        ci = cand[b0:b1]
        lo = int(ci[0])  # columns left of the block's first candidate never count
        mm = m[b0:b1, None]
        # empirical CDF just below each tail value: (j - i) / m  (negative: not in the tail)
        E = (j_all[None, lo:] - ci[:, None].to(torch.float64)).div_(mm)
        # fitted CDF 1 - (x / xmin)^(1 - alpha)
        F = (logx[None, lo:] - logx[ci][:, None]).mul_(1.0 - safe_alphas[b0:b1, None]).expm1_().neg_()
        F.sub_(E)  # F - j/m
        if ks == "sup":
            d = torch.maximum(F.abs(), F.sub_(1.0 / mm).abs_())  # and F - (j+1)/m
        else:
            d = F.abs_()
        d.masked_fill_(E < 0, 0.0)
        Ds[b0:b1] = d.amax(dim=1)
    Ds = torch.where(valid & torch.isfinite(Ds), Ds, torch.full_like(Ds, math.inf))

    if keep_scan:
        fit.xmins = x[cand].numpy()
        fit.alphas = alphas.numpy()
        fit.Ds = Ds.numpy()
    if not bool(valid.any()) or not bool(torch.isfinite(Ds).any()):
        fit.reason = "no valid power-law candidate (degenerate spectrum: equal eigenvalues)"
        return fit
    k = int(torch.argmin(Ds))
    fit.alpha = float(alphas[k])
    fit.xmin = float(x[cand[k]])
    fit.D = float(Ds[k])
    fit.n_tail = int(m[k])
    fit.sigma = (fit.alpha - 1.0) / math.sqrt(fit.n_tail)
    return fit


# ---------------------------------------------------------------------------
# competing tail models (all defined on [xmin, inf), fitted to the same tail)


def _ll_power_law(x: np.ndarray, xmin: float, alpha: float) -> np.ndarray:
    return np.log(alpha - 1.0) - np.log(xmin) - alpha * np.log(x / xmin)


def _ll_exponential(x: np.ndarray, xmin: float) -> tuple[np.ndarray, float]:
    mean = float(np.mean(x - xmin))
    lam = 1.0 / mean if mean > 0 else math.inf
    return np.log(lam) - lam * (x - xmin), lam


_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(256)


def _tpl_log_norm(alpha: float, lam: float, xmin: float) -> float:
    """log Z, Z = int_xmin^inf x^-alpha e^(-lam x) dx, by 256-point Gauss-Legendre
    quadrature in u = log(x / xmin) over the range where the integrand matters."""
    c = lam * xmin
    upper = math.log1p(60.0 / c) if c > 0 else math.inf
    if alpha > 1:
        upper = min(upper, 60.0 / (alpha - 1.0))
    if not math.isfinite(upper):
        return math.inf  # alpha <= 1 without a cutoff: not normalisable
    u = (upper / 2.0) * (_GL_NODES + 1.0)
    logg = (1.0 - alpha) * u - c * np.expm1(u)
    mx = float(logg.max())
    val = float(np.dot(_GL_WEIGHTS, np.exp(logg - mx))) * upper / 2.0
    if not (val > 0):
        return math.inf
    return mx + math.log(val) + (1.0 - alpha) * math.log(xmin) - c


def nelder_mead(f, x0, xatol: float = 1e-4, fatol: float = 1e-7, maxiter: int = 1000) -> tuple[np.ndarray, float]:
    """Minimise ``f`` over R^n by the Nelder-Mead simplex (standard coefficients:
    reflection 1, expansion 2, contraction 0.5, shrink 0.5), with the initial
    simplex and the stopping rule of SciPy's ``method="Nelder-Mead"`` (each vertex
    moves one coordinate of x0 by 5 %, or by 0.00025 where it is zero; stop when
    every vertex lies within ``xatol`` and every value within ``fatol`` of the
    best). Here so that the tail comparison does not import scipy.optimize (about
    a second of every ``analyze`` process) for a two-parameter fit.

    The simplex is kept in Python floats: NumPy's per-call cost on two-element
    arrays was a third of the loop's time, all of it holding the GIL the layer
    threads share. Each step is the same floating-point operation as the NumPy
    version's (the centre is summed in NumPy's order), so results are the same
    to the last bit (tests/test_spectral.py). ``f`` receives a float64 array."""
    x0 = [float(v) for v in np.asarray(x0, dtype=np.float64).reshape(-1)]
    n = len(x0)
    sim = [list(x0)]
    for i in range(n):
        y = list(x0)
        y[i] = 1.05 * y[i] if y[i] != 0 else 0.00025
        sim.append(y)

    def call(v: list) -> float:
        return float(f(np.array(v, dtype=np.float64)))

    fs = [call(v) for v in sim]
    evals = n + 1
    for _ in range(maxiter):
        order = sorted(range(n + 1), key=lambda k: _sort_key(fs[k]))  # as argsort(kind="stable")
        sim, fs = [sim[k] for k in order], [fs[k] for k in order]
        best = sim[0]
        # "every difference <= tol" is "np.max(...) <= tol", NaN included (False)
        if (all(abs(v[j] - best[j]) <= xatol for v in sim[1:] for j in range(n))
                and all(abs(fs[0] - fv) <= fatol for fv in fs[1:])):
            break
        if evals >= 200 * n * 10:
            break
        centre = [_mean_of([v[j] for v in sim[:-1]]) for j in range(n)]
        worst = sim[-1]
        xr = [c + (c - w) for c, w in zip(centre, worst)]
        fr = call(xr)
        evals += 1
        if fr < fs[0]:
            xe = [c + 2.0 * (c - w) for c, w in zip(centre, worst)]
            fe = call(xe)
            evals += 1
            sim[-1], fs[-1] = (xe, fe) if fe < fr else (xr, fr)
            continue
        if fr < fs[-2]:
            sim[-1], fs[-1] = xr, fr
            continue
        if fr < fs[-1]:  # outside contraction
            xc = [c + 0.5 * (r - c) for c, r in zip(centre, xr)]
            fc = call(xc)
            evals += 1
            if fc <= fr:
                sim[-1], fs[-1] = xc, fc
                continue
        else:  # inside contraction
            xc = [c + 0.5 * (w - c) for c, w in zip(centre, worst)]
            fc = call(xc)
            evals += 1
            if fc < fs[-1]:
                sim[-1], fs[-1] = xc, fc
                continue
        sim[1:] = [[b + 0.5 * (v[j] - b) for j, b in enumerate(best)] for v in sim[1:]]  # shrink towards the best
        fs[1:] = [call(v) for v in sim[1:]]
        evals += n
    nans = [k for k, v in enumerate(fs) if v != v]
    k = nans[0] if nans else min(range(n + 1), key=fs.__getitem__)  # as argmin: the first NaN, else the first smallest
    return np.array(sim[k], dtype=np.float64), float(fs[k])


def _sort_key(v: float) -> tuple:
    return (1, 0.0) if v != v else (0, v)  # NaN last, as NumPy sorts


def _mean_of(vals: list) -> float:
    """A coordinate of the centre as ``simplex[:-1].mean(axis=0)`` computes it:
    NumPy reduces over the rows one after the other (axis 0 of a C-ordered
    array, so no pairwise summation), then divides by the count."""
    total = 0.0
    for v in vals:
        total += v
    return total / len(vals)


def _ll_truncated_power_law(x: np.ndarray, xmin: float, alpha0: float) -> tuple[np.ndarray, float, float]:
    """MLE of p(x) ~ x^-alpha e^(-lam x) on [xmin, inf); returns (loglik per point, alpha, lam).

    Nelder-Mead over (alpha, log lam), started from the power law (tiny lam) and
    from a few cutoffs inside the data range; two parameters need nothing more."""
    lx = np.log(x)
    sx = float(np.sum(x))
    slx = float(np.sum(lx))
    n = x.size
    span = float(np.max(x))

    def nll(p):
        alpha, loglam = p
        if not (-10.0 < alpha < 50.0) or loglam > 50.0:
            return 1e300
        lam = math.exp(loglam)
        z = _tpl_log_norm(alpha, lam, xmin)
        if not math.isfinite(z):
            return 1e300
        return alpha * slx + lam * sx + n * z

    best = None
    # the ratio needs the optimum to ~1e-6 in log-likelihood, not the parameters exactly
    for a0, l0 in ((alpha0, 1e-3 / span), (max(0.5, alpha0 - 1.0), 1.0 / span)):
        r = nelder_mead(nll, [a0, math.log(l0)], xatol=1e-4, fatol=1e-7, maxiter=1000)
        if best is None or r[1] < best[1]:
            best = r
    alpha, loglam = best[0]
    lam = math.exp(loglam)
    z = _tpl_log_norm(alpha, lam, xmin)
    return -alpha * lx - lam * x - z, float(alpha), float(lam)


@dataclass
class TailComparison:
    """Log-likelihood ratios on the power-law tail (positive favours the power law)."""

    R_tpl: float = math.nan  # sum loglik(PL) - loglik(TPL); <= 0 (nested)
    p_tpl: float = math.nan  # chi^2(1) p-value that the cutoff is not needed
    R_exp: float = math.nan  # normalised (Vuong) ratio PL vs exponential
    p_exp: float = math.nan  # two-sided p-value of the sign of R_exp
    tpl_alpha: float = math.nan
    tpl_lambda: float = math.nan
    exp_lambda: float = math.nan
    best: str | None = None


def compare_tail(evals, fit: PowerLawFit, p_threshold: float = 0.1) -> TailComparison:
    """Power law vs truncated power law (nested: Wilks' chi^2 with one degree of
    freedom) and vs exponential (non-nested: Vuong's normalised ratio). The
    chi^2(1) tail is erfc(sqrt(q / 2)) and the normal one erfc(|z| / sqrt(2)),
    from the standard library: no scipy import on the default path."""

    out = TailComparison()
    if not fit.ok or fit.n_tail < 3:
        return out
    x = np.asarray(evals, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x) & (x >= fit.xmin)]
    ll_pl = _ll_power_law(x, fit.xmin, fit.alpha)
    ll_exp, out.exp_lambda = _ll_exponential(x, fit.xmin)
    ll_tpl, out.tpl_alpha, out.tpl_lambda = _ll_truncated_power_law(x, fit.xmin, fit.alpha)

    # nested: the TPL cannot do worse than the PL at its own optimum
    R = float(np.sum(ll_pl) - np.sum(ll_tpl))
    R = min(R, 0.0)
    out.R_tpl = R
    out.p_tpl = math.erfc(math.sqrt(max(-2.0 * R, 0.0) / 2.0))

    diff = ll_pl - ll_exp
    if np.all(np.isfinite(diff)):
        sd = float(np.std(diff))
        n = diff.size
        if sd > 0:
            out.R_exp = float(np.sum(diff) / (math.sqrt(n) * sd))
            out.p_exp = math.erfc(abs(out.R_exp) / math.sqrt(2.0))

    best = "power_law"
    if out.p_tpl < p_threshold:
        best = "truncated_power_law"
    if math.isfinite(out.R_exp) and out.R_exp < 0 and out.p_exp < p_threshold:
        best = "exponential"
    out.best = best
    return out


# ---------------------------------------------------------------------------
# Hill estimator with a fixed tail (PL_Alpha_Hill)


def hill_alpha(evals, xmin_pos: float = 2.0, n_total: int | None = None) -> tuple[float, int]:
    """PL_Alpha_Hill as AlphaPruning computes it (``net_esd_estimator`` with
    ``fix_fingers="xmin_mid"``, Lu et al. 2024, arXiv:2410.10912).

    With the n positive values sorted ascending ``x_0 <= ... <= x_{n-1}``, the
    lower cut is ``i = floor(n / xmin_pos)`` (the median for the default 2), the
    tail is ``x_i .. x_{n-1}`` (k = n - i values, the cut itself included) and

        alpha = 1 + k / sum_{j >= i} log(x_j / x_i).

    ``n_total`` is n when ``evals`` holds only the top of the spectrum (a partial
    spectrum); NaN when the top k values are not all there.

    Returns ``(alpha, k)``; NaN when fewer than two values remain or they are all
    equal."""
    x = np.sort(np.asarray(evals, dtype=np.float64).reshape(-1))
    x = x[np.isfinite(x) & (x > 0)]
    n = x.size if n_total is None else int(n_total)
    if n < 2 or not (xmin_pos >= 1.0):
        return math.nan, 0
    i = int(n / xmin_pos)
    i = min(i, n - 2)  # at least two values in the tail
    if n - i > x.size:
        return math.nan, n - i
    tail = x[x.size - (n - i):]
    k = int(tail.size)
    denom = float(np.log(tail / tail[0]).sum())
    if not (denom > 0):
        return math.nan, k
    return 1.0 + k / denom, k
