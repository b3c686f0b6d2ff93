"""Specialization statistics: do features of one kind gather in one branch?

For a population of ``n`` neurons split into branches, a feature category held
by ``K`` of them, and a branch of ``b`` neurons that holds ``k`` of the ``K``,
the chance of at least ``k`` under random placement is the hypergeometric tail
``P(X >= k)``, ``X ~ Hypergeom(n, K, b)``. When ``k == K`` this is
``C(b, K) / C(n, K)``: all 9 of 9 in a branch of 32 of 256 is 2.5e-9; all 30 of
30 in 96 of 480 is 1.7e-23 (the Distill article's two numbers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def hypergeom_tail(k: int, n: int, b: int, K: int) -> float:
    """P(X >= k) for X the number of the ``K`` marked neurons that land in a branch
    of ``b`` out of ``n`` neurons."""
    from scipy.stats import hypergeom

    if k <= 0:
        return 1.0
    return float(hypergeom(n, K, b).sf(k - 1))


def all_in_branch_probability(K: int, b: int, n: int) -> float:
    """C(b, K) / C(n, K): all ``K`` features in one branch of ``b`` of ``n``."""
    if K > b:
        return 0.0
    return math.exp(math.lgamma(b + 1) - math.lgamma(K + 1) - math.lgamma(b - K + 1)
                    - (math.lgamma(n + 1) - math.lgamma(K + 1) - math.lgamma(n - K + 1)))


def adjust(pvalues: Sequence[float], method: str = "holm") -> list[float]:
    """Multiple-testing adjustment: ``holm`` (default), ``bonferroni``, ``bh``
    (Benjamini-Hochberg false discovery rate) or ``none``."""
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0 or method == "none":
        return p.tolist()
    if method == "bonferroni":
        return np.minimum(p * m, 1.0).tolist()
    order = np.argsort(p, kind="stable")
    out = np.empty(m)
    if method == "holm":
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * p[i]))
            out[i] = running
        return out.tolist()
    if method == "bh":
        running = 1.0
        for rank in range(m - 1, -1, -1):
            i = order[rank]
            running = min(running, p[i] * m / (rank + 1))
            out[i] = min(running, 1.0)
        return out.tolist()
    raise ValueError(f"unknown correction {method!r} (holm, bonferroni, bh, none)")


@dataclass
class Test:
    """One branch x category count."""

    descriptor: str  # colour, frequency, orientation, in_cluster, out_cluster, label
    category: str
    branch: int
    branch_name: str
    count: int  # k: neurons of the category in the branch
    total: int  # K: neurons of the category in the population
    branch_size: int  # b: neurons of the branch with the descriptor defined
    population: int  # n
    expected: float
    p: float
    p_adjusted: float = math.nan
    unit: str = "neurons"

    def sentence(self) -> str:
        return (
            f"{self.branch_name} holds {self.count} of {self.total} {self.category} {self.unit} "
            f"(expected {self.expected:.1f}), p = {_fmt_p(self.p_adjusted if not math.isnan(self.p_adjusted) else self.p)}"
        )

    def to_dict(self) -> dict:
        return {
            "descriptor": self.descriptor,
            "category": self.category,
            "branch": self.branch,
            "branch_name": self.branch_name,
            "count": self.count,
            "total": self.total,
            "branch_size": self.branch_size,
            "population": self.population,
            "expected": self.expected,
            "enrichment": self.count / self.expected if self.expected > 0 else math.nan,
            "p": self.p,
            "p_adjusted": self.p_adjusted,
            "sentence": self.sentence(),
        }


def _fmt_p(p: float) -> str:
    if p >= 0.01:
        return f"{p:.2f}"
    return f"{p:.1e}".replace("e-0", "e-")


def category_tests(
    descriptor: str,
    categories: Sequence,
    branches: Sequence[int],
    branch_names: Sequence[str],
    unit: str = "neurons",
) -> list[Test]:
    """Every (branch, category) count for one categorical descriptor.

    ``categories[i]`` is neuron i's category (None: undefined, left out of the
    population); ``branches[i]`` its branch index.
    """
    cats = list(categories)
    br = np.asarray(branches)
    keep = np.array([c is not None and not (isinstance(c, float) and math.isnan(c)) for c in cats], dtype=bool)
    if keep.sum() == 0:
        return []
    cats_k = np.array([str(c) for c, k in zip(cats, keep) if k], dtype=object)
    br_k = br[keep]
    n = int(keep.sum())
    tests: list[Test] = []
    for cat in sorted(set(cats_k)):
        K = int((cats_k == cat).sum())
        for bi in sorted(set(br_k.tolist())):
            b = int((br_k == bi).sum())
            k = int(((cats_k == cat) & (br_k == bi)).sum())
            tests.append(
                Test(
                    descriptor=descriptor,
                    category=cat,
                    branch=int(bi),
                    branch_name=branch_names[int(bi)] if int(bi) < len(branch_names) else f"branch {bi}",
                    count=k,
                    total=K,
                    branch_size=b,
                    population=n,
                    expected=K * b / n,
                    p=hypergeom_tail(k, n, b, K),
                    unit=unit,
                )
            )
    return tests


def continuous_tests(name: str, values: np.ndarray, branches: Sequence[int], branch_names: Sequence[str]) -> list[dict]:
    """Per branch: its median and the two-sided Mann-Whitney p-value against the
    other branches' neurons."""
    from scipy.stats import mannwhitneyu

    v = np.asarray(values, dtype=float)
    br = np.asarray(branches)
    ok = np.isfinite(v)
    out = []
    for bi in sorted(set(br[ok].tolist())):
        inside, outside = v[ok & (br == bi)], v[ok & (br != bi)]
        if len(inside) < 2 or len(outside) < 2:
            continue
        try:
            p = float(mannwhitneyu(inside, outside, alternative="two-sided").pvalue)
        except ValueError:
            p = math.nan
        out.append(
            {
                "descriptor": name,
                "branch": int(bi),
                "branch_name": branch_names[int(bi)] if int(bi) < len(branch_names) else f"branch {bi}",
                "median": float(np.median(inside)),
                "median_others": float(np.median(outside)),
                "mwu_p": p,
            }
        )
    return out


def apply_correction(tests: list[Test], method: str) -> None:
    for t, q in zip(tests, adjust([t.p for t in tests], method)):
        t.p_adjusted = q
