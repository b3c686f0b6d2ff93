"""Hugging Face adapter: a ``TrainerCallback`` around :class:`WidthTracker`.

    from netanatomy.dynamics.hf import WidthTrainerCallback
    cb = WidthTrainerCallback(every=50, out="run/width")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    cb.attach_first(trainer)   # optional: so TensorBoard / W&B see its scalars

Records every ``every`` optimiser steps and at each epoch end (with the last logged
values: loss, learning rate, eval metrics); the full record goes to ``out`` (default
``<output_dir>/width``) when training ends. The epoch's scalars are added to the next
``logs`` the Trainer reports, which its reporting integrations (TensorBoard, W&B)
receive when this callback runs before them (``attach_first``).
"""

from __future__ import annotations

import os
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover
    raise ImportError("the Hugging Face adapter needs `pip install transformers`") from exc

from .tracker import WidthTracker


class WidthTrainerCallback(TrainerCallback):
    def __init__(self, every: int | None = None, out: str | None = None, log_scalars: bool = True,
                 **tracker_kw: Any):
        self.every = every
        self.out = out
        self.log_scalars = log_scalars
        self.tracker_kw = tracker_kw
        self.tracker: WidthTracker | None = None
        self._last_logs: dict = {}
        self._scalars: dict = {}
        self._resume_state: dict | None = None

    def attach_first(self, trainer) -> "WidthTrainerCallback":
        """Put this callback first so reporting integrations log its scalars."""
        cbs = trainer.callback_handler.callbacks
        if self in cbs:
            cbs.remove(self)
        cbs.insert(0, self)
        return self

    def load_state_dict(self, state: dict) -> None:
        """Resume the curves (a state from :meth:`WidthTracker.state_dict`)."""
        self._resume_state = state

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.tracker is None and model is not None:
            self.tracker = WidthTracker(model, every=self.every, **self.tracker_kw)
            if self._resume_state is not None:
                try:
                    self.tracker.load_state_dict(self._resume_state)
                except Exception as exc:
                    self.tracker._disable(f"resume: {exc}")
        if self.out is None:
            self.out = os.path.join(args.output_dir, "width")

    def on_step_end(self, args, state, control, **kwargs):
        if self.tracker is not None:
            gap = int(state.global_step) - self.tracker.global_step
            if gap > 0:
                self.tracker.step(gap)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self._last_logs.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if self._scalars and self.log_scalars:
                logs.update(self._scalars)
                self._scalars = {}

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.tracker is None:
            return
        self.tracker.epoch_end(dict(self._last_logs))
        if self.log_scalars:
            self._scalars = self.tracker.latest()

    def on_train_end(self, args, state, control, **kwargs):
        if self.tracker is not None and self.out and state.is_world_process_zero:
            self.tracker.save(self.out)
