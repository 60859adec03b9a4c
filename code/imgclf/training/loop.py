"""One epoch of training and one validation pass, in the manner of torchvision's references/classification.

`train_one_epoch` runs this rank's steps, `validate` the validation pass, `select_best` keeps the best
epoch's weights and `check_selected` fails a run that has none (diverged); `job.train_job` wires them together
over a `Setup`. Every rank runs the same steps: a stop (SIGTERM, a rule that stops the job) is agreed between
the ranks by `coordinated_stop` so that all stop at the same one.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from imgclf import models
from imgclf.config import Hyperparameters
from imgclf.data import DeviceBatches
from imgclf.debugging.debugger import Debugger
from imgclf.errors import RuleStop, TrainingDiverged, TrainingInterrupted
from imgclf.preprocessing import Preprocessing
from imgclf.training import checkpoint, distributed, ema
from imgclf.training.accel import Accel
from imgclf.training.checkpoint import State
from imgclf.training.distributed import Context
from imgclf.training.evaluate import Evaluation, evaluate
from imgclf.training.features import FrozenFeatures
from imgclf.training.metrics import DeviceSums, RunningSums
from imgclf.training.mixing import BatchMix
from imgclf.training.progress import Progress
from imgclf.training.sampling import EpochSampler
from imgclf.training.schedule import accumulation

log = logging.getLogger("imgclf.train")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # SageMaker's stop (spot interruption, StopTrainingJob); Ctrl-C


class StopFlag:
    """A stop signal asks the loop to checkpoint and stop at the next batch; `requested` is its name."""

    def __init__(self):
        self.requested: str | None = None
        for stop in STOP_SIGNALS:
            signal.signal(stop, self._handle)

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint and stopping after this batch", self.requested)


# Batches between the ranks' agreements on stopping, with several processes: an agreement is a collective whose
# answer the host reads (a GPU sync), so not every step; a stop (SIGTERM, a rule) waits at most this many batches.
AGREE_EVERY = 10


def stop_reason(check: Callable[[], None],
                requested: Callable[[], BaseException | None] = lambda: None) -> BaseException | None:
    """Run `check` (debugging rules: may raise RuleStop), else ask `requested` (SIGTERM): this rank's reason to
    stop, or None."""
    try:
        check()
    except RuleStop as e:
        return e
    return requested()


def coordinated_stop(dist: Context, check: Callable[[], None],
                     requested: Callable[[], BaseException | None] = lambda: None) -> BaseException | None:
    """stop_reason, and the first rank's reason goes to every rank, so that all stop at the same point. None: carry
    on."""
    return dist.first_error(stop_reason(check, requested))


@dataclass
class Setup:
    """What one training run is wired from: the functions below read it, `job.build_setup` makes it."""
    hp: Hyperparameters
    model: nn.Module
    head: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    speed: Accel
    device: torch.device
    dist: Context
    dbg: Debugger
    sampler: EpochSampler
    rank_batch: int  # this rank's share of the global batch-size
    train_loader: DeviceBatches
    eval_loaders: dict[str, DeviceBatches]
    cache: FrozenFeatures
    classes: list[str]
    fingerprint: dict
    checkpoints: Path
    stop: StopFlag
    preprocessing: Preprocessing  # the transforms' settings, written to config.json
    ema: AveragedModel | None = None  # model-ema: the average that is validated, selected and saved
    mix: BatchMix | None = None  # mixup / cutmix

    def save_checkpoint(self, state: State, best: dict | None) -> None:
        if self.dist.is_main:  # rank 0 writes; every rank holds the same weights
            checkpoint.save(self.checkpoints, self.model, self.optimizer, self.scheduler, state, self.fingerprint,
                            best, self.ema)

    def evaluated(self, step_model: nn.Module) -> nn.Module:
        """What validation runs and selection keeps: the module the steps train, or with model-ema its average."""
        return step_model if self.ema is None else ema.counterpart(self.ema, self.model, step_model)

    def interruption(self, state: State) -> TrainingInterrupted | None:
        if not self.stop.requested:
            return None
        return TrainingInterrupted(
            f"stopped by {self.stop.requested} in epoch {state.epoch + 1}, batch {state.batches_done}; checkpoint "
            f"saved in "
            f"{self.checkpoints}: run the same job again to resume")


def backbone_trains(hp: Hyperparameters, epoch: int) -> bool:
    return hp.freeze == "none" or (hp.freeze == "head-then-all" and epoch >= hp.head_epochs)


def epoch_batches(setup: Setup, state: State) -> tuple[nn.Module, object, object, bool]:
    """(module the steps run, training batches, validation batches, on cached features?) for state.epoch."""
    trains_backbone = backbone_trains(setup.hp, state.epoch)
    models.set_trainable(setup.model, setup.head, trains_backbone)
    models.train_mode(setup.model, setup.head, trains_backbone)
    setup.sampler.set_epoch(state.epoch, skip=state.batches_done * setup.rank_batch)
    # Frozen backbone + cache: the head trains on cached features, same batches as the normal loop.
    cached = setup.cache.for_epoch(trains_backbone)
    step_model, loader, valid_loader = cached or (setup.model, setup.train_loader, setup.eval_loaders["valid"])
    if setup.dist.world_size > 1:
        indices = [index for index, _seed in setup.sampler]
        log.info("rank %d/%d epoch %d: %d samples, digest %s", setup.dist.rank, setup.dist.world_size, state.epoch + 1,
                 len(indices), distributed.sample_digest(indices))
    return step_model, loader, valid_loader, cached is not None


def train_one_epoch(setup: Setup, state: State, step_model: nn.Module, loader, best: dict | None) -> RunningSums:
    """This rank's steps of state.epoch (from state.batches_done on); returns the epoch's sums over all ranks.
    On SIGTERM saves a checkpoint and raises TrainingInterrupted; a stopping rule raises RuleStop."""
    before = state.running  # all ranks' sums before a resume (zero otherwise)
    sums = DeviceSums()  # this rank's, from here on: read (a host sync) only at a stop and at the end
    train_model = setup.dist.wrap(step_model)  # DDP with several ranks
    setup.dbg.epoch_begin(state.epoch)
    batches = state.batches_done + len(loader)  # a resumed epoch's loader has the rest
    progress = Progress(f"epoch {state.epoch + 1}/{setup.hp.epochs}", batches,
                        setup.hp.log_interval if setup.dist.is_main else 0, done=state.batches_done)
    stopping: BaseException | None = None
    pending: BaseException | None = None
    for images, labels in loader:
        images, labels = setup.speed.inputs(images), labels.to(setup.device, non_blocking=True)
        setup.dbg.step_begin()  # debugging: data wait ends
        group, steps = accumulation(state.batches_done, batches, setup.hp.accumulate_steps)
        if state.batches_done % setup.hp.accumulate_steps == 0:  # a new group of batches whose gradients add up
            setup.optimizer.zero_grad(set_to_none=True)
        # mixup/cutmix: soft targets (train accuracy still counts the unmixed labels)
        images, targets = (images, labels) if setup.mix is None else setup.mix.maybe(images, labels, state.epoch)
        with setup.speed.autocast():
            logits = train_model(images)
            loss = setup.criterion(logits, targets)
        setup.dbg.mark("forward")
        setup.speed.backward(loss / group if group > 1 else loss)
        setup.dbg.mark("backward")
        if steps:
            setup.speed.step(setup.optimizer)
            if setup.ema is not None:
                setup.ema.update_parameters(setup.model)
        setup.dbg.mark("optimizer")
        # No host sync per step: the loss stays on the device; progress and the debugger read it back at their
        # intervals, and several processes agree on stopping every AGREE_EVERY batches.
        loss_value = loss.detach()
        sums.add(loss_value, logits, labels)
        state.batches_done += 1
        progress.update(loss_value)
        # collection and rules; this rank's reason to stop is kept until the ranks agree (every step with one)
        pending = stop_reason(partial(setup.dbg.step_end, loss_value), lambda: setup.interruption(state)) or pending
        if setup.dist.world_size == 1 or state.batches_done % AGREE_EVERY == 0 or state.batches_done == batches:
            stopping = setup.dist.first_error(pending) or stopping
        if steps:  # the schedule moves per optimizer step (training.schedule), after the debugger saw this one's lr
            setup.scheduler.step()
        if stopping is not None and steps:  # SIGTERM or a stop rule: resumable from here, after an optimizer step
            state.running = before.merge(sums.read().all_ranks(setup.dist))
            setup.save_checkpoint(state, best)
            progress.close()
            raise stopping
    progress.close()
    return before.merge(sums.read().all_ranks(setup.dist))


def validate(setup: Setup, step_model: nn.Module, loader, cached: bool) -> Evaluation:
    setup.dist.same_buffers(step_model)
    with setup.speed.autocast():
        # With label smoothing the training loss is smoothed: the validation loss under the same criterion too.
        valid = evaluate(step_model, loader, len(setup.classes), setup.device, on_batch=setup.dbg.eval_batch,
                         train_criterion=setup.criterion if setup.hp.label_smoothing else None)
    # Each rank evaluated its shard, except on cached features, where every rank has all of valid.
    return valid if cached else setup.dist.reduce_evaluation(valid)


# metrics.json's `selected_by`: the rule that picked best_epoch, in words.
SELECTION = {"accuracy": "highest validation accuracy, ties broken by the lower validation loss",
             "loss": "lowest validation loss"}


def better(valid: Evaluation, state: State, select_by: str) -> str | None:
    """Why this epoch beats the one selected so far (None if it does not). accuracy: higher validation accuracy,
    or the same with a lower validation loss (small validation sets tie often; the lower loss is the surer model);
    loss: lower validation loss."""
    if select_by == "loss":
        return "lower validation loss" if valid.loss < state.best_loss else None
    if valid.accuracy > state.best_accuracy:
        return "higher validation accuracy"
    if valid.accuracy == state.best_accuracy and valid.loss < state.best_loss:
        return "same validation accuracy, lower validation loss"
    return None


def select_best(state: State, valid: Evaluation, model: nn.Module, best: dict | None,
                select_by: str = "accuracy") -> dict | None:
    """The weights of the best epoch so far (by `select_by`: see `better`), on the CPU. An epoch whose validation
    loss is not finite (NaN/Inf: diverged) is never selected, however its accuracy compares: NaN logits still
    have an argmax, so a diverged model scores the share of one class."""
    if not math.isfinite(valid.loss):
        log.warning("epoch %d: validation loss is %s: the model diverged; this epoch cannot be selected",
                    state.epoch + 1, valid.loss)
    elif why := better(valid, state, select_by):
        if state.best_epoch > 0:
            log.info("epoch %d replaces epoch %d as the selected one: %s", state.epoch + 1, state.best_epoch, why)
        state.best_accuracy, state.best_loss, state.best_epoch = valid.accuracy, valid.loss, state.epoch + 1
        state.epochs_without_improvement = 0
        return copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
    state.epochs_without_improvement += 1
    return best


def check_selected(hp: Hyperparameters, state: State) -> None:
    """Raise TrainingDiverged unless the selected epoch has a finite validation loss: a diverged model is not
    written, exported or served (its NaN probabilities are not even JSON). The rules and the profiler report,
    written however the job ends, show where the loss went non-finite."""
    selected = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    if selected is not None and math.isfinite(selected["valid_loss"]):
        return
    bad = [r for r in state.history if not math.isfinite(r["valid_loss"])]
    advice = (f"lower lr (now {hp.lr:g}: try a tenth of it); rules.json and the profiler report "
              "(exploding_tensor, loss_not_decreasing) show the step where the loss first went NaN/Inf")
    if selected is not None:  # selected before this check existed (a checkpoint of an older version)
        raise TrainingDiverged(
            f"validation loss is {selected['valid_loss']} at the selected epoch {selected['epoch']}: the model "
            f"diverged and nothing was exported; {advice}")
    if not bad:  # no epoch ran: nothing to select
        raise TrainingDiverged(f"no epoch was selected ({len(state.history)} run): nothing to export")
    losses = ", ".join(f"epoch {r['epoch']}: {r['valid_loss']}" for r in bad[:4]) + (", ..." if len(bad) > 4 else "")
    raise TrainingDiverged(f"validation loss is not finite in any epoch ({losses}): the model diverged and nothing "
                           f"was exported; {advice}")


def stops_early(hp: Hyperparameters, state: State) -> bool:
    if hp.early_stopping_patience and state.epochs_without_improvement >= hp.early_stopping_patience:
        log.info("early stopping: no better epoch (select-by=%s) for %d epochs", hp.select_by,
                 state.epochs_without_improvement)
        return True
    return False
