"""An exponential moving average of the weights (`model-ema`), as in timm and torchvision's references: after
every optimizer step, ema = decay * ema + (1 - decay) * weights, buffers (BatchNorm statistics) included. The
averaged weights are the ones validated, selected, saved, exported and served; the checkpoint holds them, so a
resumed run continues the same average.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class Ema(AveragedModel):
    """torch's AveragedModel with its EMA function, whose update does not read its step count back from the device:
    AveragedModel asks `n_averaged == 0` and `n_averaged > 0` at every update, a host synchronisation per optimizer
    step on a GPU. Here whether the average has started is kept on the host (read from the count once, after
    creation or a checkpoint's load); the arithmetic is torch's (get_ema_multi_avg_fn)."""

    def __init__(self, model: nn.Module, decay: float):
        self.update = get_ema_multi_avg_fn(decay)
        super().__init__(model, multi_avg_fn=self.update, use_buffers=True)
        self.started: bool | None = None  # unknown: read from n_averaged at the next update

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.started = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self.started is None:
            self.started = bool(self.n_averaged > 0)  # once
        if not self.started:  # the first update copies the weights (AveragedModel's own)
            super().update_parameters(model)
            self.started = True
            return
        pairs = list(zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                         itertools.chain(model.parameters(), model.buffers()), strict=True))
        # by kind, as AveragedModel groups them: torch's function lerps floating-point tensors in one foreach call
        # and averages the others (BatchNorm's num_batches_tracked) one by one
        for floating in (True, False):
            group = [(m.detach(), t.detach()) for m, t in pairs if m.is_floating_point() == floating]
            if group:
                self.update([m for m, _ in group], [t for _, t in group], self.n_averaged)
        self.n_averaged += 1


def averaged(model: nn.Module, decay: float) -> Ema:
    """A copy of `model` that `update_parameters(model)` moves towards it (the first call copies it)."""
    return Ema(model, decay)


def counterpart(ema: AveragedModel, model: nn.Module, part: nn.Module) -> nn.Module:
    """The EMA's module that matches `part` of `model` (the model itself, or its head on cached features)."""
    if part is model:
        return ema.module
    name = next(n for n, m in model.named_modules() if m is part)
    return ema.module.get_submodule(name)
