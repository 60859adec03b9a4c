"""`tune.py --local`: the SageMaker tuning job's search, run on this machine with Optuna.

Same search space, objective and metric regex as the cloud path (imgclf.search.space, imgclf.config); each
trial is a real local-mode training run (`python -m imgclf.local train`) in <output>/trial-N whose per-epoch
objective value feeds the pruner. A pruned trial gets SIGTERM, which the training turns into a checkpoint and a
clean stop. The study lives in an Optuna RDB storage (default sqlite:///<output>/study.db): running the same
command again resumes it, and several machines can share one study through a database URL.

The search runs in Optuna's own loop (Study.optimize): a running trial records a heartbeat in the storage, and a
trial whose heartbeat stopped (its search process killed, its machine or container gone) is marked FAIL by the
next search process on the study and its hyperparameters queued again, as is a trial interrupted with the
search (Ctrl-C, SIGTERM); the retry resumes from the lost trial's checkpoint where this machine sees its folder.
MaxTrialsCallback ends the search at --max-jobs completed, pruned or running trials. After the search, plots of
the study go to <output>/plots.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, Trial, TrialState

from imgclf.config import hyperparameter_strings, parse_value
from imgclf.errors import HyperparameterError, UserError
from imgclf.exit_codes import EXIT_INTERRUPTED, EXIT_OK, JobFailed
from imgclf.flags import CLOUD, LOCAL, FlagGroup, given_elsewhere, only_for
from imgclf.search.results import write_best_file
from imgclf.search.space import check_disjoint, objective_regex, parameter_ranges, static_hyperparameters

log = logging.getLogger("imgclf.search.local_search")

DEFAULT_STUDY = "imgclf-hpo"
PRUNERS = ("median", "halving", "none")
# The training loop's per-epoch line (`epoch=3 ... valid_accuracy=0.7312`): its epoch is the pruner's step.
EPOCH = re.compile(r"\bepoch=(\d+)\b")
STOP_GRACE_S = 120  # how long a SIGTERMed training may take to checkpoint and exit before it is killed
# Toward --max-jobs: a failed trial does not count (an interrupted or lost one is retried, and one process starts at
# most --max-jobs trials, so a search whose trials all fail still ends).
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
# A running trial's heartbeat: recorded every HEARTBEAT_S; after GRACE_S without one, its search process is taken for
# gone. GRACE_S covers a heartbeat delayed by SQLite's lock wait (60 s, open_storage): a busy database loses no trial.
HEARTBEAT_S = 30
GRACE_S = 120
PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")


class TrialFailed(Exception):
    """The trial's training failed; the message is the reason recorded with the trial."""


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("local search (--local: Optuna on this machine; see README)")
    group.add_argument("--local", action="store_true",
                       help="run the search here, each trial a local-mode training run; --data and --output are "
                            "then local folders, --max-jobs the number of trials, --strategy picks TPE or random "
                            "sampling")
    only_for(
        LOCAL,
        group.add_argument("--study-name", default=DEFAULT_STUDY, help=f"Optuna study name (default {DEFAULT_STUDY})"),
        group.add_argument("--storage", metavar="URL",
                           help="Optuna storage (default sqlite:///<output>/study.db); a database URL such as "
                                "postgresql://user:pw@host/db lets several machines share one study"),
        group.add_argument("--pruner", choices=PRUNERS, default="median",
                           help="stop poor trials early from their per-epoch objective: median (default), halving "
                                "(successive halving) or none"),
        group.add_argument("--pruner-startup-trials", type=int, default=3, metavar="N",
                           help="median: trials that must finish before any is pruned (default 3)"),
        group.add_argument("--prune-from-epoch", type=int, default=1, metavar="N",
                           help="first epoch after which a trial can be pruned (default 1)"),
        group.add_argument("--enqueue", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                           help="a trial to run before the sampler's (repeat); hyperparameters it leaves out are "
                                "sampled, e.g. --enqueue lr=0.01,batch-size=128"),
        group.add_argument("--seed", type=int, help="seed of the sampler (default: random)"),
    )


@dataclass(frozen=True)
class Options(FlagGroup):
    """tune.py's flags that the local search reads (add_args, and those it shares with the tuning job)."""
    data: str | None
    output: str | None
    weights: str | None
    study_name: str
    storage: str | None
    pruner: str
    pruner_startup_trials: int
    prune_from_epoch: int
    no_early_stopping: bool
    enqueue: list[str]
    seed: int | None
    strategy: str
    objective: str
    max_jobs: int
    timeout: float | None
    verbose: bool
    best_out: Path


def check_flags(flags: Mapping[str, Any]) -> None:
    """Refuse flags that the chosen path (cloud or --local) would silently ignore; `flags`: vars() of the parse."""
    given = given_elsewhere(flags, LOCAL if flags["local"] else CLOUD)
    if given and flags["local"]:
        raise UserError(f"{', '.join(given)}: SageMaker tuning job option(s), not used by --local; drop them")
    if given:
        raise UserError(f"{', '.join(given)}: option(s) of the local search; add --local or drop them")


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions, through the same checks as the SageMaker ParameterRanges."""
    ranges = parameter_ranges(space)
    dists: dict[str, BaseDistribution] = {}
    for r in ranges.get("ContinuousParameterRanges", []) + ranges.get("IntegerParameterRanges", []):
        name, scaling = r["Name"], r["ScalingType"]
        if scaling == "ReverseLogarithmic":
            raise HyperparameterError(f"{name}: ReverseLogarithmic scaling has no Optuna equivalent; use "
                                      "Logarithmic or Linear with --local")
        low, high = parse_value(name, r["MinValue"]), parse_value(name, r["MaxValue"])
        kind = FloatDistribution if isinstance(low, float) else IntDistribution
        dists[name] = kind(low, high, log=scaling == "Logarithmic")  # Auto: linear
    for r in ranges.get("CategoricalParameterRanges", []):
        dists[r["Name"]] = CategoricalDistribution([parse_value(r["Name"], v) for v in r["Values"]])
    return dists


def parse_enqueue(spec: str, dists: dict[str, BaseDistribution]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in spec.split(","):
        key, sep, value = (s.strip() for s in pair.partition("="))
        if not sep or not key:
            raise UserError(f"--enqueue {spec!r}: write NAME=VALUE[,NAME=VALUE...], e.g. --enqueue lr=0.01,epochs=5")
        dist = dists.get(key)
        if dist is None:
            raise UserError(f"--enqueue {key}: not in the search space ({', '.join(dists)}); fixed values go in --hp")
        typed = parse_value(key, value)
        if isinstance(dist, CategoricalDistribution):
            if typed not in dist.choices:
                raise UserError(f"--enqueue {key}={value}: not one of the search space's values "
                                f"{', '.join(map(str, dist.choices))}")
        elif isinstance(dist, FloatDistribution | IntDistribution) and not dist.low <= typed <= dist.high:
            log.warning("--enqueue %s=%s lies outside the search range %s..%s: tried as given",
                        key, value, dist.low, dist.high)
        params[key] = typed
    return params


def make_pruner(args: Options) -> optuna.pruners.BasePruner:
    if args.pruner == "none" or args.no_early_stopping:
        return optuna.pruners.NopPruner()
    if args.pruner_startup_trials < 0 or args.prune_from_epoch < 0:
        raise UserError("--pruner-startup-trials and --prune-from-epoch must be 0 or more")
    if args.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, args.prune_from_epoch))
    return optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup_trials,
                                       n_warmup_steps=args.prune_from_epoch)


def open_storage(url: str, on_lost: Callable[[optuna.Study, FrozenTrial], None]) -> optuna.storages.RDBStorage:
    """The study's storage, with heartbeats: `on_lost` is called for each trial found without one for GRACE_S."""
    # SQLite shared by several processes on one machine: wait for the lock instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                          grace_period=GRACE_S, heartbeat_stale_trial_callback=on_lost)
    except Exception as e:  # sqlalchemy's errors, a missing database driver, a bad URL: one clear line
        raise UserError(f"--storage {url}: cannot open it ({type(e).__name__}: {str(e).splitlines()[0]}); use "
                        "sqlite:///path/study.db or a database URL such as postgresql://user:pw@host/db (its "
                        "driver installed)") from None


class Search:
    """One study on one machine: runs trials until the study holds --max-jobs of them."""

    def __init__(self, args: Options, space: dict[str, dict[str, Any]], static: dict[str, Any]):
        if not args.data or "://" in args.data:
            raise UserError("--local needs --data DIR: a local folder holding train/ and valid/ (and test/)")
        if args.output and "://" in args.output or args.weights and "://" in args.weights:
            raise UserError("--local: --output and --weights are local paths, not URIs")
        if args.max_jobs < 1:
            raise UserError(f"--max-jobs {args.max_jobs}: give at least 1 trial")
        self.data = Path(args.data)
        self.output = Path(args.output or Path("hpo") / args.study_name).resolve()
        self.weights = Path(args.weights).resolve() if args.weights else None
        if self.weights and not self.weights.exists():
            raise UserError(f"--weights {self.weights}: no such file")
        self.dists = distributions(space)
        check_disjoint(self.dists, static)
        self.static = hyperparameter_strings(static_hyperparameters(space, static))  # a bad value stops here
        self.metric, self.direction, regex = objective_regex(args.objective)
        self.regex = re.compile(regex)
        self.verbose = args.verbose
        self.settings = {"objective": self.metric, "direction": self.direction,
                         "search_space": parameter_ranges(space), "static_hyperparameters": self.static}
        self.enqueue = [parse_enqueue(spec, self.dists) for spec in args.enqueue]
        self.max_trials = args.max_jobs
        self.timeout = args.timeout or None
        self.interrupted: int | None = None  # the number of a trial that a Ctrl-C or SIGTERM stopped
        self._check_data()
        self.output.mkdir(parents=True, exist_ok=True)
        self.storage_url = args.storage or f"sqlite:///{self.output / 'study.db'}"
        sampler = (optuna.samplers.RandomSampler(seed=args.seed) if args.strategy == "Random"
                   else optuna.samplers.TPESampler(seed=args.seed))
        self.storage = open_storage(self.storage_url, self._lost)
        self.study = optuna.create_study(storage=self.storage, study_name=args.study_name,
                                         direction=optuna.study.StudyDirection[self.direction.upper()], sampler=sampler,
                                         pruner=make_pruner(args), load_if_exists=True)
        self._check_settings()

    def _check_data(self) -> None:
        from imgclf.splits import split_channels  # PIL: only once the flags are known to be good

        split_channels(self.data)

    def _check_settings(self) -> None:
        """A study resumed (or shared) must search the same space for the same objective."""
        stored = self.study.user_attrs.get("imgclf")
        if stored is None:
            self.study.set_user_attr("imgclf", self.settings)
            return
        changed = [k for k in self.settings if stored.get(k) != self.settings[k]]
        if changed:
            raise UserError(f"study {self.study.study_name!r} in {self.storage_url} was created with a different "
                            f"{' and '.join(k.replace('_', ' ') for k in changed)} (stored: "
                            f"{', '.join(f'{k}={stored.get(k)}' for k in changed)}); rerun with the same settings "
                            "to resume it, or start another with --study-name NAME")

    # ---- study bookkeeping ------------------------------------------------------------------------------

    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def _lost(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's heartbeat-stale callback: the trial is FAIL now; queue it again."""
        self._requeue(study, trial, f"sent no heartbeat for {GRACE_S} s: its search process was killed, or its "
                                    "machine or container is gone")

    @staticmethod
    def _requeue(study: optuna.Study, trial: FrozenTrial, why: str) -> None:
        """Queue a FAIL trial's hyperparameters again; the retry resumes from its checkpoint (_resume_retry)."""
        # Not Optuna's RetryHeartbeatStaleTrialCallback: it re-creates the trial with create_trial, which refuses an
        # --enqueue value outside its range (tried as given); enqueue_trial takes it.
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        log.warning("trial %d %s: marked FAIL, its hyperparameters queued again", trial.number, why)

    # ---- running ----------------------------------------------------------------------------------------

    def run(self) -> None:
        for params in self.enqueue:
            self.study.enqueue_trial(params, skip_if_exists=True)
        optuna.storages.fail_stale_trials(self.study)  # before counting: a lost trial is retried, not counted
        finished = [t for t in self.trials() if t.state.is_finished()]
        counted = len(self.trials(COUNTED))
        log.info("study %s in %s: %d trial(s) so far, %d to go; trials in %s", self.study.study_name,
                 self.storage_url, len(finished), max(0, self.max_trials - counted), self.output)
        for t in self.trials((TrialState.RUNNING,)):
            log.info("trial %d is running in another search process: counted, and queued again if its heartbeat "
                     "stops for %d s", t.number, GRACE_S)
        print(f"{'trial':>5}  {'state':<8}  {'value':>10}  {'best':>10}  {'seconds':>7}  hyperparameters",
              flush=True)
        for t in finished:
            self.print_row(t)
        if counted >= self.max_trials:
            return  # optimize would start a trial before MaxTrialsCallback first looks
        started = time.monotonic()
        try:
            # n_trials: failed trials do not count toward --max-jobs, but bound this process's trials.
            self.study.optimize(self.objective, n_trials=self.max_trials, timeout=self.timeout, catch=(TrialFailed,),
                                callbacks=[self.trial_ended, MaxTrialsCallback(self.max_trials, states=COUNTED)])
        except KeyboardInterrupt:
            if self.interrupted is not None:
                trial = self.trials()[self.interrupted]
                if trial.state == TrialState.FAIL:  # else it stayed RUNNING: its heartbeat stops, and it is retried
                    self._requeue(self.study, trial, "was interrupted")
            raise
        left = self.max_trials - len(self.trials(COUNTED))
        if left > 0:
            timed_out = self.timeout is not None and time.monotonic() - started >= self.timeout
            log.info("stopped with %d trial(s) to go: %s; run the same command again to go on", left,
                     "--timeout reached" if timed_out else
                     f"this process started {self.max_trials} trials, its limit (failed ones do not count toward "
                     "--max-jobs)")

    def objective(self, trial: Trial) -> float:
        """One trial: its hyperparameters, then its training; Optuna records the outcome."""
        suggest(trial, self.dists)
        out = self.output / f"trial-{trial.number}"
        trial.set_user_attr("output", str(out))
        out.mkdir(parents=True, exist_ok=True)
        try:
            return self.train(trial, out, self._resume_retry(trial, out))
        except optuna.TrialPruned as e:
            log.info("trial %d %s", trial.number, e)
            raise
        except TrialFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            log.warning("trial %d failed: %s", trial.number, e)
            raise
        except KeyboardInterrupt:  # the search itself stops (Optuna marks the trial FAIL): run() queues it again
            trial.set_user_attr("fail_reason", "interrupted: the search was stopped while it ran")
            self.interrupted = trial.number
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", f"search error: {type(e).__name__}: {e}")
            raise

    def trial_ended(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback after a trial that ended on its own (not after an interrupt or a search error)."""
        shutil.rmtree(Path(trial.user_attrs["output"]) / "checkpoints", ignore_errors=True)  # only a retry needs them
        self.print_row(trial)

    def command(self, hps: dict[str, str], out: Path) -> list[str]:
        cmd = [sys.executable, "-m", "imgclf.local", "train", "--data", str(self.data), "--output", str(out)]
        for key, value in hps.items():
            cmd += ["--hp", f"{key}={value}"]
        return cmd + (["--weights", str(self.weights)] if self.weights else [])

    def train(self, trial: Trial, out: Path, value: float | None) -> float:
        """One local training run; returns the objective's last value, or raises TrialPruned / TrialFailed. `value`:
        a retry's last reported value (it resumes where the lost trial stopped, possibly after its last epoch)."""
        hps = hyperparameter_strings({**self.static, **trial.params})
        log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in sorted(trial.params.items())))
        pruned_at = None
        killer = None
        with open(out / "train.log", "a") as train_log:
            # Own session: a Ctrl-C in the terminal reaches only the search, which then stops the training cleanly.
            proc = subprocess.Popen(self.command(hps, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            assert proc.stdout is not None  # stdout=PIPE
            try:
                for line in proc.stdout:
                    train_log.write(line)
                    if self.verbose:
                        sys.stderr.write(f"[trial {trial.number}] {line}")
                    found = self.regex.search(line)
                    if not found:
                        continue
                    value = float(found.group(1))  # the last one counts, as in a SageMaker tuning job
                    epoch = EPOCH.search(line)
                    if epoch is None or pruned_at is not None:
                        continue
                    step = int(epoch.group(1))
                    trial.report(value, step)
                    log.info("trial %d epoch %d: %s=%g", trial.number, step, self.metric, value)
                    if trial.should_prune():
                        pruned_at = step
                        proc.send_signal(signal.SIGTERM)  # the training checkpoints and stops
                        killer = threading.Timer(STOP_GRACE_S, proc.kill)
                        killer.start()
                code = proc.wait()
            except BaseException:
                _stop(proc, train_log)
                raise
            finally:
                if killer:
                    killer.cancel()
        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {pruned_at}: {self.metric}={value:g}")
        if code != 0:
            failure = out / "failure"
            reason = failure.read_text().strip().splitlines()[0] if failure.exists() else ""
            raise TrialFailed(reason or f"training exited with code {code}; see {out / 'train.log'}")
        if value is None:
            raise TrialFailed(f"the training printed no {self.metric} value; see {out / 'train.log'}")
        return value

    def _resume_retry(self, trial: Trial, out: Path) -> float | None:
        """A retried trial continues from the lost one: the epochs it reported, and its checkpoint where this
        machine sees its folder (the same machine, or a shared file system); returns the last value reported."""
        number = trial.user_attrs.get("retry_of")
        if number is None:
            return None
        original = self.trials()[number]
        for step, value in sorted(original.intermediate_values.items()):
            trial.report(value, step)
        output = original.user_attrs.get("output")  # none if it was lost before it started
        if output and (Path(output) / "checkpoints").is_dir() and not (out / "checkpoints").exists():
            shutil.move(Path(output) / "checkpoints", out / "checkpoints")
            log.info("trial %d retries trial %d from its checkpoint", trial.number, number)
        steps = original.intermediate_values
        return steps[max(steps)] if steps else None

    # ---- reporting --------------------------------------------------------------------------------------

    def best(self) -> FrozenTrial | None:
        complete = self.trials((TrialState.COMPLETE,))
        return self.study.best_trial if complete else None

    def print_row(self, t: FrozenTrial) -> None:
        best = self.best()
        value = "-" if t.value is None else f"{t.value:.4g}"
        seconds = f"{t.duration.total_seconds():.0f}" if t.duration else "-"
        params = " ".join(f"{k}={_short(v)}" for k, v in sorted(t.params.items()))
        note = ""
        if t.state == TrialState.PRUNED and t.last_step is not None:
            note = f"  (pruned after epoch {t.last_step})"
        elif t.state == TrialState.FAIL:  # without a reason: failed for its lost heartbeat (_lost)
            note = f"  ({t.user_attrs.get('fail_reason', 'no heartbeat: its search process was lost')[:160]})"
        if "retry_of" in t.user_attrs:
            note += f"  (retry of trial {t.user_attrs['retry_of']})"
        best_text = f"{best.value:.4g}" if best else "-"
        print(f"{t.number:>5}  {t.state.name:<8}  {value:>10}  {best_text:>10}  {seconds:>7}  {params}{note}",
              flush=True)

    def write_best(self, path: Path) -> None:
        best = self.best()
        if best is None:
            raise JobFailed(f"no trial of study {self.study.study_name} completed; see the reasons above and "
                            f"{self.output}/trial-*/train.log")
        hps = hyperparameter_strings({**self.static, **best.params})
        write_best_file(path, self.study.study_name, f"trial-{best.number}",
                        {"Type": self.direction, "MetricName": self.metric, "Value": best.value}, hps,
                        output=best.user_attrs.get("output"))
        print(f"best trial: trial-{best.number} {self.metric}={best.value:.6g} "
              f"(model: {best.user_attrs.get('output')}/model.tar.gz)")
        print(f"hyperparameters: {' '.join(f'{k}={v}' for k, v in sorted(hps.items()))} -> {path}")

    def write_plots(self) -> None:
        """PLOTS as HTML (plotly; one shared plotly.min.js beside them, no internet needed) and PNG (matplotlib) in
        <output>/plots. A plot is a by-product: one that cannot be drawn is skipped with the reason in the log."""
        import matplotlib

        matplotlib.use("Agg")  # files only: no window, no display needed
        import matplotlib.pyplot as plt
        import optuna.visualization as as_html
        import optuna.visualization.matplotlib as as_png
        import plotly.offline  # type: ignore[import-untyped]  # no type hints (plotly 6)

        complete = self.trials((TrialState.COMPLETE,))
        folder = self.output / "plots"
        folder.mkdir(exist_ok=True)
        with _replacing(folder / "plotly.min.js") as tmp:  # current with the plotly that draws the plots
            tmp.write_text(plotly.offline.get_plotlyjs(), encoding="utf-8")
        varied = [name for name in self.dists if len({repr(t.params.get(name)) for t in complete}) > 1]
        written = []
        for name in PLOTS:
            if name == "param_importances" and (len(complete) < 2 or len(varied) < 2):
                log.info("plots: no param_importances: it needs 2 completed trials and 2 hyperparameters that differ "
                         "between them (%d completed; differing: %s)", len(complete), ", ".join(varied) or "none")
                continue
            try:
                with warnings.catch_warnings():
                    # Not the user's to act on: e.g. matplotlib's singular axis for a hyperparameter that did not vary.
                    warnings.simplefilter("ignore")
                    html = getattr(as_html, f"plot_{name}")(self.study).to_html(include_plotlyjs="directory")
                    with _replacing(folder / f"{name}.html") as tmp:
                        tmp.write_text(html, encoding="utf-8")
                    figure = getattr(as_png, f"plot_{name}")(self.study).figure
                    try:
                        with _replacing(folder / f"{name}.png") as tmp:
                            figure.savefig(tmp, format="png", bbox_inches="tight")
                    finally:
                        plt.close(figure)
            except Exception as e:  # never fail a search that has its result for a plot
                log.warning("plots: %s not written (%s: %s)", name, type(e).__name__, e)
            else:
                written.append(name)
        log.info("plots in %s: %s (.html and .png)", folder, ", ".join(written) or "none")


def suggest(trial: Trial, dists: dict[str, BaseDistribution]) -> None:
    """Sample every hyperparameter of the space (an enqueued or retried trial gets its fixed values)."""
    for name, dist in dists.items():
        if isinstance(dist, FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, log=dist.log)
        elif isinstance(dist, IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, log=dist.log)
        elif isinstance(dist, CategoricalDistribution):
            trial.suggest_categorical(name, dist.choices)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write, renamed to `path` once written: nothing half-written is left."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _stop(proc: subprocess.Popen, train_log) -> None:
    """SIGTERM the training (it checkpoints and exits), keeping its last lines; kill it if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=STOP_GRACE_S)
        train_log.write(rest or "")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: Options, space: dict[str, dict[str, Any]], static: dict[str, Any]) -> int:
    """`tune.py --local`: search, print a row per trial, write the best hyperparameters; return the exit code."""
    # Our log lines and table say what happens (Optuna's warning for a failed trial carries its traceback).
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    # Expected, and explained in our own log lines: an enqueued value outside the range, a retried trial
    # re-reporting the epochs its predecessor reported; heartbeats and the matplotlib plots are "experimental".
    warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
    warnings.filterwarnings("ignore", message="The reported value is ignored")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    search = Search(args, space, static)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM stops the search as cleanly as Ctrl-C
    try:
        search.run()
    except KeyboardInterrupt:
        log.error("search interrupted; run the same command again to resume study %s (%s)",
                  search.study.study_name, search.storage_url)
        return EXIT_INTERRUPTED
    search.write_best(args.best_out)
    search.write_plots()
    return EXIT_OK
