"""The checkpoint of a training job: written every epoch (and on SIGTERM, mid-epoch), read back on resume.

SageMaker syncs the checkpoint folder (config.checkpoint_dir()) to S3, so a managed spot job that restarts
resumes where it stopped and ends with the same epochs as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imgclf import artifacts
from imgclf.config import Hyperparameters
from imgclf.errors import CheckpointError
from imgclf.training.metrics import RunningSums

CHECKPOINT_FILE = "checkpoint.pt"
# What must not change between a checkpoint and the run that resumes from it.
FINGERPRINT_HYPERPARAMETERS = ("model", "batch-size", "optimizer", "freeze", "image-size", "seed", "lr-scheduler",
                               "epochs", "warmup-epochs", "accumulate-steps", "model-ema", "model-ema-decay",
                               "layer-decay")


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


def fingerprint(hp: Hyperparameters, classes: list[str]) -> dict:
    """Under the schema's names (batch-size, ...): the checkpoints of earlier versions hold them so."""
    values = hp.to_dict()
    return {"hyperparameters": {k: values[k] for k in FINGERPRINT_HYPERPARAMETERS}, "classes": classes}


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
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e}); delete it to start afresh") from None
    if ckpt.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} belongs to a different run ({ckpt.get('fingerprint', {}).get('hyperparameters')}"
            f" vs now {fingerprint['hyperparameters']}, or other classes); delete it or use another "
            "checkpoint location to start afresh"
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
