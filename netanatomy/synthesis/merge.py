"""Merging fine-tuned models through their task vectors, and spherical interpolation.

A *task vector* is what fine-tuning added to a base: ``tau_i = m_i - base``
(Ilharco et al. 2023). Every method works tensor by tensor, in float64, on the
tensors the layer filter selects; the result is cast to the base's dtype
(clamped to its finite range, as :func:`~netanatomy.synthesis.average` does):

* :func:`task_arithmetic`: ``base + lam * sum_i w_i tau_i`` (Ilharco et al. 2023);
* :func:`ties` (TIES-Merging, Yadav et al. 2023): each ``tau_i`` trimmed to its
  ``ceil(density_i * n)`` entries of largest magnitude (the rest set to zero);
  per entry the elected sign is ``sign(sum_i w_i trim(tau_i))``; the *disjoint
  mean* averages, per entry, only the members whose trimmed entry is nonzero and
  has the elected sign, ``sum_{i in A} w_i trim(tau_i) / sum_{i in A} w_i`` (with
  unit weights the plain mean over ``A``; zero where ``A`` is empty); the result
  is ``base + lam * merged``;
* :func:`dare_linear` / :func:`dare_ties` (DARE, Yu et al. 2024): each entry of
  each ``tau_i`` is dropped with probability ``p`` and the survivors rescaled by
  ``1 / (1 - p)`` (so the expected task vector is unchanged), then summed with
  weights as in task arithmetic, or combined by TIES' sign election and disjoint
  mean (no further trimming);
* :func:`model_stock` (Jang et al. 2024): per tensor, ``base + t * mean_i tau_i``
  with ``t = k cos / (1 + (k - 1) cos)``, ``cos`` the mean pairwise cosine of the
  ``k`` task vectors;
* :func:`slerp` (Shoemake 1985): per tensor, with ``theta`` the angle between
  the two flattened tensors, ``sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b``;
  linear interpolation where they are nearly parallel (``|cos theta| > 1 - 1e-6``)
  or either is zero.

Tensors outside the layer filter (``include`` / ``exclude``: ``fnmatch`` globs
on tensor names) and non-float or complex tensors are copied from the base
(from A for slerp), and the result's notes say how many.

Randomness (DARE) is drawn per tensor and member from a generator seeded by
``seed``, ``zlib.crc32`` of the tensor name and the member's index, so the
result depends on the seed alone, not on the order the tensors are visited in.

Memory. With safetensors, ``.npz`` or in-memory inputs the work goes tensor by
tensor and the output is streamed to disk: a few float64 copies of one tensor
are live at a time, however many members there are (TIES and DARE-TIES read each
member's tensor twice, once to elect the sign and once for the disjoint mean,
rather than hold them all). Memory-mapped PyTorch checkpoints keep every page
they touch resident while open, so they can cost up to the inputs' size (the
notes say so). ``align=True`` first permutes each member to the base
(:func:`netanatomy.synthesis.align`), which holds the base and that member in
memory.

The output file's metadata holds the recipe as JSON (``netanatomy.recipe``:
method, parameters, seed, inputs with their SHA-256); ``OUT.recipe.json`` next
to it holds the same plus the output's hashes.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .._util import atomic_write_text, dumps
from ..errors import UserError
from ..io import CheckpointLike, CheckpointStore, WrittenFile, file_sha256, open_store
from .average import _cast_down, _plan, _Plan, _stream_out, _WrittenResult

METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "model_stock", "slerp")
RECIPE_KEY = "netanatomy.recipe"
_PARALLEL = 1.0 - 1e-6


@dataclass
class MergeResult(_WrittenResult):
    """What a merge produced: tensors (in memory) and/or a written file, and its recipe."""

    method: str
    sources: list[str]  # base (or A) first
    recipe: dict
    tensors: dict[str, torch.Tensor] | None = None
    written: WrittenFile | None = None
    recipe_path: Path | None = None
    merged_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        d = self._summary(params=self.recipe["params"], seed=self.recipe.get("seed"), merged_tensors=len(self.merged_keys))
        if self.written is not None:
            d["tensors"] = self.written.num_tensors
        if self.recipe_path is not None:
            d["recipe"] = str(self.recipe_path)
        return d


# ---------------------------------------------------------------------------
# checks


def _finite(x, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise UserError(f"{what} must be a finite number, got {v}")
    return v


def _member_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [_finite(x, "a weight") for x in weights]
    if len(w) != n:
        raise UserError(f"{len(w)} weights for {n} members")
    if any(x < 0 for x in w):
        raise UserError("weights must be >= 0 (negate a task vector with a negative lambda)")
    if sum(w) <= 0:
        raise UserError("weights sum to zero")
    return w


def _densities(density, n: int) -> list[float]:
    ds = list(density) if isinstance(density, (list, tuple)) else [density] * n
    if len(ds) != n:
        raise UserError(f"{len(ds)} densities for {n} members")
    out = []
    for d in ds:
        d = _finite(d, "density")
        if not 0.0 < d <= 1.0:
            raise UserError(f"density must lie in (0, 1], got {d}")
        out.append(d)
    return out


def _drop_rate(p) -> float:
    p = _finite(p, "the drop rate")
    if not 0.0 <= p < 1.0:
        raise UserError(f"the drop rate must lie in [0, 1), got {p}")
    return p


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a whole number >= 0, got {seed!r}")
    return int(seed)


def _patterns(p: str | Sequence[str] | None) -> list[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else [str(x) for x in p]


# ---------------------------------------------------------------------------
# per-tensor operations (float64 in, float64 out)


def tensor_seed(seed: int, name: str, member: int) -> int:
    """The seed of the generator that draws ``member``'s mask for tensor ``name``."""
    ss = np.random.SeedSequence([seed, zlib.crc32(name.encode()), member])
    return int(ss.generate_state(1, np.uint64)[0])


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``ceil(density * n)`` largest-magnitude entries set to zero.

    Equal magnitudes at the cut are taken in order of position, so exactly that
    many entries are kept and the result is deterministic.
    """
    k = kept_count(tau.numel(), density)
    out = tau.clone(memory_format=torch.contiguous_format)
    return out if k >= tau.numel() else _apply_cut_(out, magnitude_cut(tau, k), k)


def kept_count(n: int, density: float) -> int:
    """How many of ``n`` entries TIES keeps at ``density``: ``ceil(density * n)``, at least 1."""
    return max(1, math.ceil(round(density * n, 6)))  # round: 0.07 * 100 is 7.000000000000001


def magnitude_cut(tau: torch.Tensor, k: int) -> float:
    """The ``k``-th largest magnitude in ``tau`` (numpy's in-place partition: linear
    time, one copy of the magnitudes, no sorted copy or index tensor)."""
    mag = tau.detach().reshape(-1).abs().double().numpy()
    mag.partition(mag.size - k)
    return float(mag[mag.size - k])


def _apply_cut_(tau: torch.Tensor, cut: float, k: int) -> torch.Tensor:
    """Zero, in place, all but the ``k`` entries of ``tau`` above ``cut`` in magnitude
    (entries equal to ``cut`` fill the count in order of position)."""
    flat = tau.view(-1)
    keep = (flat > cut).logical_or_(flat < -cut)
    short = k - int(keep.sum())
    if short > 0:
        keep[(flat == cut).logical_or_(flat == -cut).nonzero().squeeze(1)[:short]] = True
    flat.mul_(keep)
    return tau


def dare_drop(tau: torch.Tensor, p: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Drop each entry of ``tau`` with probability ``p`` (in place); rescale survivors by ``1/(1-p)``."""
    if p == 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float64) >= p
    tau.mul_(keep)
    if rescale:
        tau.div_(1.0 - p)
    return tau


def sign_consensus(taus: Callable[[], Iterable[torch.Tensor]], weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """TIES' elected sign and disjoint mean of the task vectors ``taus()`` yields.

    ``taus`` is called twice (elect, then average) and must yield the same
    tensors each time, one per member with a nonzero weight in ``weights``' order.
    """
    elect = torch.zeros_like(like)
    for w, tau in zip(weights, taus()):
        elect.add_(tau, alpha=w)
    pos, neg = elect > 0, elect < 0
    del elect
    # equal weights cancel in the mean: count the agreeing members in int32 instead
    # of summing their weights in float64 (a float64 tensor less)
    equal = len(set(weights)) == 1
    num = torch.zeros_like(like)
    den = torch.zeros(like.shape, dtype=torch.int32) if equal else torch.zeros_like(like)
    for w, tau in zip(weights, taus()):
        agree = (tau > 0).logical_and_(pos).logical_or_((tau < 0).logical_and_(neg))
        if equal:
            num.add_(tau.mul_(agree))
            den.add_(agree)
        else:
            num.add_(tau.mul_(agree), alpha=w)
            den.add_(agree, alpha=w)
        del agree, tau
    return num.div_(den.clamp_min_(1) if equal else den.clamp_min_(torch.finfo(torch.float64).tiny))  # no agreement: num is 0 too


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, bool]:
    """Spherical interpolation of two tensors (flattened); also whether it fell back to lerp."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    na, nb = float(fa.norm()), float(fb.norm())
    if na > 0 and nb > 0:
        cos = max(-1.0, min(1.0, float(fa @ fb) / (na * nb)))
        if abs(cos) <= _PARALLEL:
            theta = math.acos(cos)
            s = math.sin(theta)
            return (fa * (math.sin((1.0 - t) * theta) / s)).add_(fb, alpha=math.sin(t * theta) / s).reshape(a.shape), False
    return (fa * (1.0 - t)).add_(fb, alpha=t).reshape(a.shape), True


# ---------------------------------------------------------------------------
# the streaming engine


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64, copy=True)


def _selected(k: str, include: list[str], exclude: list[str]) -> bool:
    if include and not any(fnmatchcase(k, p) for p in include):
        return False
    return not any(fnmatchcase(k, p) for p in exclude)


def _input_record(obj, store: CheckpointStore, role: str) -> dict:
    rec = {"role": role, "name": store.label, "format": store.format}
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj).expanduser()
        rec["path"] = str(p)
        rec["sha256"] = file_sha256(p) if p.is_file() else None
    else:
        rec["path"] = None
        rec["sha256"] = None
    return rec


def _align_members(sources: list[CheckpointStore], spec, notes: list[str], recipe_inputs: list[dict]) -> None:
    from .permute import align as align_fn

    base = sources[0]
    for i in range(1, len(sources)):
        res = align_fn(base, sources[i], spec)
        summ = res.summary()
        notes.append(
            f"{sources[i].label} aligned to {base.label}: {summ['units_moved']}/{summ['units']} units moved, "
            f"L2 distance {res.distance_before:.6g} -> {res.distance_after:.6g}"
        )
        recipe_inputs[i]["aligned"] = {"units_moved": summ["units_moved"], "units": summ["units"]}
        sources[i] = open_store(res.aligned, name=sources[i].label)


def _run(
    method: str,
    inputs: list,
    roles: list[str],
    params: dict,
    combine: Callable[[str, torch.Tensor, Callable[[int], torch.Tensor]], torch.Tensor],
    *,
    seed: int | None = None,
    out=None,
    include=None,
    exclude=None,
    align: bool = False,
    spec=None,
    key: str | None = None,
    keep_in_memory: bool | None = None,
    late_notes: Callable[[], list[str]] | None = None,
) -> MergeResult:
    include, exclude = _patterns(include), _patterns(exclude)
    sources = [open_store(c, name=f"{r}", key=key) for c, r in zip(inputs, roles)]
    plan: _Plan = _plan(sources, False, None, missing_hint="the base and every member must hold the same tensors with the same shapes")
    notes: list[str] = []
    recipe_inputs = [_input_record(c, s, r) for c, s, r in zip(inputs, sources, roles)]
    if align:
        _align_members(sources, spec, notes, recipe_inputs)
    merged = [k for k in plan.keys if plan.is_float[k] and not plan.out_dtype[k].is_complex and _selected(k, include, exclude)]
    if not merged:
        raise UserError("no float tensor is selected for merging" + (" (check --include / --exclude)" if include or exclude else ""))
    chosen = set(merged)
    non_float = [k for k in plan.keys if not plan.is_float[k] or plan.out_dtype[k].is_complex]
    unselected = [k for k in plan.keys if k not in chosen and k not in non_float]
    if non_float:
        notes.append(f"{len(non_float)} non-float or complex tensor(s) copied from {sources[0].label} (first: {non_float[0]})")
    if unselected:
        notes.append(f"{len(unselected)} tensor(s) outside --include/--exclude copied from {sources[0].label} (first: {unselected[0]})")
    if not all(s.lazy for s in sources):
        notes.append("memory-mapped PyTorch inputs keep the pages they touch resident: peak memory can reach the inputs' size")
    recipe = {"method": method, "params": {**params, "include": include, "exclude": exclude, "align": bool(align)}, "inputs": recipe_inputs}
    if seed is not None:
        recipe["seed"] = seed
    if key is not None:
        recipe["key"] = key
    meta = {"netanatomy.method": f"merge:{method}", "netanatomy.sources": json.dumps([s.label for s in sources]), RECIPE_KEY: dumps(recipe)}
    keep = keep_in_memory if keep_in_memory is not None else out is None

    def items():
        for k in plan.keys:
            if k not in chosen:
                yield k, sources[0].get(k).clone()
                continue
            members = lambda i, k=k: _f64(sources[i + 1].get(k))  # noqa: E731
            yield k, _cast_down(combine(k, _f64(sources[0].get(k)), members), plan.out_dtype[k])

    written, tensors = _stream_out(out, plan, meta, items(), keep)
    if late_notes is not None:  # what the computation found out
        notes.extend(late_notes())
    result = MergeResult(method, [s.label for s in sources], recipe, tensors if keep else None, written, merged_keys=merged, notes=notes)
    if written is not None:
        record = dict(recipe, output={"path": str(written.path), "sha256": written.file_sha256, "content_sha256": written.content_sha256}, notes=notes)
        result.recipe_path = atomic_write_text(written.path.with_name(written.path.name + ".recipe.json"), dumps(record, indent=1) + "\n")
    return result


def _members_of(members: Sequence[CheckpointLike]) -> list:
    if isinstance(members, (str, os.PathLike, dict)) or not isinstance(members, Sequence):
        members = [members]
    members = list(members)
    if not members:
        raise UserError("a merge needs at least one member besides the base")
    return members


def _linear(lam: float, w: list[float], transform=None):
    def combine(k, base, member):
        acc = torch.zeros_like(base)
        for i, wi in enumerate(w):
            if wi == 0.0:
                continue
            tau = member(i).sub_(base)
            if transform is not None:
                tau = transform(k, i, tau)
            acc.add_(tau, alpha=wi)
        return base.add_(acc, alpha=lam)

    return combine


def _ties(lam: float, w: list[float], densities: list[float] | None, transform=None):
    live = [i for i, wi in enumerate(w) if wi > 0]

    def combine(k, base, member):
        cuts: dict[int, float] = {}  # found on the first pass, reused on the second

        def taus():
            for i in live:
                tau = member(i).sub_(base)
                if transform is not None:
                    tau = transform(k, i, tau)
                if densities is not None:
                    keep = kept_count(tau.numel(), densities[i])
                    if keep < tau.numel():
                        if i not in cuts:
                            cuts[i] = magnitude_cut(tau, keep)
                        tau = _apply_cut_(tau, cuts[i], keep)
                yield tau
                del tau

        return base.add_(sign_consensus(taus, [w[i] for i in live], base), alpha=lam)

    return combine


def _dropper(p: float, seed: int, rescale: bool):
    def transform(k, i, tau):
        return dare_drop(tau, p, torch.Generator().manual_seed(tensor_seed(seed, k, i)), rescale)

    return transform


def _roles(n: int) -> list[str]:
    return ["base"] + [f"member {i}" for i in range(n)]


def task_arithmetic(base: CheckpointLike, members: Sequence[CheckpointLike], lam: float = 1.0, weights: Sequence[float] | None = None, *, out=None, **kw) -> MergeResult:
    """``base + lam * sum_i w_i (m_i - base)`` (Ilharco et al. 2023); weights default to 1.

    Common keywords: ``out`` (a .safetensors path), ``include`` / ``exclude``
    (globs), ``align`` (permute members to the base first; ``spec`` as for
    :func:`~netanatomy.synthesis.align`), ``key``, ``keep_in_memory``.
    """
    members = _members_of(members)
    lam = _finite(lam, "lambda")
    w = _member_weights(weights, len(members))
    return _run("task_arithmetic", [base, *members], _roles(len(members)), {"lambda": lam, "weights": w}, _linear(lam, w), out=out, **kw)


def ties(base: CheckpointLike, members: Sequence[CheckpointLike], density: float | Sequence[float], lam: float = 1.0, weights: Sequence[float] | None = None, *, out=None, **kw) -> MergeResult:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean; ``density`` one value or one per member."""
    members = _members_of(members)
    lam = _finite(lam, "lambda")
    d = _densities(density, len(members))
    w = _member_weights(weights, len(members))
    return _run("ties", [base, *members], _roles(len(members)), {"lambda": lam, "density": d, "weights": w}, _ties(lam, w, d), out=out, **kw)


def dare(
    base: CheckpointLike,
    members: Sequence[CheckpointLike],
    p: float,
    seed: int,
    rescale: bool = True,
    *,
    variant: str = "linear",
    lam: float = 1.0,
    weights: Sequence[float] | None = None,
    out=None,
    **kw,
) -> MergeResult:
    """DARE (Yu et al. 2024): drop each task-vector entry with probability ``p``, rescale by
    ``1/(1-p)`` (unless ``rescale=False``), then a weighted sum (``variant="linear"``) or
    TIES' sign election and disjoint mean (``variant="ties"``)."""
    if variant not in ("linear", "ties"):
        raise UserError(f"DARE variant must be 'linear' or 'ties', not {variant!r}")
    members = _members_of(members)
    lam = _finite(lam, "lambda")
    p = _drop_rate(p)
    seed = _seed(seed)
    w = _member_weights(weights, len(members))
    drop = _dropper(p, seed, bool(rescale))
    combine = _linear(lam, w, drop) if variant == "linear" else _ties(lam, w, None, drop)
    params = {"lambda": lam, "drop": p, "rescale": bool(rescale), "weights": w}
    return _run(f"dare_{variant}", [base, *members], _roles(len(members)), params, combine, seed=seed, out=out, **kw)


def dare_linear(base, members, p: float, seed: int, rescale: bool = True, **kw) -> MergeResult:
    """DARE drop-and-rescale, then task arithmetic's weighted sum."""
    return dare(base, members, p, seed, rescale, variant="linear", **kw)


def dare_ties(base, members, p: float, seed: int, rescale: bool = True, **kw) -> MergeResult:
    """DARE drop-and-rescale, then TIES' sign election and disjoint mean (no trimming)."""
    return dare(base, members, p, seed, rescale, variant="ties", **kw)


def slerp(a: CheckpointLike, b: CheckpointLike, t: float, *, out=None, **kw) -> MergeResult:
    """Spherical interpolation per tensor from A (``t=0``) to B (``t=1``) (Shoemake 1985).

    Unselected and non-float tensors come from A; ``align=True`` permutes B to A first.
    """
    t = _finite(t, "t")
    if not 0.0 <= t <= 1.0:
        raise UserError(f"t must lie in [0, 1], got {t}")
    fallbacks: list[str] = []

    def combine(k, fa, member):
        res, lerped = slerp_tensor(fa, member(0), t)
        if lerped:
            fallbacks.append(k)
        return res

    def late_notes() -> list[str]:
        if not fallbacks:
            return []
        return [f"{len(fallbacks)} tensor(s) nearly parallel or zero: linear interpolation (first: {fallbacks[0]})"]

    return _run("slerp", [a, b], ["model A", "model B"], {"t": t}, combine, out=out, late_notes=late_notes, **kw)


def stock_ratio(cos: float, k: int) -> float:
    """Model Stock's interpolation ratio ``t = k cos / (1 + (k - 1) cos)`` (0 where the
    denominator vanishes: the task vectors then cancel out)."""
    den = 1.0 + (k - 1) * cos
    return k * cos / den if abs(den) > 1e-12 else 0.0


def model_stock(base: CheckpointLike, members: Sequence[CheckpointLike], *, out=None, **kw) -> MergeResult:
    """Model Stock (Jang et al. 2024): per tensor, ``base + t * mean_i tau_i`` with
    ``t = k cos / (1 + (k - 1) cos)`` and ``cos`` the mean pairwise cosine of the
    ``k >= 2`` task vectors (a zero task vector counts as cosine 0 with every other).

    Streamed in two passes per tensor: the norms and the mean first, then
    ``S = sum_i tau_i / |tau_i|``, whose ``|S|^2 - (number of nonzero tau_i)`` is twice
    the sum of the pairwise cosines; no two task vectors are held at once.
    """
    members = _members_of(members)
    k = len(members)
    if k < 2:
        raise UserError("model_stock needs at least two members (it measures the angle between their task vectors)")
    ratios: list[float] = []

    def combine(name, base64, member):
        total = torch.zeros_like(base64)
        norms = []
        for i in range(k):
            tau = member(i).sub_(base64)
            norms.append(float(tau.norm()))
            total.add_(tau)
            del tau
        unit = torch.zeros_like(base64)
        for i in range(k):
            if norms[i] > 0:
                unit.add_(member(i).sub_(base64), alpha=1.0 / norms[i])
        nonzero = sum(1 for x in norms if x > 0)
        cos = (float(unit.reshape(-1) @ unit.reshape(-1)) - nonzero) / (k * (k - 1))
        del unit
        t = stock_ratio(cos, k)
        ratios.append(t)
        return base64.add_(total, alpha=t / k)

    def late_notes() -> list[str]:
        return [f"model_stock ratio t per tensor: {min(ratios):.4g} to {max(ratios):.4g} (mean {sum(ratios) / len(ratios):.4g})"] if ratios else []

    return _run("model_stock", [base, *members], _roles(k), {}, combine, out=out, late_notes=late_notes, **kw)


def merge(method: str, base: CheckpointLike, members: Sequence[CheckpointLike], **params) -> MergeResult:
    """Dispatch by name: ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, ``model_stock`` or ``slerp``
    (for slerp, ``base`` is A and the one member is B)."""
    name = method.lower().replace("-", "_")
    if name == "slerp":
        members = _members_of(members)
        if len(members) != 1:
            raise UserError(f"slerp interpolates two models: A (the base) and one B, not {len(members)} members")
        return slerp(base, members[0], **params)
    fns = {"task_arithmetic": task_arithmetic, "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties, "model_stock": model_stock}
    if name not in fns:
        raise UserError(f"unknown merge method {method!r} (choose {', '.join(METHODS)})")
    return fns[name](base, members, **params)
