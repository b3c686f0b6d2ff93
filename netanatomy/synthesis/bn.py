"""Batch-norm recalibration for averaged, interpolated or aligned weights.

Averaging weights does not average what the batch-norm statistics should be:
the running mean and variance of a mixed model are those of neither parent.
:func:`recalibrate_bn` recomputes them from data, as
``torch.optim.swa_utils.update_bn`` does: reset the statistics, switch momentum
to a cumulative average, run the batches in train mode without gradients, then
restore each module's momentum and the model's train/eval mode.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def bn_modules(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(module: nn.Module, batches: Iterable, *, max_batches: int | None = None, device: torch.device | str | None = None) -> int:
    """Recompute every batch-norm layer's running statistics from ``batches``.

    ``batches`` yields input tensors or ``(inputs, ...)`` tuples/lists. Returns
    the number of batches used (0 and nothing changed when the model has no
    batch-norm layer).
    """
    bns = bn_modules(module)
    if not bns:
        return 0
    momenta = {m: m.momentum for m in bns}
    was_training = module.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    module.train()
    used = 0
    try:
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if device is not None:
                x = x.to(device)
            module(x)
            used += 1
    finally:
        for m in bns:
            m.momentum = momenta[m]
        module.train(was_training)
    return used
