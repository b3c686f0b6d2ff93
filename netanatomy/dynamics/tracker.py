"""The width tracker: attach to a ``torch.nn.Module`` and record, while it trains,
each layer's coupled channel norms, their mean-normalised variance, the share of
weights whose sign changed since initialisation and, on chosen epochs, the
norm-sorted cosine-similarity matrix between channels.

Framework-free; the plain loop is::

    tracker = WidthTracker(model, every=50)      # records the init point
    for epoch in range(E):
        for x, y in loader:
            ...; optimizer.step()
            tracker.step()                        # records every 50 steps
        tracker.epoch_end({"val_acc": acc})       # records one epoch point
    tracker.save("run/")                          # Parquet + JSON

Points are computed on the model's device and kept there as tensors; they move to
the host in batches (every ``flush_every`` points, or when read), so a step costs no
host synchronisation. Any internal error disables the tracker with a warning; it
never raises into the training loop.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Iterable

import torch

from . import norms as N
from .groups import ChannelGroup, find_channel_groups
from .record import CURVE_COLUMNS, WidthRecord

STATE_FORMAT = "netanatomy.width-tracker/1"


def _guarded(default=None):
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(self, *a, **kw):
            if not self.enabled:
                return default
            try:
                return fn(self, *a, **kw)
            except Exception as exc:  # never raise into the training loop
                self._disable(f"{fn.__name__}: {type(exc).__name__}: {exc}")
                return default

        return wrapper

    return deco


def layers_meta(groups, model) -> dict:
    """Per tracked layer: its channel group, shape and outgoing slices (saved with a run)."""
    return {
        g.layer: {
            **g.describe(),
            "shape": list(model[g.layer].shape),
            "groups": model[g.layer].groups,
            "has_bias": g.bias_key is not None,
            "out_slices": [dataclasses.asdict(o) for o in g.outs],
        }
        for g in groups
    }


class WidthTracker:
    """Record channel-norm curves of ``module`` while it trains.

    ``every``: record every N optimiser steps (``None``: epochs only).
    ``similarity_epochs``: epochs (0 = init) at which the cosine-similarity matrix is
    kept; ``similarity_max_channels`` caps the layer size for it.
    ``include_1d``: also count biases and norm-layer parameters in the incoming norm
    (off by default: the paper's definition skips 1-D tensors).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        every: int | None = None,
        layers: Iterable[str] | None = None,
        similarity_epochs: Iterable[int] = (0, 1, 5),
        similarity_max_channels: int = 256,
        include_1d: bool = False,
        flush_every: int = 64,
        record_init: bool = True,
        groups: list[ChannelGroup] | None = None,
    ):
        self.module = module
        self.every = int(every) if every else None
        self.similarity_epochs = set(int(e) for e in similarity_epochs)
        self.similarity_max_channels = int(similarity_max_channels)
        self.include_1d = bool(include_1d)
        self.flush_every = max(1, int(flush_every))
        self.enabled = True
        self.disabled_reason: str | None = None
        self.global_step = 0
        self.epoch = 0
        self._pending: list[tuple[str, int, int, torch.Tensor]] = []
        self._pending_sim: list[tuple[int, int, str, torch.Tensor]] = []
        self._pending_metrics: list[tuple[str, int, int, str, Any]] = []
        self._points: list[tuple[str, int, int, list[float]]] = []
        self._sims: list[dict] = []
        self._metrics: list[tuple[str, int, int, str, float]] = []
        self.positions: dict[str, int] = {}
        self._hooks: list = []
        self.groups: list[ChannelGroup] = []
        self._init_bits: dict[str, torch.Tensor] = {}
        self.meta: dict = {}
        try:
            self._attach(layers, groups)
            if record_init:
                self._record("init")
        except Exception as exc:
            self._disable(f"attach: {type(exc).__name__}: {exc}")

    # -- setup ----------------------------------------------------------------
    def _attach(self, layers, groups) -> None:
        from ..io import load

        model = load(self.module, name=type(self.module).__name__)
        self.groups = groups if groups is not None else find_channel_groups(
            model, list(layers) if layers is not None else None
        )
        if not self.groups:
            raise ValueError("no conv or linear layer to track")
        self._tensors = {k: v for k, v in self.module.state_dict(keep_vars=True).items()}
        self._init_bits = {g.layer: N.sign_bits(g, self._get) for g in self.groups}
        self.meta = {
            "format": "netanatomy.width/1",
            "model": type(self.module).__name__,
            "layers": layers_meta(self.groups, model),
            "order": [g.layer for g in self.groups],
            "settings": {"every": self.every, "include_1d": self.include_1d},
        }
        mods = dict(self.module.named_modules())
        for g in self.groups:
            m = mods.get(g.layer)
            if m is not None:
                self._hooks.append(m.register_forward_hook(self._shape_hook(g.layer, g.channels)))

    def _shape_hook(self, name: str, channels: int):
        def hook(mod, inp, out):
            try:
                if isinstance(out, torch.Tensor) and out.dim() >= 2 and name not in self.positions:
                    self.positions[name] = int(out[0].numel() // max(1, channels))
                    if len(self.positions) == len(self.groups):
                        self._remove_hooks()
            except Exception:
                pass

        return hook

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _get(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def _disable(self, why: str) -> None:
        self.enabled = False
        self.disabled_reason = why
        try:
            self._remove_hooks()
        except Exception:
            pass
        warnings.warn(f"width tracker disabled: {why}", RuntimeWarning, stacklevel=3)

    # -- recording ----------------------------------------------------------
    def compute_point(self) -> torch.Tensor:
        """One record point as a single flat device tensor:
        ``[var_ratio (L), norm_mean (L), sign_changed (L), norms (sum of channels)]``."""
        with torch.no_grad():
            cache = N.SquareCache(self._get)  # each weight squared once per point
            norms = [N.coupled_norms(g, self._get, self.include_1d, cache) for g in self.groups]
            var = torch.stack([N.variance_ratio(n) for n in norms])
            mean = torch.stack([n.mean() for n in norms])
            sign = torch.stack([N.sign_changed(g, self._get, self._init_bits[g.layer]) for g in self.groups])
            return torch.cat([var, mean, sign, *norms]).detach()

    def _record(self, kind: str) -> None:
        self._pending.append((kind, self.global_step, self.epoch, self.compute_point()))
        if kind in ("init", "epoch") and self.epoch in self.similarity_epochs:
            self._record_similarity()
        if len(self._pending) >= self.flush_every:
            self.flush()

    def _record_similarity(self) -> None:
        with torch.no_grad():
            for g in self.groups:
                if g.channels > self.similarity_max_channels:
                    continue
                n = N.coupled_norms(g, self._get, self.include_1d)
                self._pending_sim.append((self.epoch, self.global_step, g.layer, N.sorted_cosine(g, self._get, n)))

    @_guarded()
    def step(self, n: int = 1) -> None:
        """Call after each optimiser step."""
        before = self.global_step
        self.global_step += int(n)
        if self.every and self.global_step // self.every != before // self.every:
            self._record("step")

    @_guarded()
    def epoch_end(self, metrics: dict | None = None) -> None:
        """Call at the end of each epoch; ``metrics`` (floats or tensors) are kept."""
        self.epoch += 1
        self._record("epoch")
        for k, v in (metrics or {}).items():
            self._pending_metrics.append(("epoch", self.global_step, self.epoch, str(k), v))

    @_guarded()
    def log_metrics(self, metrics: dict, kind: str = "step") -> None:
        for k, v in metrics.items():
            self._pending_metrics.append((kind, self.global_step, self.epoch, str(k), v))

    @_guarded()
    def record_similarity(self) -> None:
        """Keep the similarity matrices of the current weights now."""
        self._record_similarity()

    @_guarded()
    def flush(self) -> None:
        """Move pending points to the host (one synchronisation for the batch)."""
        self._flush()

    def _flush(self) -> None:
        if self._pending:
            stacked = torch.stack([p[3] for p in self._pending]).cpu().tolist()
            for (kind, step, epoch, _), row in zip(self._pending, stacked):
                self._points.append((kind, step, epoch, row))
            self._pending = []
        for epoch, step, layer, m in self._pending_sim:
            self._sims.append({"epoch": epoch, "step": step, "layer": layer, "matrix": m.cpu().numpy()})
        self._pending_sim = []
        for kind, step, epoch, name, v in self._pending_metrics:
            val = float(v.detach().float().cpu()) if isinstance(v, torch.Tensor) else float(v)
            self._metrics.append((kind, step, epoch, name, val))
        self._pending_metrics = []

    # -- reading ------------------------------------------------------------
    def latest(self) -> dict[str, float]:
        """The last point's scalars, ``{"width/<layer>/var_ratio": ...}`` (syncs)."""
        if not self.enabled:
            return {}
        self.flush()
        if not self._points:
            return {}
        _, _, _, row = self._points[-1]
        L = len(self.groups)
        out = {}
        for i, g in enumerate(self.groups):
            out[f"width/{g.layer}/var_ratio"] = row[i]
            out[f"width/{g.layer}/sign_changed"] = row[2 * L + i]
        return out

    def record(self) -> WidthRecord:
        """Everything recorded so far (flushes)."""
        import pandas as pd

        if self.enabled:
            self.flush()
        else:  # keep what was computed before the tracker was disabled
            try:
                self._flush()
            except Exception:
                self._pending, self._pending_sim, self._pending_metrics = [], [], []
        L = len(self.groups)
        rows = []
        for kind, step, epoch, row in self._points:
            off = 3 * L
            for i, g in enumerate(self.groups):
                rows.append(
                    {
                        "kind": kind,
                        "step": step,
                        "epoch": epoch,
                        "layer": g.layer,
                        "channels": g.channels,
                        "norm_mean": row[L + i],
                        "var_ratio": row[i],
                        "sign_changed": row[2 * L + i],
                        "norms": row[off : off + g.channels],
                    }
                )
                off += g.channels
        curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
        metrics = pd.DataFrame(self._metrics, columns=["kind", "step", "epoch", "name", "value"])
        meta = dict(self.meta)
        meta["positions"] = dict(self.positions)
        if self.disabled_reason:
            meta["disabled"] = self.disabled_reason
        return WidthRecord(curves=curves, metrics=metrics, similarity=list(self._sims), meta=meta)

    def save(self, folder) -> None:
        """Write the run folder (Parquet + JSON, atomically). Never raises; warns."""
        try:
            self.record().save(folder)
        except Exception as exc:
            warnings.warn(f"width tracker could not save to {folder}: {type(exc).__name__}: {exc}", RuntimeWarning)

    # -- resume -------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.enabled:
            self.flush()
        return {
            "format": STATE_FORMAT,
            "layers": [g.layer for g in self.groups],
            "channels": [g.channels for g in self.groups],
            "global_step": self.global_step,
            "epoch": self.epoch,
            "points": [
                {"kind": k, "step": s, "epoch": e, "values": torch.tensor(row, dtype=torch.float64)}
                for k, s, e, row in self._points
            ],
            "metrics": [list(m) for m in self._metrics],
            "similarity": [
                {"epoch": d["epoch"], "step": d["step"], "layer": d["layer"], "matrix": torch.from_numpy(d["matrix"])}
                for d in self._sims
            ],
            "init_bits": {k: v.detach().cpu() for k, v in self._init_bits.items()},
            "positions": dict(self.positions),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the curves of a saved run (the tracked layers must match)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError("not a width tracker state")
        if list(state["layers"]) != [g.layer for g in self.groups] or list(state["channels"]) != [
            g.channels for g in self.groups
        ]:
            raise ValueError("the saved tracker state tracks other layers or widths")
        self._pending = []
        self._pending_sim = []
        self._pending_metrics = []
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self._points = [(p["kind"], int(p["step"]), int(p["epoch"]), p["values"].tolist()) for p in state["points"]]
        self._metrics = [(m[0], int(m[1]), int(m[2]), m[3], float(m[4])) for m in state["metrics"]]
        self._sims = [
            {"epoch": d["epoch"], "step": d["step"], "layer": d["layer"], "matrix": d["matrix"].numpy()}
            for d in state["similarity"]
        ]
        self._init_bits = {
            g.layer: state["init_bits"][g.layer].to(self._init_bits[g.layer].device) for g in self.groups
        }
        self.positions.update(state.get("positions", {}))

    def close(self) -> None:
        self._remove_hooks()
