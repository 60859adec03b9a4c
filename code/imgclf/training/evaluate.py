"""Loss, accuracy, per-class accuracy and the confusion matrix of a model on one split."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    confusion: torch.Tensor  # [true, predicted] counts
    smoothed_loss: float | None = None  # mean loss under the training criterion (label smoothing), when asked
    predictions: list[int] | None = None  # the predicted class of each image in the loader's order, when asked

    def per_class_accuracy(self, class_names: list[str]) -> dict[str, float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return {name: round(float(c), 6) for name, c in zip(class_names, self.confusion.diag() / totals)}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, on_batch=None,
             train_criterion: nn.Module | None = None, keep_predictions: bool = False) -> Evaluation:
    """One pass over `loader`; `on_batch(step, loss)` sees each batch's mean loss (evaluation-mode collection).
    `train_criterion` (the training loss, with label smoothing) is also computed, to compare like with like.
    `keep_predictions`: also each image's predicted class (which files a class is confused on)."""
    was_training = model.training
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total_loss, smoothed, seen = 0.0, 0.0, 0
    predictions: list[int] = []
    for step, (images, labels) in enumerate(loader):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        loss = criterion(logits, labels)
        total_loss += loss.item()
        if train_criterion is not None:
            smoothed += train_criterion(logits, labels).item() * labels.numel()
        seen += labels.numel()
        predicted = logits.argmax(1)
        confusion += torch.bincount(
            (labels * num_classes + predicted).cpu(), minlength=num_classes * num_classes
        ).view(num_classes, num_classes)
        if keep_predictions:
            predictions += predicted.tolist()
        if on_batch is not None:
            on_batch(step, loss.item() / labels.numel())
    model.train(was_training)
    accuracy = float(confusion.diag().sum()) / max(seen, 1)
    return Evaluation(total_loss / max(seen, 1), accuracy, confusion,
                      smoothed / max(seen, 1) if train_criterion is not None else None,
                      predictions if keep_predictions else None)
