"""The training job: SAGEMAKER_TRAINING_MODULE=imgclf.train:main, run by the toolkit's `train` command.

Reads hyperparameters and channels through the toolkit's Environment, validates everything before the
first step, fine-tunes, selects the best epoch on the validation split, evaluates it once on the test
split and writes the model directory and reports. Checkpoints every epoch (and on SIGTERM, mid-epoch) so
that a managed spot job resumes where it stopped and ends with the same epochs as an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imgclf import accel, artifacts, config, data, distributed, features, models
from imgclf.debugger import Debugger
from imgclf.distributed import SINGLE, Context
from imgclf.errors import CheckpointError, RuleStop, TrainingInterrupted, UserError
from imgclf.evaluate import Evaluation, evaluate

log = logging.getLogger("imgclf.train")
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class Paths:
    model: Path
    output_data: Path
    failure: Path
    checkpoints: Path
    channels: dict[str, str]


class EpochSampler(torch.utils.data.Sampler):
    """Data order and augmentation fixed by (seed, epoch): a resumed run sees exactly the same batches.

    Yields (index, sample_seed) pairs; `skip` drops the samples already trained on before an interruption.
    With several ranks each takes every world_size-th sample of the epoch's order (padded by repeating its
    start so all ranks run the same number of steps, like DistributedSampler): the ranks' k-th batches
    together are the single-process k-th batch of the global batch size.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def shard(self) -> list[int]:
        """This rank's indices of the epoch (all of them with one rank)."""
        order = self.order()
        if self.world_size == 1:
            return order
        per_rank = -(-self.size // self.world_size)
        padded = (order * -(-per_rank * self.world_size // self.size))[:per_rank * self.world_size]
        return padded[self.rank::self.world_size]

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_033
        return iter([(i, (base + i) % 2**63) for i in self.shard()[self.skip:]])

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.skip


class SeededDataset(data.ImageDataset):
    """Runs the (random) transform under the sample's own seed, whatever worker process loads it."""

    def __getitem__(self, item):
        index, seed = item
        path, label = self.samples[index]
        image = data.load_rgb(path, self.draft_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


@dataclass
class State:
    """Everything a checkpoint holds besides model/optimizer/scheduler tensors."""
    epoch: int = 0  # next epoch to run (0-based)
    batches_done: int = 0  # of that epoch, when interrupted mid-epoch
    running: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0})
    history: list = field(default_factory=list)
    best_accuracy: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0


class StopFlag:
    """SIGTERM (spot interruption, StopTrainingJob) asks the loop to checkpoint and stop at the next batch."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint and stopping after this batch")
        self.requested = True


def num_workers(hp) -> int:
    """-1: one per CPU up to 8, shared between the training processes of a host (torchrun's LOCAL_WORLD_SIZE)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, (os.cpu_count() or 1) // local_processes)) if hp.num_workers < 0 else hp.num_workers


def make_loader(dataset, hp, sampler=None, batch_size=None) -> torch.utils.data.DataLoader:
    workers = num_workers(hp)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or hp.batch_size, sampler=sampler, num_workers=workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        prefetch_factor=hp.prefetch_factor if workers > 0 else None,
    )


def make_optimizer(hp, groups) -> torch.optim.Optimizer:
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=hp.lr, weight_decay=hp.weight_decay)


def make_scheduler(hp, optimizer):
    if hp.lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.epochs)
    if hp.lr_scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, hp.epochs // 3), gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def backbone_trains(hp, epoch: int) -> bool:
    return hp.freeze == "none" or (hp.freeze == "head-then-all" and epoch >= hp.head_epochs)


def metrics_line(prefix: dict, **values: float) -> str:
    """`epoch=3 train_loss=0.9100 valid_accuracy=0.7312`: what METRIC_DEFINITIONS' regexes read."""
    return " ".join([f"{k}={v}" for k, v in prefix.items()] + [f"{k}={v:.6f}" for k, v in values.items()])


def _fingerprint(hp, classes: list[str]) -> dict:
    """What must not change between a checkpoint and the run that resumes from it."""
    keep = ("model", "batch-size", "optimizer", "freeze", "image-size", "seed", "lr-scheduler", "epochs")
    return {"hyperparameters": {k: hp[k] for k in keep}, "classes": classes}


def save_checkpoint(paths: Paths, model, optimizer, scheduler, state: State, fingerprint: dict, best) -> None:
    artifacts.torch_save(paths.checkpoints / CHECKPOINT_FILE, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "best_model": best, "state": state.__dict__, "fingerprint": fingerprint,
        "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
    })


def load_checkpoint(paths: Paths, fingerprint: dict) -> dict | None:
    path = paths.checkpoints / CHECKPOINT_FILE
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


def run(hp, paths: Paths, device: torch.device | None = None, dist: Context = SINGLE) -> dict:
    """Train under the Debugger: rules.json and the profiler report are written however training ends."""
    device = device or dist.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Only rank 0 collects, evaluates rules and writes reports; the others run with debugging off.
    debug_hp = hp if dist.is_main else config.Hyperparameters({**hp, "debugging": False})
    with Debugger(debug_hp, paths.output_data.parent, device) as dbg:
        return train_job(hp, paths, device, dbg, dist)


def check_inputs(hp, paths: Paths, check_decode: bool = True) -> dict[str, data.Split]:
    """Model name and data, before anything trains (the distributed launcher runs it before the workers)."""
    models.check_model_name(hp.model)
    return data.validate_splits(data.find_split_dirs(paths.channels), check_decode=check_decode,
                                workers=max(2, num_workers(hp)))


def train_job(hp, paths: Paths, device: torch.device, dbg: Debugger, dist: Context = SINGLE) -> dict:
    splits = check_inputs(hp, paths, check_decode=dist.world_size == 1)  # the launcher decoded every file
    classes = splits["train"].classes
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)

    model = models.build_backbone(hp.model)
    if hp.pretrained:
        weights = paths.channels.get("weights")
        models.load_pretrained(model, hp.model, Path(weights) if weights else None, hp.download_weights)
    head = models.replace_head(model, len(classes))
    model.to(device)
    acc = accel.from_hyperparameters(hp, model, device)
    acc.prepare(model)  # channels_last, compile
    log.info("speed settings: %s", acc.describe())
    optimizer = make_optimizer(hp, models.param_groups(model, head, hp.lr, hp.backbone_lr_factor))
    scheduler = make_scheduler(hp, optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing)
    dbg.attach(model, optimizer, criterion)  # debugging: init-scale, layer statistics, smdebug

    size = hp.image_size
    draft = data.resize_size(size)
    # batch-size is the global batch: each of the world_size ranks takes its share of every step.
    rank_batch = max(1, hp.batch_size // dist.world_size)
    if rank_batch * dist.world_size != hp.batch_size:
        log.warning("batch-size=%d is not a multiple of %d processes: each takes %d, %d per step in all",
                    hp.batch_size, dist.world_size, rank_batch, rank_batch * dist.world_size)
    rank_hp = hp if dist.world_size == 1 else config.Hyperparameters({**hp, "batch-size": rank_batch})
    sampler = EpochSampler(len(splits["train"].samples), hp.seed, rank=dist.rank, world_size=dist.world_size)
    train_loader = make_loader(SeededDataset(splits["train"].samples, data.train_transform(size, hp.augment),
                                             draft), rank_hp, sampler=sampler)
    eval_tf = data.eval_transform(size)
    eval_loaders = {name: make_loader(data.ImageDataset(dist.shard(s.samples), eval_tf, draft), rank_hp)
                    for name, s in splits.items() if name != "train"}
    # Every rank extracts the features of all images, then trains the head on its shard (same sampler).
    cache = features.FrozenFeatures(rank_hp, model, head, acc, splits, sampler, lambda ds: make_loader(ds, rank_hp))

    fingerprint = _fingerprint(hp, classes)
    state, best = State(), None
    ckpt = dist.from_main(lambda: load_checkpoint(paths, fingerprint))  # rank 0's, on every rank
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = State(**ckpt["state"])
        best = ckpt["best_model"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate((3, tuple(ckpt["rng"]["python"]), None))
        log.info("resuming from checkpoint %s: epoch %d, batch %d", paths.checkpoints / CHECKPOINT_FILE,
                 state.epoch + 1, state.batches_done)

    stop = StopFlag()
    log.info("training %s (%s, freeze=%s) on %s: %d classes, %d epochs%s", hp.model,
             "pretrained" if hp.pretrained else "random init", hp.freeze, device, len(classes), hp.epochs,
             f", rank {dist.rank} of {dist.world_size} ({rank_batch} images per step each)"
             if dist.world_size > 1 else "")
    while state.epoch < hp.epochs:
        epoch = state.epoch
        trains_backbone = backbone_trains(hp, epoch)
        models.set_trainable(model, head, trains_backbone)
        models.train_mode(model, head, trains_backbone)
        sampler.set_epoch(epoch, skip=state.batches_done * rank_batch)
        started = time.monotonic()
        base = state.running  # sums of all ranks so far this epoch (non-zero when resuming mid-epoch)
        run_ = {"loss": 0.0, "correct": 0, "seen": 0}  # this rank's, from here on
        # Frozen backbone + cache: the head trains on cached features, same batches as the normal loop.
        cached = cache.for_epoch(trains_backbone)
        step_model, loader, valid_loader = cached or (model, train_loader, eval_loaders["valid"])
        train_model = dist.wrap(step_model)  # DDP with several ranks
        if dist.world_size > 1:
            indices = [index for index, _seed in sampler]
            log.info("rank %d/%d epoch %d: %d samples, digest %s", dist.rank, dist.world_size, epoch + 1,
                     len(indices), distributed.sample_digest(indices))
        dbg.epoch_begin(epoch)
        for images, labels in loader:
            images, labels = acc.inputs(images), labels.to(device, non_blocking=True)
            dbg.step_begin()  # debugging: data wait ends
            optimizer.zero_grad(set_to_none=True)
            with acc.autocast():
                logits = train_model(images)
                loss = criterion(logits, labels)
            dbg.mark("forward")
            acc.backward(loss)
            dbg.mark("backward")
            acc.step(optimizer)
            dbg.mark("optimizer")
            run_["loss"] += loss.item() * labels.numel()
            run_["correct"] += int((logits.argmax(1) == labels).sum())
            run_["seen"] += labels.numel()
            state.batches_done += 1
            stopping = None
            try:
                dbg.step_end(loss.item())  # debugging: collection and rules; may raise RuleStop
            except RuleStop as e:
                stopping = e
            if stopping is None and stop.requested:
                stopping = TrainingInterrupted(
                    f"stopped by SIGTERM in epoch {epoch + 1}, batch {state.batches_done}; checkpoint saved in "
                    f"{paths.checkpoints}: run the same job again to resume"
                )
            stopping = dist.first_error(stopping)  # all ranks stop at the same step
            if isinstance(stopping, TrainingInterrupted):
                state.running = dist.add_sums(base, run_)
                if dist.is_main:
                    save_checkpoint(paths, model, optimizer, scheduler, state, fingerprint, best)
            if stopping is not None:
                raise stopping
        with acc.autocast():
            valid = evaluate(step_model, valid_loader, len(classes), device, on_batch=dbg.eval_batch)
        if not cached:  # each rank evaluated its shard (cached features: every rank has all of valid)
            valid = dist.reduce_evaluation(valid)
        run_ = dist.add_sums(base, run_)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = {
            "epoch": epoch + 1, "train_loss": run_["loss"] / max(run_["seen"], 1),
            "train_accuracy": run_["correct"] / max(run_["seen"], 1), "valid_loss": valid.loss,
            "valid_accuracy": valid.accuracy, "lr": lr, "seconds": round(time.monotonic() - started, 3),
        }
        state.history.append(record)
        if dist.is_main:
            print(metrics_line({"epoch": epoch + 1}, **{k: record[k] for k in
                  ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")}), flush=True)
        stopping = None
        try:
            dbg.epoch_end(state.history)  # debugging: epoch rules, rules.json; may raise RuleStop
        except RuleStop as e:
            stopping = e
        stopping = dist.first_error(stopping)
        if stopping is not None:
            raise stopping
        if valid.accuracy > state.best_accuracy:
            state.best_accuracy, state.best_epoch = valid.accuracy, epoch + 1
            state.epochs_without_improvement = 0
            best = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
        else:
            state.epochs_without_improvement += 1
        state.epoch, state.batches_done = epoch + 1, 0
        state.running = {"loss": 0.0, "correct": 0, "seen": 0}
        if dist.is_main:
            save_checkpoint(paths, model, optimizer, scheduler, state, fingerprint, best)
        if hp.early_stopping_patience and state.epochs_without_improvement >= hp.early_stopping_patience:
            log.info("early stopping: no better validation accuracy for %d epochs", state.epochs_without_improvement)
            break

    model.load_state_dict(best)
    log.info("best epoch %d (validation accuracy %.4f)", state.best_epoch, state.best_accuracy)
    return finish(hp, paths, model, classes, state, eval_loaders, device, dist)


def finish(hp, paths: Paths, model, classes, state: State, eval_loaders, device, dist: Context = SINGLE) -> dict:
    """Evaluate the selected model once on test, write the model directory and the reports (rank 0)."""
    final: dict[str, Evaluation] = {
        name: dist.reduce_evaluation(evaluate(model, eval_loaders[name], len(classes), device))  # rank shards
        for name in ("valid", "test") if name in eval_loaders}
    if not dist.is_main:
        return {"best_epoch": state.best_epoch, **{f"{name}_accuracy": e.accuracy for name, e in final.items()}}
    if "test" in final:
        print(metrics_line({}, test_loss=final["test"].loss, test_accuracy=final["test"].accuracy), flush=True)
    else:
        log.warning("no test split: test metrics skipped")
    report = "test" if "test" in final else "valid"
    metrics = {
        "history": state.history, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
        **{f"{name}_loss": e.loss for name, e in final.items()},
        **{f"{name}_accuracy": e.accuracy for name, e in final.items()},
        "per_class_accuracy": {"split": report, **final[report].per_class_accuracy(classes)},
        "hyperparameters": dict(hp),
    }
    artifacts.write_json(paths.output_data / "metrics.json", metrics)
    rows = [",".join(["true\\predicted", *classes])]
    rows += [",".join([name, *map(str, row.tolist())]) for name, row in zip(classes, final[report].confusion)]
    artifacts.write_text(paths.output_data / f"confusion_matrix_{report}.csv", "\n".join(rows) + "\n")
    artifacts.save_model(paths.model, model, {
        "architecture": hp.model, "class_names": classes, "image_size": hp.image_size,
        "resize_size": data.resize_size(hp.image_size), "mean": list(data.IMAGENET_MEAN),
        "std": list(data.IMAGENET_STD),
        "metrics": {k: metrics[k] for k in metrics if k.endswith(("_accuracy", "_loss"))},
        "hyperparameters": dict(hp),
    })
    log.info("model written to %s, reports to %s", paths.model, paths.output_data)
    return metrics


def write_failure(path: Path, message: str) -> None:
    """First line says what to fix; SageMaker shows the first 1,024 characters as FailureReason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(message + "\n")


def main() -> None:
    """Entry point for the toolkit (SAGEMAKER_TRAINING_MODULE=imgclf.train:main)."""
    from sagemaker_training import environment

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, force=True,
                        format=f"%(asctime)s %(levelname)s {distributed.log_tag()}%(name)s: %(message)s")
    output_dir = Path(environment.output_dir)
    # The toolkit creates neither model/ nor output/; without output/ a failure would be swallowed.
    for d in (Path(environment.model_dir), output_dir / "data"):
        d.mkdir(parents=True, exist_ok=True)
    failure = output_dir / "failure"
    try:
        env = environment.Environment()
        paths = Paths(Path(env.model_dir), Path(env.output_data_dir), failure, Path(config.checkpoint_dir()),
                      dict(env.channel_input_dirs))
        hp = config.parse_hyperparameters(env.hyperparameters)
        if distributed.is_worker():  # started by torchrun below, on this host or another
            with distributed.worker() as dist:
                run(hp, paths, dist=dist)
            return
        plan = distributed.make_plan(env.hosts, env.current_host, hp.processes_per_host,
                                     env.network_interface_name)
        if plan.world_size > 1:
            check_inputs(hp, paths)  # bad data or model name: one clear error before any worker starts
            distributed.launch(plan)
            return
        run(hp, paths)
    except UserError as e:
        log.error("training failed: %s", e)
        write_failure(failure, f"{type(e).__name__}: {e}")
        raise
    except Exception as e:
        write_failure(failure, f"Internal error ({type(e).__name__}: {e}); the job log has the traceback")
        raise
