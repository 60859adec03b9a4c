"""Debugging and profiling of a training job, in the container: what SageMaker Debugger did, without it.

One `Debugger` per job ties together tensor collection (collect), rules (rules), the system monitor, step
timer and torch.profiler capture (profiling) and the HTML report (report), all in imgclf.debugging.
The training loop calls it at a few points; used as a context manager it always finishes: the rules'
last evaluation, rules.json and the report are written whether training completes, fails or is stopped
by a rule.

Everything goes under <output>/data, the one output folder SageMaker uploads (output.tar.gz):

    <output>/data/tensors/{scalars,layers}.jsonl       collected tensors (append-only)
    <output>/data/profiler/{system,steps}.jsonl        monitor samples, per-step timings
    <output>/data/profiler/*.pt.trace.json.gz          torch.profiler trace (Perfetto / TensorBoard), top_operators.json
    <output>/data/tensorboard/                         the TensorBoard event files, copied there when the job ends
    <output>/data/rules.json                           rule results (updated every epoch)
    <output>/data/profiler-report.html                 the report

While the job runs, the live folder (config.tensorboard_dir(): /opt/ml/output/tensorboard, which SageMaker
syncs to S3 with a TensorBoardOutputConfig) holds the event files as they are written, and rules.json and
the report, rewritten (atomically) after every epoch (the report less often when epochs are short). After
each rule evaluation one metric line (config.rule_metric_line) goes to stdout, for CloudWatch metrics and alarms.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from imgclf import atomic, config, models
from imgclf.config import Hyperparameters
from imgclf.debugging import report
from imgclf.debugging.classes import ClassResults
from imgclf.debugging.collect import Collector
from imgclf.debugging.profiling import ProfilerCapture, StepTimer, SystemMonitor
from imgclf.debugging.rules import ISSUES, Rule, RuleSet, configure
from imgclf.errors import RuleStop, TrainingInterrupted

log = logging.getLogger(__name__)
PROCESS_START = psutil.Process().create_time()  # what max_initialization_time measures from
RULES_FILE = "rules.json"
REPORT_FILE = "profiler-report.html"
DEBUG_HOOK_CONFIG = "debughookconfig.json"  # what SageMaker writes to input/config for a Debugger job
LIVE_REPORT_SHARE = 10  # the live report waits at least this many times what the last one cost to render


def scale_initial_weights(model: nn.Module, factor: float) -> None:
    """Debugging aid (init-scale): multiply conv/linear weights, to see what poor initialisation does."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                m.weight.mul_(factor)
    log.warning("init-scale=%g: conv/linear weights multiplied by %g (a debugging aid)", factor, factor)


@dataclass(frozen=True)
class DebugSettings:
    """What the Debugger reads of a job's hyperparameters: its own (debugging ... init-scale), and for the report
    the model's name and the whole set, under the schema's names."""
    debugging: bool
    rules: str
    rules_config: str
    rules_stop: str
    collect_train_interval: int
    collect_eval_interval: int
    collect_stats_interval: int
    monitor_interval_ms: int
    profiler_start_step: int
    profiler_steps: int
    init_scale: float
    model: str
    hyperparameters: dict[str, Any]

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> DebugSettings:
        # every field but the whole set is the hyperparameter of the same name: listed once, above
        own = {f.name: getattr(hp, f.name) for f in fields(cls) if f.name != "hyperparameters"}
        return cls(**own, hyperparameters=hp.to_dict())


class Debugger:
    """`enabled=False` (the other ranks of a distributed job) runs with debugging off whatever `debugging` says."""

    def __init__(self, settings: DebugSettings, output_dir: Path, device: torch.device, enabled: bool = True):
        self.enabled = enabled and settings.debugging
        self.settings, self.device, self.output_dir = settings, device, output_dir
        self.data_dir = output_dir / "data"
        self.live_dir = Path(config.tensorboard_dir())
        self.step = 0
        self.epoch = 0
        self.history: list[dict] = []
        self.started = time.time()
        self.model: nn.Module | None = None
        self.optimizer = None
        self._stats_step = False
        self._live_report: tuple[float, float] | None = None  # (when the last live report was written, its cost)
        self._eval_stop: RuleStop | None = None  # found during validation, raised at the epoch end
        self._losses: list[tuple[int, int, torch.Tensor, float]] = []  # (step, epoch, loss, lr) not read back yet
        self._loss_every_step = False  # a stop rule reads the training loss: read it back at every step
        self.classes: ClassResults | None = None  # set by the job's finish: the report's classes section
        if not self.enabled:
            return
        self.rules: RuleSet = configure(settings.rules, settings.rules_config, settings.rules_stop)
        self._loss_every_step = any(r.rule.stop and type(r.rule).train_loss is not Rule.train_loss
                                    for r in self.rules.results)
        profiler_dir = self.data_dir / config.DATA_PROFILER
        self.collector = Collector(self.data_dir / config.DATA_TENSORS, self.live_dir,
                                   settings.collect_train_interval, settings.collect_eval_interval,
                                   settings.collect_stats_interval)
        self.monitor = SystemMonitor(profiler_dir / "system.jsonl", settings.monitor_interval_ms).start()
        self.timer = StepTimer(profiler_dir / "steps.jsonl", device)
        self.profiler = ProfilerCapture(profiler_dir, settings.profiler_start_step, settings.profiler_steps, device)
        log.info("debugging: rules %s; tensors every %d train / %d eval steps, layer statistics every %d; "
                 "system monitor every %d ms; profiler steps %d-%d",
                 ", ".join(r.rule.name + ("(stop)" if r.rule.stop else "") for r in self.rules.results) or "none",
                 settings.collect_train_interval, settings.collect_eval_interval, settings.collect_stats_interval,
                 settings.monitor_interval_ms, settings.profiler_start_step,
                 settings.profiler_start_step + settings.profiler_steps - 1)

    def __enter__(self) -> Debugger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    def attach(self, model: nn.Module, optimizer) -> None:
        """The model the job trains (init-scale applies here, before any checkpoint is restored)."""
        if self.settings.init_scale != 1.0:
            scale_initial_weights(model, self.settings.init_scale)
        self.model, self.optimizer = model, optimizer
        if (Path(config.base_dir()) / "input" / "config" / DEBUG_HOOK_CONFIG).is_file():
            log.info("SageMaker passed a Debugger hook configuration: this image does not run smdebug's hook, so "
                     "Debugger's own rules get no tensors; its rules run in the container (docs/debugging.md)")

    # --- the training loop ---------------------------------------------------------------------------------
    def epoch_begin(self, epoch: int) -> None:
        self.epoch = epoch + 1
        if self.enabled:
            self.timer.begin()

    def step_begin(self) -> None:
        """The batch is on the device: data wait ends, forward begins."""
        if not self.enabled:
            return
        self.timer.mark("data")
        self.profiler.step_begin(self.step)
        self._stats_step = self.model is not None and self.collector.wants_stats(self.step)
        if self.model is not None and self._stats_step:
            self.collector.hook_activations(self.model)

    def mark(self, phase: str) -> None:
        """End of "forward" (loss computed), "backward" or "optimizer" (optimizer step done)."""
        if self.enabled:
            self.timer.mark(phase)
            if phase == "forward" and self._stats_step:
                self.collector.remove_hooks()

    def step_end(self, loss: torch.Tensor) -> None:
        """After the optimizer step, with the step's loss, a tensor on the device. It is read back (a host sync)
        only every collect-train-interval steps, all the losses since together: for the collection and the rules,
        which see every step's in order. A stop rule on the training loss (rules-stop) reads it at every step, so
        that the job stops at the step that found the issue."""
        if not self.enabled:
            self.step += 1
            return
        step, self.step = self.step, self.step + 1
        self.timer.end(step)
        lr = models.head_lr(self.optimizer) if self.optimizer is not None else float("nan")
        self._losses.append((step, self.epoch, loss.detach(), lr))
        if self._loss_every_step or self._stats_step or step % self.settings.collect_train_interval == 0:
            self.read_losses()
        self.profiler.step_end(step)
        if self.model is not None and self._stats_step:
            self._stats_step = False
            self.rules.layer_stats(self.collector.layer_stats(self.model, step, self.epoch))

    def read_losses(self) -> None:
        """The training losses not read back yet, to the collection and the rules (one host sync)."""
        if not self._losses:
            return
        pending, self._losses = self._losses, []
        values = torch.stack([loss for _, _, loss, _ in pending]).tolist()
        for (step, epoch, _, lr), loss in zip(pending, values, strict=True):
            self.collector.train_step(step, epoch, loss, lr)
            self.rules.train_loss(step, epoch, loss)

    def eval_batch(self, step: int, loss: float) -> None:
        """evaluate()'s on_batch callback: evaluation-mode loss of each batch."""
        if self.enabled:
            self.read_losses()  # the training steps' before the evaluation's, as they ran
            self.profiler.stop()  # a capture ends with its epoch's training steps
            eval_step = self.collector.eval_step_loss(self.epoch, loss)
            try:
                self.rules.eval_loss(eval_step, self.epoch, loss)
            except RuleStop as e:  # raised by epoch_end, where every rank checks for a stop at the same point
                self._eval_stop = self._eval_stop or e

    def backbone_forward_begin(self, model: nn.Module) -> None:
        """Feature extraction's first batch (the frozen backbone's only forward passes): watch activations."""
        if self.enabled:
            self.collector.hook_activations(model)

    def backbone_forward_end(self, model: nn.Module) -> None:
        """Layer statistics of that batch (weights, activation inputs; no gradients) for the rules."""
        if self.enabled:
            self.read_losses()
            self.rules.layer_stats(self.collector.layer_stats(model, self.step, self.epoch + 1, "feature_extraction"))

    def epoch_end(self, history: list[dict]) -> None:
        """After validation, with the job's history (its last record is this epoch); may raise RuleStop."""
        self.history = list(history)
        if not self.enabled:
            return
        self.read_losses()
        self.profiler.stop()  # a capture ends with its epoch's training steps
        self.collector.epoch_end(history[-1])
        try:
            if self._eval_stop is not None:
                stop, self._eval_stop = self._eval_stop, None
                raise stop
            self.rules.epoch_end(self.history)
            self.rules.system(list(self.monitor.samples), list(self.timer.steps), self.monitor.has_gpu, self.epoch)
        finally:
            self.write_rules("InProgress")
            self.print_rule_metrics()
            self.write_live_report()

    # --- the end ---------------------------------------------------------------------------------------------
    def write_rules(self, job_status: str, error: str | None = None) -> None:
        """rules.json in output/data (uploaded at the end) and in the live folder (synced while the job runs)."""
        result = {
            "job_status": job_status, "error": error, "stopped_by": self.rules.stopped_by, "steps": self.step,
            "epochs": len(self.history), "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rules": self.rules.to_json(),
        }
        atomic.write_json(self.data_dir / RULES_FILE, result)
        try:
            atomic.write_json(self.live_dir / RULES_FILE, result)
        except OSError as e:  # the live copy is a convenience; the job goes on without it
            log.warning("live rules.json not written to %s: %s", self.live_dir, e)

    def print_rule_metrics(self) -> None:
        """One metric line per rule evaluation; SageMaker makes CloudWatch metrics of it (rules:issues, rule:NAME)."""
        if self.rules.results:
            print(config.rule_metric_line({r.rule.name: r.status == ISSUES for r in self.rules.results}), flush=True)

    def close(self, exc: BaseException | None = None) -> None:
        """Final rule evaluation, rules.json and the report; never raises over the job's own outcome."""
        if not self.enabled:
            return
        try:
            self.read_losses()  # the last steps' (a stop rule has read them all already: it cannot stop here)
        except Exception as e:
            log.warning("debugging: the last training losses were not collected: %s", e)
        if self.model is not None:
            self.collector.remove_hooks()
        for part in (self.profiler.export, self.monitor.stop, self.timer.close):
            try:
                part()
            except Exception as e:
                log.warning("debugging: %s failed at the end: %s", getattr(part, "__qualname__", part), e)
        try:
            self.rules.system(list(self.monitor.samples), list(self.timer.steps), self.monitor.has_gpu,
                              self.epoch or None)
        except RuleStop:
            pass  # the job is over anyway
        status = ("Completed" if exc is None else "Stopped" if isinstance(exc, RuleStop)
                  else "Interrupted" if isinstance(exc, TrainingInterrupted) else "Failed")
        error = None if exc is None else f"{type(exc).__name__}: {exc}"
        self.write_rules(status, error)
        self.print_rule_metrics()
        for r in self.rules.results:
            detail = r.finding.message if r.finding else r.to_json()["reason"]
            log.info("rule %s: %s%s", r.rule.name, r.status, f" ({detail})" if detail else "")
        try:
            self.write_report(status, error)
        except Exception as e:  # the report must not hide the job's own outcome
            log.exception("profiler report not written: %s", e)
        self.collector.close()
        self.keep_event_files()

    def write_live_report(self) -> None:
        """The report in the live folder, after an epoch; skipped while rendering it (seconds: the plots) would take
        more than a tenth of the time since the last one, so that short epochs do not pay for it."""
        started = time.monotonic()
        if self._live_report and started - self._live_report[0] < LIVE_REPORT_SHARE * self._live_report[1]:
            return
        try:
            self.write_report("InProgress", None, final=False)
        except Exception as e:  # a report is not worth a job
            log.warning("live profiler report not written: %s", e)
        self._live_report = (time.monotonic(), time.monotonic() - started)

    def keep_event_files(self) -> None:
        """Copy the live folder's TensorBoard event files into output/data: SageMaker uploads the live folder only
        when the job has a TensorBoardOutputConfig, output/data always."""
        target = self.data_dir / config.DATA_TENSORBOARD
        try:
            for events in sorted(self.live_dir.glob("events.out.tfevents.*")):
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(events, target / events.name)
        except OSError as e:
            log.warning("TensorBoard event files not copied to %s: %s", target, e)

    def write_report(self, status: str, error: str | None, final: bool = True) -> None:
        """The report in the live folder (every epoch) and, when the job ends (`final`), in output/data."""
        text = report.render(report.ReportData(
            job={"status": status, "error": error, "device": str(self.device), "model": self.settings.model,
                 "steps": self.step, "epochs": len(self.history), "host": platform.node(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
                 "duration_s": round(time.time() - self.started, 1),
                 "torch": torch.__version__, "gpu": self.monitor.has_gpu, "process_start": PROCESS_START},
            hyperparameters=self.settings.hyperparameters, history=self.history, loss_points=self.collector.points,
            samples=list(self.monitor.samples), steps=list(self.timer.steps), step_totals=dict(self.timer.totals),
            rules=self.rules.to_json(), top_operators=self.profiler.top_operators,
            profiler_steps=self.profiler.captured, classes=self.classes,
            trace=str(self.profiler.trace.relative_to(self.data_dir)) if self.profiler.trace else None,
        ))
        for folder in (self.live_dir, *([self.data_dir] if final else [])):
            atomic.write_text(folder / REPORT_FILE, text)
        if final:
            log.info("profiler report written to %s and %s", self.data_dir / REPORT_FILE, self.live_dir / REPORT_FILE)
