"""`tune.py --local`: the SageMaker tuning job's search, run on this machine with Optuna.

Same search space, objective and metric regex as the cloud path (imgclf.search.space, imgclf.config); each
trial is a real local-mode training run (`python -m imgclf.local train`) in <output>/trial-N whose per-epoch
objective value feeds the pruner. A pruned trial gets SIGTERM, which the training turns into a checkpoint and a
clean stop. The study lives in an Optuna RDB storage (default sqlite:///<output>/study.db): running the same
command again resumes it, and several machines can share one study through a database URL.

A trial interrupted with the search (Ctrl-C, SIGTERM, a killed process) is recorded as FAIL with the user
attribute `interrupted`; the next run retries its hyperparameters from its checkpoint. Only trials that ended
on their own count toward --max-jobs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
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
HOST = socket.gethostname()
# The training loop's per-epoch line (`epoch=3 ... valid_accuracy=0.7312`): its epoch is the pruner's step.
EPOCH = re.compile(r"\bepoch=(\d+)\b")
STOP_GRACE_S = 120  # how long a SIGTERMed training may take to checkpoint and exit before it is killed
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


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


def open_storage(url: str) -> optuna.storages.RDBStorage:
    # SQLite shared by several processes on one machine: wait for the lock instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
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
        self.deadline = time.monotonic() + args.timeout if args.timeout else None
        self._check_data()
        self.output.mkdir(parents=True, exist_ok=True)
        self.storage_url = args.storage or f"sqlite:///{self.output / 'study.db'}"
        sampler = (optuna.samplers.RandomSampler(seed=args.seed) if args.strategy == "Random"
                   else optuna.samplers.TPESampler(seed=args.seed))
        self.storage = open_storage(self.storage_url)
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

    def counted(self) -> int:
        """Trials toward --max-jobs: ended on their own, or running (here or on another machine)."""
        return sum(1 for t in self.trials(COUNTED) if not t.user_attrs.get("interrupted"))

    def recover(self) -> None:
        """Fail trials whose search process on this machine is gone; queue every interrupted trial once again."""
        storage = self.storage
        study_id = storage.get_study_id_from_name(self.study.study_name)
        for t in self.trials((TrialState.RUNNING,)):
            host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
            if host == HOST and isinstance(pid, int) and not _alive(pid):
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                storage.set_trial_user_attr(trial_id, "interrupted", True)
                storage.set_trial_user_attr(trial_id, "fail_reason", f"interrupted: search process {pid} is gone")
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
                log.warning("trial %d was left RUNNING by search process %d, which is gone: marked FAIL",
                            t.number, pid)
            else:
                log.info("trial %d is running on %s (process %s): left to it", t.number, host, pid)
        trials = self.trials()
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for t in trials:
            if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
                self.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                log.info("trial %d was interrupted: its hyperparameters are queued again (resuming from its "
                         "checkpoint)", t.number)

    # ---- running ----------------------------------------------------------------------------------------

    def run(self) -> None:
        for params in self.enqueue:
            self.study.enqueue_trial(params, skip_if_exists=True)
        self.recover()
        finished = [t for t in self.trials() if t.state.is_finished()]
        log.info("study %s in %s: %d trial(s) so far, %d to go; trials in %s", self.study.study_name,
                 self.storage_url, len(finished), max(0, self.max_trials - self.counted()), self.output)
        print(f"{'trial':>5}  {'state':<8}  {'value':>10}  {'best':>10}  {'seconds':>7}  hyperparameters",
              flush=True)
        for t in finished:
            self.print_row(t)
        while self.counted() < self.max_trials:
            if self.deadline and time.monotonic() > self.deadline:
                log.info("--timeout reached: no new trial started")
                break
            trial = self.study.ask(self.dists)
            frozen = self.run_one(trial)
            self.print_row(frozen)

    def run_one(self, trial: Trial) -> FrozenTrial:
        out = self.output / f"trial-{trial.number}"
        for key, attr in (("host", HOST), ("pid", os.getpid()), ("output", str(out))):
            trial.set_user_attr(key, attr)
        try:
            value = self.train(trial, out)
        except optuna.TrialPruned as e:
            log.info("trial %d %s", trial.number, e)
            state, value = TrialState.PRUNED, None
        except TrialFailed as e:
            trial.set_user_attr("fail_reason", str(e))
            log.warning("trial %d failed: %s", trial.number, e)
            state, value = TrialState.FAIL, None
        except KeyboardInterrupt:  # the search itself stops: the next run retries this trial
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("fail_reason", "interrupted: the search was stopped while it ran")
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", f"search error: {type(e).__name__}: {e}")
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            state = TrialState.COMPLETE
        self.study.tell(trial, value, state=state)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # only an interrupted trial resumes from them
        return self.study.get_trials(deepcopy=False)[trial.number]

    def command(self, hps: dict[str, str], out: Path) -> list[str]:
        cmd = [sys.executable, "-m", "imgclf.local", "train", "--data", str(self.data), "--output", str(out)]
        for key, value in hps.items():
            cmd += ["--hp", f"{key}={value}"]
        return cmd + (["--weights", str(self.weights)] if self.weights else [])

    def train(self, trial: Trial, out: Path) -> float:
        """One local training run; returns the objective's last value, or raises TrialPruned / TrialFailed."""
        hps = hyperparameter_strings({**self.static, **trial.params})
        out.mkdir(parents=True, exist_ok=True)
        # A retry resumes where the interrupted trial stopped, possibly after its last epoch: no new line then.
        value = self._resume_retry(trial, out)
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
        """A retried trial continues from the interrupted one: its checkpoint and the epochs it reported."""
        number = trial.user_attrs.get("retry_of")
        if number is None:
            return None
        original = self.study.get_trials(deepcopy=False)[number]
        for step, value in sorted(original.intermediate_values.items()):
            trial.report(value, step)
        checkpoints = Path(original.user_attrs.get("output", "")) / "checkpoints"
        if original.user_attrs.get("host") == HOST and checkpoints.is_dir() and not (out / "checkpoints").exists():
            shutil.move(checkpoints, out / "checkpoints")
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
        elif t.state == TrialState.FAIL:
            note = f"  ({t.user_attrs.get('fail_reason', 'no reason recorded')[:160]})"
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


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our log lines and table say what happens
    # Expected, and explained in our own log lines: an enqueued value outside the range, a retried trial
    # re-reporting the epochs its predecessor reported.
    warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
    warnings.filterwarnings("ignore", message="The reported value is ignored")
    search = Search(args, space, static)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM stops the search as cleanly as Ctrl-C
    try:
        search.run()
    except KeyboardInterrupt:
        log.error("search interrupted; run the same command again to resume study %s (%s)",
                  search.study.study_name, search.storage_url)
        return EXIT_INTERRUPTED
    search.write_best(args.best_out)
    return EXIT_OK
