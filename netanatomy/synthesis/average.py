"""Streaming weighted averages of checkpoints: SWA-style means, EMA, uniform soups.

Rules (as in timm's ``avg_checkpoints``, plus what it leaves out):

* every tensor, buffers included, is accumulated in float64 (complex128 for
  complex tensors), whatever its stored dtype (bf16, fp16, fp32 may be mixed);
* weights are normalised per key over the checkpoints that hold that key (per-key
  counts); by default every checkpoint must hold the same keys with the same
  shapes, else a one-line error names the key, the files and the shapes;
  ``allow_missing=True`` averages each key over the checkpoints that have it;
* the result is cast to the dtype of the key's first holder (or ``dtype``),
  clamped to that dtype's finite range first so nothing overflows to inf;
* non-float tensors (``num_batches_tracked``, masks, index buffers) are not
  averaged: ``non_float="last"`` (default) takes the last checkpoint's value, as
  ``torch.optim.swa_utils.AveragedModel`` keeps buffers in sync with the newest
  model; ``"first"`` takes the first; ``"equal"`` requires them all equal.

Memory. With safetensors inputs (and in-memory state dicts) the work goes key by
key: one tensor of each checkpoint and one float64 accumulator live at a time,
and the output is streamed to disk, so the peak is a few tensors, not a model.
Memory-mapped PyTorch checkpoints are read one checkpoint at a time into float64
accumulators (peak: the accumulators, twice an fp32 model, plus one checkpoint's
pages), since each touched page of a mapped file stays resident while it is open.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import UserError
from ..io import CheckpointLike, CheckpointStore, SafetensorsWriter, WrittenFile, open_store

NON_FLOAT_POLICIES = ("last", "first", "equal")


class _WrittenResult:
    """What the results of averages and merges share: a method, sources, notes,
    and maybe a written file with its hashes."""

    method: str
    sources: list[str]
    notes: list[str]
    written: WrittenFile | None

    @property
    def sha256(self) -> str | None:
        return self.written.content_sha256 if self.written else None

    def _summary(self, **fields) -> dict:
        d = {"method": self.method, "checkpoints": len(self.sources), "sources": self.sources, **fields, "notes": self.notes}
        w = self.written
        if w is not None:
            d.update(out=str(w.path), content_sha256=w.content_sha256, file_sha256=w.file_sha256, bytes=w.num_bytes)
        return d


@dataclass
class AverageResult(_WrittenResult):
    """What an average produced: tensors (in memory) and/or a written file."""

    method: str
    sources: list[str]
    weights: list[float]
    tensors: dict[str, torch.Tensor] | None = None
    written: WrittenFile | None = None
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return self._summary(weights=self.weights, tensors=len(self.counts))


@dataclass
class _Plan:
    keys: list[str]
    holders: dict[str, list[int]]
    out_dtype: dict[str, torch.dtype]
    shape: dict[str, tuple[int, ...]]
    is_float: dict[str, bool]


def _is_float(dt: torch.dtype) -> bool:
    return dt.is_floating_point or dt.is_complex


_MISSING_HINT = "allow_missing / --allow-missing averages each key over its holders"


def _plan(sources: list[CheckpointStore], allow_missing: bool, dtype: torch.dtype | None, missing_hint: str = _MISSING_HINT) -> _Plan:
    keys: list[str] = []
    seen: set[str] = set()
    for s in sources:
        for k in s.keys():
            if k not in seen:
                seen.add(k)
                keys.append(k)
    keys.sort()  # canonical order: the content hash does not depend on input format
    holders = {k: [i for i, s in enumerate(sources) if k in s] for k in keys}
    if not allow_missing:
        for k in keys:
            if len(holders[k]) != len(sources):
                missing = [sources[i].label for i in range(len(sources)) if i not in holders[k]]
                raise UserError(
                    f"key {k!r} is missing from {len(missing)} checkpoint(s) (first: {missing[0]}); "
                    f"checkpoints must hold the same tensors ({missing_hint})"
                )
    shape, out_dtype, is_float = {}, {}, {}
    for k in keys:
        first = holders[k][0]
        shape[k] = tuple(sources[first].shape(k))
        fl = _is_float(sources[first].dtype(k))
        for i in holders[k][1:]:
            if tuple(sources[i].shape(k)) != shape[k]:
                raise UserError(
                    f"shape mismatch for {k!r}: {list(shape[k])} in {sources[first].label} "
                    f"but {list(sources[i].shape(k))} in {sources[i].label}"
                )
            if _is_float(sources[i].dtype(k)) != fl:
                raise UserError(
                    f"dtype mismatch for {k!r}: {sources[first].dtype(k)} in {sources[first].label} "
                    f"but {sources[i].dtype(k)} in {sources[i].label}"
                )
        is_float[k] = fl
        d = sources[first].dtype(k)
        if fl and dtype is not None and not d.is_complex:
            d = dtype
        out_dtype[k] = d
    return _Plan(keys, holders, out_dtype, shape, is_float)


def _cast_down(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point and dtype != torch.float64:
        info = torch.finfo(dtype)
        acc = acc.clamp_(info.min, info.max)
    return acc.to(dtype)


def _pick(k: str, values: list[tuple[int, torch.Tensor]], policy: str, sources: list[CheckpointStore]) -> torch.Tensor:
    if policy == "first":
        return values[0][1].clone()
    if policy == "last":
        return values[-1][1].clone()
    i0, ref = values[0]
    for i, v in values[1:]:
        if not torch.equal(v, ref):
            raise UserError(
                f"non-float tensor {k!r} differs between {sources[i0].label} and {sources[i].label} "
                "(non_float='equal'; use 'first' or 'last' to take one)"
            )
    return ref.clone()


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise UserError(f"{len(w)} weights for {n} checkpoints")
    if any(not (x >= 0.0) or x == float("inf") for x in w):
        raise UserError("weights must be finite and >= 0")
    total = sum(w)
    if total <= 0:
        raise UserError("weights sum to zero")
    return [x / total for x in w]


def _compute_key(k: str, plan: _Plan, sources: list[CheckpointStore], weights: list[float], non_float: str) -> torch.Tensor:
    hs = plan.holders[k]
    if not plan.is_float[k]:
        idx = hs[:1] if non_float == "first" else hs[-1:] if non_float == "last" else hs
        return _pick(k, [(i, sources[i].get(k)) for i in idx], non_float, sources)
    total = sum(weights[i] for i in hs)
    if total <= 0:
        raise UserError(f"key {k!r}: the checkpoints holding it all have weight 0")
    acc_dtype = torch.complex128 if plan.out_dtype[k].is_complex else torch.float64
    acc = torch.zeros(plan.shape[k], dtype=acc_dtype)
    for i in hs:
        if weights[i] == 0.0:
            continue
        t = sources[i].get(k)  # add_ casts element-wise into the float64 accumulator
        acc.add_(t) if weights[i] == 1.0 else acc.add_(t, alpha=weights[i])
    return _cast_down(acc.div_(total), plan.out_dtype[k])


def average(
    checkpoints: Sequence[CheckpointLike],
    out: str | os.PathLike | None = None,
    *,
    weights: Sequence[float] | None = None,
    dtype: torch.dtype | str | None = None,
    non_float: str = "last",
    allow_missing: bool = False,
    key: str | None = None,
    method: str = "mean",
    metadata: dict[str, str] | None = None,
    keep_in_memory: bool | None = None,
) -> AverageResult:
    """Weighted average of any number of checkpoints, streamed.

    ``checkpoints``: paths (safetensors / PyTorch), state dicts or modules.
    ``weights``: one non-negative number per checkpoint (normalised); default
    uniform. With ``out`` the result is written there (safetensors, atomically,
    hashed) and, unless ``keep_in_memory``, not kept in memory.
    """
    if not checkpoints:
        raise UserError("nothing to average: no checkpoints given")
    if non_float not in NON_FLOAT_POLICIES:
        raise UserError(f"non_float must be one of {', '.join(NON_FLOAT_POLICIES)}, got {non_float!r}")
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    sources = [open_store(c, name=f"checkpoint {i}", key=key) for i, c in enumerate(checkpoints)]
    w = _check_weights(weights, len(sources))
    # accumulate with the raw weights and divide once per key (a uniform mean is
    # an exact float64 sum divided by the count, as timm's avg_checkpoints does)
    raw = [1.0] * len(sources) if weights is None else [float(x) for x in weights]
    plan = _plan(sources, allow_missing, dtype)
    keep = keep_in_memory if keep_in_memory is not None else out is None
    labels = [s.label for s in sources]
    result = AverageResult(method=method, sources=labels, weights=w, counts={k: len(plan.holders[k]) for k in plan.keys})
    partial = [k for k in plan.keys if len(plan.holders[k]) != len(sources)]
    if partial:
        result.notes.append(f"{len(partial)} keys held by only some checkpoints (first: {partial[0]}); each averaged over its holders")
    meta = {
        "netanatomy.method": method,
        "netanatomy.sources": json.dumps(labels),
        "netanatomy.weights": json.dumps([round(x, 12) for x in w]),
        "netanatomy.non_float": non_float,
    }
    meta.update(metadata or {})
    if all(s.lazy for s in sources):
        items = ((k, _compute_key(k, plan, sources, raw, non_float)) for k in plan.keys)
    else:
        items = _checkpoint_major(plan, sources, raw, non_float)
    result.written, tensors = _stream_out(out, plan, meta, items, keep)
    if keep:
        result.tensors = tensors
    return result


def _stream_out(out, plan: _Plan, meta: dict[str, str], items, keep: bool) -> tuple[WrittenFile | None, dict[str, torch.Tensor]]:
    """Write ``(key, tensor)`` pairs, in ``plan.keys`` order, to ``out`` as they come.

    The header is written first, so only the tensor in hand is in memory (plus
    those kept when ``keep``). With ``out=None`` every tensor is kept.
    """
    tensors: dict[str, torch.Tensor] = {}
    if out is None:
        for k, t in items:
            tensors[k] = t
        return None, tensors
    entries = [(k, plan.out_dtype[k], plan.shape[k]) for k in plan.keys]
    with SafetensorsWriter(out, entries, meta) as writer:
        for k, t in items:
            writer.write(k, t)
            if keep:
                tensors[k] = t
            del t  # not alive while the next tensor is computed
    return writer.result(), tensors


def _checkpoint_major(plan: _Plan, sources: list[CheckpointStore], w: list[float], non_float: str):
    """One checkpoint at a time into float64 accumulators (for memory-mapped files)."""
    acc: dict[str, torch.Tensor] = {}
    picks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    totals = {k: sum(w[i] for i in plan.holders[k]) for k in plan.keys}
    for i in range(len(sources)):
        src = sources[i]
        for k in plan.keys:
            if k not in src:
                continue
            if plan.is_float[k]:
                a = acc.get(k)
                if a is None:
                    a = acc[k] = torch.zeros(plan.shape[k], dtype=torch.complex128 if plan.out_dtype[k].is_complex else torch.float64)
                if w[i] > 0:
                    t = src.get(k)
                    a.add_(t) if w[i] == 1.0 else a.add_(t, alpha=w[i])
            else:
                keep_it = non_float == "equal" or (non_float == "first" and k not in picks) or non_float == "last"
                if keep_it:
                    v = (i, src.get(k).clone())
                    picks[k] = picks.get(k, []) + [v] if non_float == "equal" else [v]
        sources[i] = src.released()  # drop the mapping
        del src
    for k in plan.keys:
        if plan.is_float[k]:
            yield k, _cast_down(acc.pop(k).div_(totals[k]), plan.out_dtype[k])
        else:
            yield k, _pick(k, picks[k], non_float, sources)


def ema_weights(n: int, decay: float) -> list[float]:
    """Weights that make a weighted mean equal to the EMA over ``n`` ordered checkpoints.

    ``ema_0 = x_0``; ``ema_t = decay * ema_{t-1} + (1 - decay) * x_t`` (the convention
    of ``torch.optim.swa_utils.get_ema_multi_avg_fn``), i.e. ``w_0 = decay^(n-1)``,
    ``w_t = (1 - decay) * decay^(n-1-t)``; they sum to one.
    """
    if not 0.0 <= decay <= 1.0:
        raise UserError(f"EMA decay must lie in [0, 1], got {decay}")
    if n < 1:
        raise UserError("EMA needs at least one checkpoint")
    return [decay ** (n - 1)] + [(1.0 - decay) * decay ** (n - 1 - t) for t in range(1, n)]


def ema(checkpoints: Sequence[CheckpointLike], decay: float, out=None, **kw) -> AverageResult:
    """Exponential moving average over checkpoints in the order given (oldest first)."""
    w = ema_weights(len(checkpoints), decay)
    if sum(w) <= 0:  # decay == 1 with n > 1 puts all weight on the first
        w = [1.0] + [0.0] * (len(checkpoints) - 1)
    meta = dict(kw.pop("metadata", None) or {})
    meta["netanatomy.ema_decay"] = repr(float(decay))
    return average(checkpoints, out, weights=w, method="ema", metadata=meta, **kw)


_DTYPE_NAMES = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPE_NAMES[name.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r} (choose float32, float16, bfloat16 or float64)") from None
