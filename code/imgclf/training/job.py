"""The training job: `main` is what the toolkit's `train` command calls (SAGEMAKER_TRAINING_MODULE=imgclf.train:main,
a shim of it) and what torchrun runs in each worker (`python -m imgclf.training.job`).

Reads hyperparameters and channels through the toolkit's Environment, validates everything before the
first step, fine-tunes, selects the best epoch on the validation split, evaluates it once on the test
split and writes the model directory and reports. A run whose validation loss is NaN/Inf in every epoch
(diverged) fails with TrainingDiverged and writes no model (its rules and profiler report are written).
Checkpoints every epoch (and on SIGTERM, mid-epoch) so that a managed spot job resumes where it stopped and
ends with the same epochs as an uninterrupted one.

`train_job` reads top to bottom: build the setup, resume, then per epoch `train_one_epoch`, `validate`,
select, checkpoint (imgclf.training.loop, imgclf.training.checkpoint); `finish` writes the results.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from imgclf import artifacts, atomic, config, data, devices, export, models, splits
from imgclf.config import Hyperparameters
from imgclf.debugging import classes as classes_report
from imgclf.debugging import stop_action
from imgclf.debugging.debugger import Debugger, DebugSettings
from imgclf.errors import HyperparameterError, RuleStop, UserError
from imgclf.preprocessing import Preprocessing
from imgclf.training import checkpoint, cuda_check, distributed, ema, schedule
from imgclf.training.accel import SpeedSettings
from imgclf.training.distributed import SINGLE, Context
from imgclf.training.evaluate import Evaluation, evaluate
from imgclf.training.features import FrozenFeatures, should_cache
from imgclf.training.head_solver import fit_head
from imgclf.training.loop import (
    SELECTION,
    STOP_SIGNALS,
    Setup,
    StopFlag,
    check_selected,
    coordinated_stop,
    epoch_batches,
    select_best,
    stops_early,
    train_one_epoch,
    validate,
)
from imgclf.training.metrics import epoch_line, epoch_record, metrics_line
from imgclf.training.mixing import BatchMix
from imgclf.training.sampling import (
    EpochSampler,
    check_class_coverage,
    host_shard_splits,
    rank_sampler,
    sharded_channels,
    train_is_sharded,
)

log = logging.getLogger("imgclf.train")


@dataclass
class Paths:
    model: Path
    output_data: Path
    checkpoints: Path
    channels: dict[str, str]
    sharded: frozenset[str] = frozenset()  # channels SageMaker split between the hosts (ShardedByS3Key)


@dataclass(frozen=True)
class LoaderSettings:
    """The DataLoaders' hyperparameters num-workers and prefetch-factor."""
    num_workers: int
    prefetch_factor: int

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> LoaderSettings:
        return cls(num_workers=hp.num_workers, prefetch_factor=hp.prefetch_factor)

    def workers(self) -> int:
        """-1: the CPUs this process may use, shared between the training processes of the host (torchrun's
        LOCAL_WORLD_SIZE), less one each for the training process itself; at least one (docs/performance.md)."""
        if self.num_workers >= 0:
            return self.num_workers
        return max(1, data.cpus() // data.host_processes() - 1)

    def loader(self, dataset, batch_size: int, sampler=None, drop_last: bool = False) -> torch.utils.data.DataLoader:
        workers = self.workers()
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
            pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
        )


def make_optimizer(hp: Hyperparameters, groups, device: torch.device) -> torch.optim.Optimizer:
    """On CUDA the fused kernels (a few launches per step for all parameters; with an fp16 GradScaler they skip an
    overflowed step on the device, with no host sync); elsewhere torch's default (foreach where it has it)."""
    fused = True if device.type == "cuda" else None
    optimizer: torch.optim.Optimizer
    if hp.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, fused=fused)
    else:
        cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
    log.info("optimizer: %s, %s implementation", type(optimizer).__name__, "fused" if fused else "default")
    return optimizer


def rank_batch_size(hp: Hyperparameters, dist: Context) -> int:
    """batch-size is the global batch: each of the world_size ranks takes its share of every step."""
    rank_batch = max(1, hp.batch_size // dist.world_size)
    if rank_batch * dist.world_size != hp.batch_size:
        log.warning("batch-size=%d is not a multiple of %d processes: each takes %d, %d per step in all",
                    hp.batch_size, dist.world_size, rank_batch, rank_batch * dist.world_size)
    return rank_batch


def build_model(hp: Hyperparameters, paths: Paths, num_classes: int,
                device: torch.device) -> tuple[nn.Module, list[str], Preprocessing]:
    """The backbone (pretrained weights from the weights channel or the cache) with a new head, on `device`,
    and the preprocessing it expects (timm's data config; image-size overrides the size)."""
    model = models.build_backbone(hp.model, hp.drop_path)
    prep = models.preprocessing(hp.model, model, hp.image_size)
    if hp.pretrained:
        weights = paths.channels.get("weights")
        models.load_pretrained(model, hp.model, Path(weights) if weights else None, hp.download_weights)
    head = models.replace_head(model, num_classes)
    return model.to(device), head, prep


@dataclass
class RunBatches:
    """A run's data as the loop reads it: the training sampler and batches, the evaluation splits' batches, and
    `loader` (an ImageDataset -> this run's DataLoader) for the frozen-feature cache."""
    sampler: EpochSampler
    train: data.DeviceBatches
    evaluation: dict[str, data.DeviceBatches]
    loader: Callable[[data.ImageDataset], torch.utils.data.DataLoader]


def run_batches(hp: Hyperparameters, splits: dict[str, splits.Split], prep: Preprocessing, device: torch.device,
                dist: Context, rank_batch: int, per_host_shard: bool,
                memory_format: torch.memory_format = torch.preserve_format) -> RunBatches:
    """The datasets, decoded-cache plan, sampler and DataLoaders of a run (scripts/bench/gpu.py --real-data feeds
    its step from this too)."""
    draft = prep.resize_size
    loaders = LoaderSettings.from_hyperparameters(hp)
    # The ranks split the whole train split, or with per-host shards (ShardedByS3Key) their host's shard.
    sampler = rank_sampler(len(splits["train"].samples), hp.seed, dist, per_host_shard)
    # Workers send uint8 images; the float work happens on the device, for training and evaluation alike.
    train_set = data.ImageDataset(splits["train"].samples,
                                  data.train_transform(prep, hp.augment, hp.random_erase, uint8=True), draft)
    eval_sets = {name: data.ImageDataset(dist.shard(s.samples), data.eval_transform(prep, uint8=True), draft)
                 for name, s in splits.items() if name != "train"}
    # valid too (every epoch reads it); test is read once: decoding it ahead would save nothing. The one pass that
    # decodes runs on this process's share of the host's CPUs.
    data.plan_decoded_cache(hp.decoded_cache, hp.decoded_cache_memory,
                            {name: dataset for name, dataset in {"train": train_set, **eval_sets}.items()
                             if name != "test"},
                            threads=max(1, data.cpus() // data.host_processes()))
    normalise = data.Normalise(prep.mean, prep.std, device, memory_format)

    def loader(dataset: data.ImageDataset, **kwargs) -> torch.utils.data.DataLoader:
        return loaders.loader(dataset, rank_batch, **kwargs)

    # A last batch of one image fails in BatchNorm (one value per channel): that image sits the epoch out (the
    # shuffle leaves out another one each epoch).
    lone = len(sampler) % rank_batch == 1 and rank_batch > 1
    if lone:
        log.info("%d training images per process and batches of %d: the last batch of one image is left out of "
                 "each epoch (a batch of one cannot train BatchNorm)", len(sampler), rank_batch)
    return RunBatches(sampler, data.DeviceBatches(loader(train_set, sampler=sampler, drop_last=lone), normalise),
                      {name: data.DeviceBatches(loader(dataset), normalise) for name, dataset in eval_sets.items()},
                      loader)


def build_setup(hp: Hyperparameters, paths: Paths, splits: dict[str, splits.Split], device: torch.device,
                dbg: Debugger, dist: Context) -> Setup:
    """Model, speed settings, optimizer, loaders and feature cache of a run (seeded: every rank the same)."""
    classes = splits["train"].classes
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)
    model, head, prep = build_model(hp, paths, len(classes), device)
    log.info("preprocessing: %s", prep)
    speed = SpeedSettings.from_hyperparameters(hp).for_model(model, device)
    speed.prepare(model)  # channels_last, compile
    log.info("speed settings: %s", speed.describe())
    optimizer = make_optimizer(hp, models.param_groups(model, head, hp.lr, hp.backbone_lr_factor, hp.weight_decay,
                                                       hp.layer_decay), device)
    dbg.attach(model, optimizer)  # debugging: init-scale, layer statistics

    rank_batch = rank_batch_size(hp, dist)
    batches = run_batches(hp, splits, prep, device, dist, rank_batch, train_is_sharded(paths.sharded),
                          torch.channels_last if speed.channels_last else torch.preserve_format)
    # Every rank extracts the features of all images, then trains the head on its shard (same sampler).
    cache = FrozenFeatures(should_cache(hp), model, head, speed, splits, batches.sampler, batches.loader, rank_batch,
                           prep, watch=dbg, log_interval=hp.log_interval if dist.is_main else 0)
    steps_per_epoch = schedule.optimizer_steps(len(batches.train), hp.accumulate_steps)
    return Setup(
        hp=hp, model=model, head=head, optimizer=optimizer,
        scheduler=schedule.make_scheduler(hp, optimizer, steps_per_epoch),
        criterion=nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing), speed=speed, device=device, dist=dist,
        dbg=dbg, sampler=batches.sampler, rank_batch=rank_batch, train_loader=batches.train,
        eval_loaders=batches.evaluation,
        cache=cache, classes=classes, fingerprint=checkpoint.fingerprint(hp, classes, splits),
        checkpoints=paths.checkpoints, stop=StopFlag(), preprocessing=prep,
        ema=ema.averaged(model, hp.model_ema_decay) if hp.model_ema else None,
        mix=BatchMix.from_hyperparameters(hp, len(classes)),
    )


def resume(setup: Setup) -> tuple[checkpoint.State, dict | None]:
    """Rank 0's checkpoint, restored on every rank; a fresh State without one."""
    ckpt = setup.dist.from_main(lambda: checkpoint.load(setup.checkpoints, setup.fingerprint))
    if not ckpt:
        return checkpoint.State(), None
    state, best = checkpoint.restore(ckpt, setup.model, setup.optimizer, setup.scheduler, setup.ema)
    log.info("resuming from checkpoint %s: epoch %d, batch %d", setup.checkpoints / checkpoint.CHECKPOINT_FILE,
             state.epoch + 1, state.batches_done)
    return state, best


def run(hp: Hyperparameters, paths: Paths, device: torch.device | None = None, dist: Context = SINGLE) -> dict:
    """Train under the Debugger: rules.json and the profiler report are written however training ends."""
    device = device or dist.device or devices.default_device()
    # Only rank 0 collects, evaluates rules and writes reports; the others run with debugging off.
    with Debugger(DebugSettings.from_hyperparameters(hp), paths.output_data.parent, device,
                  enabled=dist.is_main) as dbg:
        return train_job(hp, paths, device, dbg, dist)


def check_inputs(hp: Hyperparameters, paths: Paths, check_decode: bool = True) -> dict[str, splits.Split]:
    """Model name and data, before anything trains (the distributed launcher runs it before the workers). With a
    per-host shard of train, this host's part of it (sampling.host_shard_splits)."""
    models.check_model_name(hp.model)
    if "weights" in paths.channels and not hp.pretrained:
        raise HyperparameterError("a weights channel is given, but pretrained=false: the backbone would start from "
                                  "random weights and the file would not be read; drop pretrained=false, or the "
                                  "weights channel (local mode: --weights)")
    workers = max(2, LoaderSettings.from_hyperparameters(hp).workers())
    split_dirs = splits.find_split_dirs(paths.channels)
    if train_is_sharded(paths.sharded):
        return host_shard_splits(split_dirs, lambda dirs: splits.validate_splits(dirs, check_decode=check_decode,
                                                                                 workers=workers))
    return splits.validate_splits(split_dirs, check_decode=check_decode, workers=workers)


def freeze_plan(hp: Hyperparameters) -> str:
    """What trains, from which weights, and why, for the job's first log line."""
    if hp.freeze == "none":
        return f"freeze=none: every layer trains, from {'pretrained' if hp.pretrained else 'random'} weights"
    what = ("only the new head trains" if hp.freeze == "head"
            else f"only the new head trains for {hp.head_epochs} epoch(s), then every layer")
    if hp.pretrained:
        return f"freeze={hp.freeze}: {what}, on the pretrained backbone's features"
    log.warning("freeze=%s with pretrained=false: the head learns from the features of random weights, which "
                "carry little; leave freeze at auto (none without pretrained weights) to train every layer",
                hp.freeze)
    return f"freeze={hp.freeze}: {what}, on random weights"


def head_solver(hp: Hyperparameters, cache_enabled: bool) -> tuple[str, str]:
    """(lbfgs or sgd, why): lbfgs fits a head alone on cached features once (training.head_solver)."""
    if hp.head_solver == "sgd":
        return "sgd", "head-solver=sgd"
    blocker = ("freeze is not head" if hp.freeze != "head" else "the feature cache is off" if not cache_enabled
               else "model-ema averages optimizer steps, and a fit has none" if hp.model_ema else "")
    if not blocker:
        return "lbfgs", f"head-solver={hp.head_solver}: the head trains alone on cached features"
    if hp.head_solver == "lbfgs":
        raise UserError(f"head-solver=lbfgs fits the head once on cached features, and here {blocker}: use "
                        "freeze=head with feature-cache on (no augmentation, no mixing), or head-solver=sgd")
    return "sgd", f"head-solver=auto: {blocker}"


def train_job(hp: Hyperparameters, paths: Paths, device: torch.device, dbg: Debugger,
              dist: Context = SINGLE) -> dict:
    splits = check_inputs(hp, paths, check_decode=dist.world_size == 1)  # the launcher decoded every file
    if train_is_sharded(paths.sharded):
        check_class_coverage(splits["train"], dist)
    setup = build_setup(hp, paths, splits, device, dbg, dist)
    state, best = resume(setup)
    log.info("training %s (%s) on %s: %d classes, %d epochs%s", hp.model, freeze_plan(hp), device,
             len(setup.classes), hp.epochs,
             f", rank {dist.rank} of {dist.world_size} ({setup.rank_batch} images per step each)"
             if dist.world_size > 1 else "")
    solver, why = head_solver(hp, setup.cache.enabled)
    log.info("head solver %s (%s)", solver, why)
    while state.epoch < hp.epochs:
        started = time.monotonic()
        step_model, loader, valid_loader, cached = epoch_batches(setup, state)
        fitted = solver == "lbfgs" and cached  # no cache after all (an unsupported model): the training loop
        if fitted:
            assert setup.cache.train is not None and setup.cache.valid is not None  # extracted for this epoch
            setup.dbg.epoch_begin(state.epoch)
            sums, valid = fit_head(step_model, setup.cache.train, setup.cache.valid)
        else:
            sums = train_one_epoch(setup, state, step_model, loader, best)
            valid = validate(setup, setup.evaluated(step_model), valid_loader, cached)
        lr = models.head_lr(setup.optimizer)  # at the epoch's end (it moves per step)
        state.history.append(epoch_record(state.epoch, sums, valid, lr, started, cached))
        if dist.is_main:
            print(epoch_line(state.history[-1]), flush=True)
        stopping = coordinated_stop(dist, lambda: dbg.epoch_end(state.history))  # epoch rules, rules.json
        best = select_best(state, valid, setup.evaluated(setup.model), best, hp.select_by)
        state.next_epoch()
        setup.save_checkpoint(state, best)
        if stopping is not None:  # a stop rule, after the epoch's checkpoint
            raise stopping
        if fitted:
            log.info("the head is fitted: no further epoch can improve it")
            break
        if stops_early(hp, state):
            break
    check_selected(hp, state)  # a diverged run (no finite validation loss): fail before writing the model
    assert best is not None  # check_selected: an epoch was selected, and its weights kept
    setup.model.load_state_dict(best)
    log.info("best epoch %d (validation accuracy %.4f, loss %.4f; select-by=%s)", state.best_epoch,
             state.best_accuracy, state.best_loss, hp.select_by)
    metrics = finish(hp, paths, setup.model, setup.classes, state, setup.eval_loaders, device, setup.preprocessing,
                     dist, dbg)
    if dist.is_main:  # model.onnx for serving, checked against the written weights on the validation images
        export.export(paths.model, [path for path, _ in splits["valid"].samples], int8=hp.export_int8,
                      exporter=hp.onnx_exporter)
    return metrics


def final_evaluations(model, classes, eval_loaders, device, dist: Context) -> dict[str, Evaluation]:
    """The selected model on valid and test (each rank its shard, combined; one process keeps the predictions)."""
    return {name: dist.reduce_evaluation(evaluate(model, eval_loaders[name], len(classes), device,
                                                  keep_predictions=dist.world_size == 1))
            for name in ("valid", "test") if name in eval_loaders}


def finish(hp: Hyperparameters, paths: Paths, model, classes, state: checkpoint.State, eval_loaders, device,
           prep: Preprocessing, dist: Context = SINGLE, dbg: Debugger | None = None) -> dict:
    """Evaluate the selected model once on test, write the model directory and the reports (rank 0); `dbg`'s
    profiler report gets the classes section."""
    final = final_evaluations(model, classes, eval_loaders, device, dist)
    if not dist.is_main:
        return {"best_epoch": state.best_epoch, **{f"{name}_accuracy": e.accuracy for name, e in final.items()}}
    # A tuning job's objective is the last value the log shows: make it the selected epoch's, not the last epoch's.
    # (`best_epoch=`: no `epoch=` step for the local search's pruner.)
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    if best is not None:
        print(metrics_line({"best_epoch": best["epoch"]}, valid_loss=best["valid_loss"],
                           valid_accuracy=best["valid_accuracy"]), flush=True)
    if "test" in final:
        print(metrics_line({}, test_loss=final["test"].loss, test_accuracy=final["test"].accuracy), flush=True)
    else:
        log.warning("no test split: test metrics skipped")
    report = "test" if "test" in final else "valid"
    # worst classes, most-confused pairs; with one process's predictions, example files for each pair
    by_class = classes_report.analyse(report, classes, final[report].confusion.tolist(),
                                      eval_loaders[report].dataset.samples, final[report].predictions)
    metrics = {
        "history": state.history, "best_epoch": state.best_epoch, "selected_by": SELECTION[hp.select_by],
        "epochs_run": state.epoch,
        **{f"{name}_loss": e.loss for name, e in final.items()},
        **{f"{name}_accuracy": e.accuracy for name, e in final.items()},
        "per_class_accuracy": {"split": report, **final[report].per_class_accuracy(classes)},
        "classes": by_class.to_json(),
        "hyperparameters": hp.to_dict(),
    }
    atomic.write_json(paths.output_data / "metrics.json", metrics)
    rows = [",".join(["true\\predicted", *classes])]
    rows += [",".join([name, *map(str, row.tolist())]) for name, row in zip(classes, final[report].confusion)]
    atomic.write_text(paths.output_data / f"confusion_matrix_{report}.csv", "\n".join(rows) + "\n")
    try:
        classes_report.write_pngs(paths.output_data, by_class)
    except Exception as e:  # plots are not worth a trained model
        log.warning("class plots not written: %s", e)
    if dbg is not None:
        dbg.classes = by_class
    artifacts.save_model(paths.model, model, {
        "architecture": hp.model, "class_names": classes,
        **prep.to_config(),  # image size, resize, normalisation, interpolation: what serving transforms with
        "metrics": {k: metrics[k] for k in metrics if k.endswith(("_accuracy", "_loss"))},
        "hyperparameters": hp.to_dict(),
    })
    log.info("model written to %s, reports to %s", paths.model, paths.output_data)
    return metrics


def write_failure(path: Path, message: str) -> None:
    """First line says what to fix; SageMaker shows the first 1,024 characters as FailureReason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(message + "\n")


def train_or_launch(hp: Hyperparameters, paths: Paths, env) -> None:
    """One process trains; with several (hosts x processes-per-host) this one launches torchrun, or is a worker."""
    if distributed.is_worker():  # started by torchrun, on this host or another
        with distributed.worker() as dist:
            run(hp, paths, dist=dist)
        return
    plan = distributed.make_plan(env.hosts, env.current_host, hp.processes_per_host, env.network_interface_name)
    if plan.world_size > 1:
        check_inputs(hp, paths)  # bad data or model name: one clear error before any worker starts
        distributed.launch(plan)
        return
    run(hp, paths)


def main() -> None:
    """Entry point for the toolkit (through the imgclf.train shim) and for torchrun."""
    from sagemaker_training import environment

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, force=True,
                        format=f"%(asctime)s %(levelname)s {distributed.log_tag()}%(name)s: %(message)s")
    output_dir = Path(environment.output_dir)
    # The toolkit creates neither model/ nor output/; without output/ a failure would be swallowed.
    for d in (Path(environment.model_dir), output_dir / "data"):
        d.mkdir(parents=True, exist_ok=True)
    failure = output_dir / "failure"

    def stopped_before_training(signum, frame):  # until build_setup's StopFlag takes over: nothing to checkpoint yet
        reason = (f"stopped by {signal.Signals(signum).name} before training started (checking the data, loading "
                  "the model): nothing to resume, run the job again")
        log.error("training failed: %s", reason)
        write_failure(failure, f"TrainingInterrupted: {reason}")
        sys.stdout.flush()
        os._exit(128 + signum)  # not an exception: a finalizer or broad except could swallow it

    for stop in STOP_SIGNALS:
        signal.signal(stop, stopped_before_training)
    try:
        env = environment.Environment()
        cuda_check.check(env.current_instance_type)  # GPUs that CUDA cannot use: fail now, not train on the CPU
        paths = Paths(Path(env.model_dir), Path(env.output_data_dir), Path(config.checkpoint_dir()),
                      dict(env.channel_input_dirs), sharded_channels(env.input_data_config))
        train_or_launch(config.parse_hyperparameters(env.hyperparameters), paths, env)
    except RuleStop as e:
        if stop_action.stop_own_job():  # Debugger's StopTraining action: SageMaker ends the job Stopped
            log.warning("training stopped: %s", e)
            return
        log.error("training failed: %s", e)
        write_failure(failure, f"{type(e).__name__}: {e}")
        raise
    except UserError as e:
        log.error("training failed: %s", e)
        write_failure(failure, f"{type(e).__name__}: {e}")
        raise
    except Exception as e:
        write_failure(failure, f"Internal error ({type(e).__name__}: {e}); the job log has the traceback")
        raise


if __name__ == "__main__":  # what torchrun runs in each worker (distributed.Plan.command)
    main()
