"""The learning rate of every optimizer step, and the steps' gradient accumulation.

As in timm and torchvision's references, the schedule moves every optimizer step, not every epoch: a linear
warmup over `warmup-epochs` (from lr/warmup_steps at the first step to lr at the last warmup step), then the
`lr-scheduler`'s decay over the remaining steps (cosine to 0 at the last step; step: x0.1 at each third of the
epochs; none: constant). The LambdaLR it builds saves its step count in the checkpoint, so a resumed run
continues the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from imgclf.config import Hyperparameters


def optimizer_steps(batches: int, accumulate: int) -> int:
    """Optimizer steps of an epoch of `batches` batches (the last group may be short)."""
    return -(-batches // accumulate)


def lr_factor(hp: Hyperparameters, steps_per_epoch: int) -> Callable[[int], float]:
    """step (0-based optimizer step of the run) -> fraction of each group's base lr."""
    total = max(1, hp.epochs * steps_per_epoch)
    warmup = min(total, round(hp.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        decay_steps = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        if hp.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if hp.lr_scheduler == "step":
            return 0.1 ** min(2, int(progress * 3))
        return 1.0

    return factor


def make_scheduler(hp: Hyperparameters, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(hp, steps_per_epoch))


def accumulation(batch: int, batches: int, accumulate: int) -> tuple[int, bool]:
    """For batch `batch` (0-based) of an epoch of `batches`: (the size of its accumulation group, which divides
    its loss so that the group's gradient is the mean over the group's batches; does the optimizer step after
    it?). The epoch's last group may be short; every epoch starts a new group."""
    start = batch - batch % accumulate
    size = min(accumulate, batches - start)
    return size, batch == start + size - 1
