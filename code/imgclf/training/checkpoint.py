"""The checkpoint of a training job: written every epoch (and on SIGTERM, mid-epoch), read back on resume.

SageMaker syncs the checkpoint folder (config.checkpoint_dir()) to S3, so a managed spot job that restarts
resumes where it stopped and ends with the same epochs as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgclf import artifacts
from imgclf.config import Hyperparameters
from imgclf.errors import CheckpointError
from imgclf.splits import Split
from imgclf.training.metrics import RunningSums

CHECKPOINT_FILE = "checkpoint.pt"
# Hyperparameters that may change between a checkpoint and the run that resumes from it: how fast the data is
# read, what is logged or reported, how the model is exported. Every other one shapes the weights, and so does the
# data: a checkpoint of other values or other images is refused, not silently continued.
RESUME_MAY_CHANGE = ("num-workers", "prefetch-factor", "decoded-cache", "decoded-cache-memory", "compile",
                     "channels-last", "download-weights", "log-interval", "debugging", "rules", "rules-config",
                     "rules-stop", "collect-train-interval", "collect-eval-interval", "collect-stats-interval",
                     "monitor-interval-ms", "profiler-steps", "profiler-start-step", "export-int8", "onnx-exporter")


@dataclass
class State:
    """Everything a checkpoint holds besides model/optimizer/scheduler tensors."""
    epoch: int = 0  # next epoch to run (0-based)
    batches_done: int = 0  # of that epoch, when interrupted mid-epoch
    running: RunningSums = field(default_factory=RunningSums)  # all ranks' sums of that epoch so far
    history: list = field(default_factory=list)
    best_accuracy: float = -1.0
    best_loss: float = math.inf  # of the selected epoch: breaks accuracy ties (select-by)
    best_epoch: int = -1
    epochs_without_improvement: int = 0

    def to_dict(self) -> dict:
        """Plain types only: torch.load(weights_only=True) reads them back."""
        return {**self.__dict__, "running": self.running.to_dict()}

    @classmethod
    def from_dict(cls, values: dict) -> State:
        if "best_loss" not in values:  # a checkpoint of an older version: the selected epoch's loss is in history
            selected = [r["valid_loss"] for r in values["history"] if r["epoch"] == values["best_epoch"]]
            values = {**values, "best_loss": selected[0] if selected else math.inf}
        return cls(**{**values, "running": RunningSums(**values["running"])})

    def next_epoch(self) -> None:
        self.epoch, self.batches_done, self.running = self.epoch + 1, 0, RunningSums()


def fingerprint(hp: Hyperparameters, classes: list[str], splits: dict[str, Split]) -> dict:
    """What a checkpoint must share with the run that resumes from it: the hyperparameters (under the schema's
    names) but RESUME_MAY_CHANGE, the classes, and a digest of the train and valid images (paths inside their
    split and sizes: a changed dataset is another run)."""
    images = hashlib.sha256()
    for name in ("train", "valid"):
        for path, label in splits[name].samples if name in splits else ():
            images.update(f"{name}/{path.relative_to(splits[name].root)}/{path.stat().st_size}/{label}\n".encode())
    values = hp.to_dict()
    return {"hyperparameters": {k: v for k, v in values.items() if k not in RESUME_MAY_CHANGE}, "classes": classes,
            "images": images.hexdigest()}


def differences(saved: dict, now: dict) -> list[str]:
    """How a checkpoint's fingerprint differs from this run's, in words."""
    then, hps = saved.get("hyperparameters") or {}, now["hyperparameters"]
    said = [f"{k}={then.get(k, '(unset)')!r} then, {v!r} now" for k, v in hps.items() if then.get(k) != v]
    said += [f"{what} changed" for key, what in (("classes", "the class folders"), ("images", "the train/valid images"))
             if saved.get(key) != now[key]]
    return said


def save(folder: Path, model, optimizer, scheduler, state: State, fingerprint: dict, best: dict | None,
         ema=None) -> None:
    artifacts.torch_save(folder / CHECKPOINT_FILE, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "best_model": best, "state": state.to_dict(), "fingerprint": fingerprint,
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
    })


def load(folder: Path, fingerprint: dict) -> dict | None:
    """The checkpoint in `folder`, or None; CheckpointError when it is unreadable or belongs to another run."""
    path = folder / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a folder, an empty or truncated file, a pickle of other types
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:300]}); delete it to "
                              "start afresh") from None
    saved = ckpt.get("fingerprint") if isinstance(ckpt, dict) else None
    if saved != fingerprint:
        changed = differences(saved if isinstance(saved, dict) else {}, fingerprint)
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run ({'; '.join(changed[:6])}"
            f"{f'; and {len(changed) - 6} more' if len(changed) > 6 else ''}): delete it, or use another checkpoint "
            "location (local mode: another --output), to start afresh; or run with that run's data and values"
        )
    return ckpt


def restore(ckpt: dict, model, optimizer, scheduler, ema=None) -> tuple[State, dict]:
    """Put a loaded checkpoint back: tensors, random number generators; return its State and best weights."""
    model.load_state_dict(ckpt["model"])
    if ema is not None:  # the fingerprint has model-ema: a checkpoint of an EMA run has its average
        ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate((3, tuple(ckpt["rng"]["python"]), None))
    return State.from_dict(ckpt["state"]), ckpt["best_model"]
