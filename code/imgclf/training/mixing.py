"""Mixup and CutMix on training batches (torchvision.transforms.v2), as in timm and torchvision's references.

A mixed batch's targets are class probabilities (each row sums to 1), which nn.CrossEntropyLoss takes as they
are (label smoothing included). Mixing draws from torch's global generator, which the checkpoint saves, so a
resumed run mixes the same batches the same way.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from imgclf.config import Hyperparameters


class BatchMix:
    """`maybe(images, labels, epoch)`: with probability mixup-prob, before mixup-off-epoch, the batch mixed by Mixup
    or CutMix (one of them, evenly, when both are on) with soft targets; otherwise the batch as it is."""

    def __init__(self, hp: Hyperparameters, num_classes: int):
        mixers = [*([v2.MixUp(alpha=hp.mixup, num_classes=num_classes)] if hp.mixup else []),
                  *([v2.CutMix(alpha=hp.cutmix, num_classes=num_classes)] if hp.cutmix else [])]
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
        self.prob, self.off_epoch = hp.mixup_prob, hp.mixup_off_epoch

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters, num_classes: int) -> BatchMix | None:
        return cls(hp, num_classes) if hp.mixup or hp.cutmix else None

    def maybe(self, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`epoch` 0-based; labels come back as they are when this batch is not mixed."""
        if (self.off_epoch and epoch + 1 >= self.off_epoch) or torch.rand(()).item() >= self.prob:
            return images, labels
        return self.mix(images, labels)
