"""Model soups (Wortsman et al. 2022): uniform and greedy.

* uniform soup: the mean of all members (:func:`netanatomy.synthesis.average`);
* greedy soup: score every member on held-out data, sort best first, start the
  soup with the best member and add each next member only if the uniform mean of
  the soup with it scores at least as well as the soup without it. On the
  held-out data used for the choice the greedy soup therefore never scores below
  the best single member (given a deterministic evaluator).

Members are paths, state dicts or modules that share keys and shapes (e.g.
fine-tuned from one start). Candidate soups are computed by the streaming
average (float64, per key) and handed to the evaluator as state dicts; a
command evaluator receives them as temporary safetensors files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..io import CheckpointLike, open_store
from .average import AverageResult, average
from .evaluate import as_evaluator, pick, scores_of


@dataclass
class SoupResult:
    method: str  # "uniform" or "greedy"
    members: list[str]
    ingredients: list[str]  # members in the soup, in the order added
    member_scores: dict[str, float] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)  # greedy: one row per candidate
    score: float | None = None  # the soup's score (when an evaluator was given)
    higher_is_better: bool = True
    average: AverageResult | None = None

    @property
    def best_member(self) -> tuple[str, float] | None:
        if not self.member_scores:
            return None
        key = max if self.higher_is_better else min
        name = key(self.member_scores, key=self.member_scores.get)
        return name, self.member_scores[name]

    @property
    def tensors(self) -> dict[str, torch.Tensor] | None:
        return self.average.tensors if self.average else None

    def summary(self) -> dict:
        best = self.best_member
        d = {
            "method": self.method,
            "members": len(self.members),
            "ingredients": self.ingredients,
            "score": self.score,
            "best_member": best[0] if best else None,
            "best_member_score": best[1] if best else None,
            "higher_is_better": self.higher_is_better,
        }
        if self.average is not None:
            d.update({k: v for k, v in self.average.summary().items() if k in ("out", "content_sha256", "file_sha256")})
        return d

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.steps)


def _materialize(src) -> dict[str, torch.Tensor]:
    return {k: src.get(k) for k in src.keys()}


def _score(evaluate, obj, metric) -> float:
    if isinstance(obj, (str, os.PathLike)) and hasattr(evaluate, "run_on_file"):
        value = evaluate.run_on_file(obj)
    else:
        src = open_store(obj) if not isinstance(obj, dict) else None
        value = evaluate(obj if isinstance(obj, dict) else _materialize(src))
    return pick(scores_of(value), metric)


def uniform_soup(
    members: Sequence[CheckpointLike],
    out: str | os.PathLike | None = None,
    *,
    evaluate: Any = None,
    metric: str | None = None,
    higher_is_better: bool = True,
    score_members: bool = False,
    timeout: float = 600.0,
    **avg_kw,
) -> SoupResult:
    """The mean of all members; scored (and members scored) when ``evaluate`` is given."""
    if not members:
        raise UserError("a soup needs at least one member")
    ev = as_evaluator(evaluate, timeout) if evaluate is not None else None
    labels = [_label(m, i) for i, m in enumerate(members)]
    res = SoupResult("uniform", labels, list(labels), higher_is_better=higher_is_better)
    if ev is not None and score_members:
        for lab, m in zip(labels, members):
            res.member_scores[lab] = _score(ev, m, metric)
    avg = average(members, out, method="uniform_soup", keep_in_memory=ev is not None or out is None, **avg_kw)
    res.average = avg
    if ev is not None:
        res.score = pick(scores_of(ev(avg.tensors)), metric)
        if out is not None and not avg_kw.get("keep_in_memory"):
            avg.tensors = None
    return res


def greedy_soup(
    members: Sequence[CheckpointLike],
    evaluate: Any,
    out: str | os.PathLike | None = None,
    *,
    metric: str | None = None,
    higher_is_better: bool = True,
    timeout: float = 600.0,
    member_scores: dict[int, float] | None = None,
    **avg_kw,
) -> SoupResult:
    """Greedy soup: add members best-first while the held-out score does not drop.

    ``evaluate`` scores a state dict on held-out data (a callable or a command);
    ``higher_is_better=False`` for losses. ``member_scores`` (index -> score)
    skips re-scoring members whose score is known.
    """
    if not members:
        raise UserError("a soup needs at least one member")
    ev = as_evaluator(evaluate, timeout)
    labels = [_label(m, i) for i, m in enumerate(members)]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    scores = []
    for i, m in enumerate(members):
        s = member_scores[i] if member_scores and i in member_scores else _score(ev, m, metric)
        scores.append(float(s))
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(members)), key=lambda i: (-sign * scores[i], i))
    res = SoupResult("greedy", labels, [labels[order[0]]], {labels[i]: scores[i] for i in range(len(members))}, higher_is_better=higher_is_better)
    soup = [order[0]]
    current = scores[order[0]]
    res.steps.append({"step": 0, "candidate": labels[order[0]], "candidate_score": current, "soup_score": current, "accepted": True, "soup_size": 1})
    for step, i in enumerate(order[1:], start=1):
        cand = average([members[j] for j in soup + [i]], None, method="greedy_candidate", **avg_kw)
        s = pick(scores_of(ev(cand.tensors)), metric)
        accepted = sign * s >= sign * current
        if accepted:
            soup.append(i)
            current = s
            res.ingredients.append(labels[i])
        res.steps.append(
            {"step": step, "candidate": labels[i], "candidate_score": scores[i], "soup_score": s, "accepted": accepted, "soup_size": len(soup)}
        )
        del cand
    res.score = current
    meta = {"netanatomy.soup_ingredients": ",".join(labels[j] for j in soup)}
    res.average = average([members[j] for j in soup], out, method="greedy_soup", metadata=meta, **avg_kw)
    return res


def _label(m, i: int) -> str:
    if isinstance(m, (str, os.PathLike)):
        return os.path.basename(os.fspath(m).rstrip("/")) or os.fspath(m)
    src = getattr(m, "name", None)
    return src if isinstance(src, str) else f"member {i}"
