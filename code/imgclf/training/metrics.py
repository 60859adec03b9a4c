"""What an epoch measures: the running sums of the training steps, the epoch's record and its metrics line."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from imgclf.training.evaluate import Evaluation


@dataclass
class RunningSums:
    """Sums over the training samples seen so far in an epoch (one rank's, or all ranks' after `all_ranks`)."""
    loss: float = 0.0  # sum of the per-sample losses
    correct: int = 0
    seen: int = 0

    def add(self, mean_loss: float, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: its mean loss and its predictions."""
        self.loss += mean_loss * labels.numel()
        self.correct += int((logits.argmax(1) == labels).sum())
        self.seen += labels.numel()

    def merge(self, other: RunningSums) -> RunningSums:
        return RunningSums(self.loss + other.loss, self.correct + other.correct, self.seen + other.seen)

    def all_ranks(self, dist) -> RunningSums:
        """These sums added over every rank of `dist` (a distributed.Context; itself with one process)."""
        loss, correct, seen = dist.sum([self.loss, float(self.correct), float(self.seen)])
        return RunningSums(loss, int(correct), int(seen))

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)

    def to_dict(self) -> dict:
        return asdict(self)


class DeviceSums:
    """RunningSums of the training steps, kept where they run: adding a batch reads nothing back from the device
    (no host sync per step); `read` does, once. The loss sums in float64, so the result is exactly RunningSums'."""

    def __init__(self):
        self.loss: torch.Tensor | None = None  # float64 sum of the per-sample losses
        self.correct: torch.Tensor | None = None
        self.seen = 0

    def add(self, mean_loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: its mean loss (a 0-d tensor) and its predictions."""
        loss = mean_loss.detach().double() * labels.numel()
        correct = (logits.argmax(1) == labels).sum()
        if self.loss is None or self.correct is None:
            self.loss, self.correct = loss, correct
        else:
            self.loss += loss
            self.correct += correct
        self.seen += labels.numel()

    def read(self) -> RunningSums:
        if self.loss is None or self.correct is None:
            return RunningSums()
        loss, correct = torch.stack([self.loss, self.correct.double()]).tolist()
        return RunningSums(loss, int(correct), self.seen)


def epoch_record(epoch: int, sums: RunningSums, valid: Evaluation, lr: float, started: float,
                 feature_cache: bool) -> dict:
    """One entry of the job's history (metrics.json, rules, the profiler report); `epoch` is 0-based."""
    return {
        "epoch": epoch + 1, "train_loss": sums.mean_loss, "train_accuracy": sums.accuracy, "valid_loss": valid.loss,
        "valid_accuracy": valid.accuracy, "lr": lr, "seconds": round(time.monotonic() - started, 3),
        "feature_cache": feature_cache,  # the head trained on cached features: the backbone did not run
        # the validation loss under the training criterion (label smoothing): what the overfit rule compares
        **({"valid_loss_smoothed": valid.smoothed_loss} if valid.smoothed_loss is not None else {}),
    }


def metrics_line(prefix: dict, **values: float) -> str:
    """`epoch=3 train_loss=0.9100 valid_accuracy=0.7312`: what METRIC_DEFINITIONS' regexes read."""
    return " ".join([f"{k}={v}" for k, v in prefix.items()] + [f"{k}={v:.6f}" for k, v in values.items()])


def epoch_line(record: dict) -> str:
    return metrics_line({"epoch": record["epoch"]}, **{k: record[k] for k in
                        ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")})
