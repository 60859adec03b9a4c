"""An exponential moving average of the weights (`model-ema`), as in timm and torchvision's references: after
every optimizer step, ema = decay * ema + (1 - decay) * weights, buffers (BatchNorm statistics) included. The
averaged weights are the ones validated, selected, saved, exported and served; the checkpoint holds them, so a
resumed run continues the same average.
"""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def averaged(model: nn.Module, decay: float) -> AveragedModel:
    """A copy of `model` that `update_parameters(model)` moves towards it (the first call copies it)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def counterpart(ema: AveragedModel, model: nn.Module, part: nn.Module) -> nn.Module:
    """The EMA's module that matches `part` of `model` (the model itself, or its head on cached features)."""
    if part is model:
        return ema.module
    name = next(n for n, m in model.named_modules() if m is part)
    return ema.module.get_submodule(name)
