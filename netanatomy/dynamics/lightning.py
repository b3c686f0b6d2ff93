"""Lightning adapter: a ``Callback`` around :class:`WidthTracker`.

    from netanatomy.dynamics.lightning import WidthCallback
    trainer = lightning.Trainer(callbacks=[WidthCallback(every=50, out="run/width")])

Records every ``every`` optimiser steps (``trainer.global_step``) and at each training
epoch end (with ``trainer.callback_metrics``); the epoch's scalars go to every logger
the trainer has (TensorBoard, W&B, CSV ...); the full record is written to ``out`` at
the end of fitting. Its state is saved in Lightning checkpoints, so a resumed fit
continues the curves. ``attr`` tracks a sub-module (``pl_module.<attr>``).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError("the Lightning adapter needs `pip install lightning`") from exc

from .tracker import WidthTracker


class WidthCallback(Callback):
    def __init__(self, every: int | None = None, out: str | None = None, attr: str | None = None,
                 log_scalars: bool = True, **tracker_kw: Any):
        self.every = every
        self.out = out
        self.attr = attr
        self.log_scalars = log_scalars
        self.tracker_kw = tracker_kw
        self.tracker: WidthTracker | None = None
        self._last_step = 0
        self._pending_state: dict | None = None

    @property
    def state_key(self) -> str:
        return f"WidthCallback[every={self.every},attr={self.attr}]"

    def _target(self, pl_module):
        return getattr(pl_module, self.attr) if self.attr else pl_module

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.tracker is None:
            self.tracker = WidthTracker(self._target(pl_module), every=self.every, **self.tracker_kw)
        if self._pending_state is not None:
            try:
                self.tracker.load_state_dict(self._pending_state)
            except Exception as exc:
                self.tracker._disable(f"resume: {exc}")
            self._pending_state = None
        self._last_step = self.tracker.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.tracker is None:
            return
        gs = int(trainer.global_step)
        if gs > self._last_step:
            self.tracker.step(gs - self._last_step)
            self._last_step = gs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.tracker is None:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        self.tracker.epoch_end(metrics)
        if self.log_scalars and trainer.loggers:
            scalars = self.tracker.latest()
            for lg in trainer.loggers:
                try:
                    lg.log_metrics(scalars, step=int(trainer.global_step))
                except Exception:
                    pass

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.tracker is not None and self.out and trainer.is_global_zero:
            self.tracker.save(self.out)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "tracker" in state_dict:
            self._pending_state = state_dict["tracker"]
