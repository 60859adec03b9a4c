"""Hyperparameter tuning on SageMaker (scripts/tune.py): create a tuning job over the training image, or attach to
one; wait, showing its progress; write the best job's hyperparameters for `train.py --hyperparameters FILE`.

The request comes from imgclf.aws.training (tuning_job_request, check_warm_start), the search space from
imgclf.search.space; --local runs the same search with Optuna instead (imgclf.search.local_search).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgclf.aws import jobs, scripting
from imgclf.aws.scripting import Access, Waiting
from imgclf.aws.session import Api, AwsError
from imgclf.aws.training import (
    HYPERBAND_EPOCHS_TUNED,
    MAX_WARM_START_PARENTS,
    best_hyperparameters,
    check_warm_start,
    tuning_job_request,
)
from imgclf.config import default, hyperparameter_strings, parse_value
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_OK, JobFailed
from imgclf.flags import FlagGroup
from imgclf.search.results import write_best_file
from imgclf.search.space import DEFAULT_SEARCH_SPACE, load_search_space, parse_range, static_hyperparameters

log = logging.getLogger("imgclf.aws")
COUNTERS = ("Completed", "InProgress", "RetryableError", "NonRetryableError", "Stopped")
MAX_NAME = 32  # SageMaker's limit for tuning job names


@dataclass(frozen=True)
class Search(FlagGroup):
    """tune.py's search flags: the space (a file replacing the default, and ranges over it), the objective, the
    strategy and its limits, and the tuning jobs a warm start continues."""

    search_space: Path | None = None
    param: Sequence[tuple[str, str]] = ()  # NAME=RANGE: MIN:MAX[:log|linear] or a,b,c
    objective: str = "accuracy"
    strategy: str = "Bayesian"
    max_jobs: int = 10
    max_parallel: int | None = None  # default: 2, or max_jobs when fewer
    no_early_stopping: bool = False
    warm_start: Sequence[str] = ()
    warm_start_type: str = "IdenticalDataAndAlgorithm"
    hyperband_min_epochs: int | None = None  # Hyperband's MinResource
    target_objective: float | None = None  # completion criteria: the objective value that ends the tuning job
    max_tuning_runtime: int | None = None  # and the whole tuning job's time limit (seconds)
    random_seed: int | None = None

    def space(self) -> dict[str, dict[str, Any]]:
        space = load_search_space(self.search_space) if self.search_space else dict(DEFAULT_SEARCH_SPACE)
        for name, spec in self.param:
            space[name] = parse_range(name, spec)
        return space

    def names_epochs(self) -> bool:
        """Whether the user's own ranges (--search-space, --param) tune epochs, rather than the default space."""
        return self.search_space is not None or any(name == "epochs" for name, _ in self.param)


def hyperband_inputs(search: Search, space: dict[str, dict[str, Any]],
                     static: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The space and static hyperparameters of a Hyperband search: epochs is Hyperband's resource (MaxResource), so
    it is static (training.hyperband_config). The default space's epochs range gives way to its largest value, or
    to --hp epochs; a range the user gave is refused."""
    if "epochs" in space:
        if search.names_epochs():
            raise UserError(HYPERBAND_EPOCHS_TUNED)
        values = space["epochs"].get("values") or [space["epochs"]["max"]]
        top = max(int(parse_value("epochs", v)) for v in values)
        space = {name: r for name, r in space.items() if name != "epochs"}
        log.info("--strategy Hyperband: epochs is not tuned but handed out by Hyperband, up to epochs=%s per job",
                 static.get("epochs", top))
        static = {"epochs": top, **static}
    return space, {"epochs": default("epochs"), **static}


def wait_tuning_job(api: Api, name: str, waiting: Waiting) -> dict:
    """Wait for the tuning job to end, logging its counts and best job as they change (a bar on a terminal)."""
    bar = None
    seen: dict[str, str] = {}

    def on_poll(job: dict) -> None:
        nonlocal bar
        counts = job.get("TrainingJobStatusCounters", {})
        limit = job["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxNumberOfTrainingJobs"]
        best = job.get("BestTrainingJob") or {}
        metric = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        line = (f"{job['HyperParameterTuningJobStatus']}: {counts.get('Completed', 0)} done, "
                f"{counts.get('InProgress', 0)} running, "
                f"{counts.get('NonRetryableError', 0) + counts.get('RetryableError', 0)} failed, "
                f"{counts.get('Stopped', 0)} stopped of {limit}"
                + (f"; best {metric['MetricName']}={metric['Value']:.4g} ({best['TrainingJobName']})"
                   if metric else ""))
        if line != seen.get("line"):
            seen["line"] = line
            log.info("tuning job %s %s", name, line)
        finished = sum(counts.get(k, 0) for k in COUNTERS if k != "InProgress")
        bar = bar or scripting.progress_bar(limit, "training jobs", unit="job")
        if bar:
            bar.n = finished
            bar.refresh()

    try:
        return scripting.wait_for(
            lambda: api.call("sagemaker", "DescribeHyperParameterTuningJob",
                             {"HyperParameterTuningJobName": name}, mutates=False),
            lambda job: job["HyperParameterTuningJobStatus"], {"Completed", "Failed", "Stopped"},
            waiting.poll_interval, waiting.timeout, on_poll)
    finally:
        if bar:
            bar.close()


def warm_start_parents(api: Api, names: list[str]) -> dict[str, dict]:
    """The parents' descriptions, for check_warm_start (a dry run without AWS access cannot read them)."""
    parents = {}
    for name in names:
        if scripting.is_offline(api):
            log.warning("dry run without AWS access: warm start parent %s not checked", name)
            continue
        parent = scripting.describe_or_none(api, "sagemaker", "DescribeHyperParameterTuningJob",
                                            {"HyperParameterTuningJobName": name})
        if parent is None:
            raise AwsError(f"warm start parent {name}: no such tuning job in {scripting.region_of(api)} "
                           "(list them with `aws sagemaker list-hyper-parameter-tuning-jobs`)")
        parents[name] = parent
    return parents


def write_best(job: dict, path: Path) -> None:
    best = job.get("BestTrainingJob") or {}
    hps = best_hyperparameters(job)
    metric = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
    write_best_file(path, job["HyperParameterTuningJobName"], best.get("TrainingJobName"), metric, hps)
    print(f"best training job: {best.get('TrainingJobName')} "
          f"{metric.get('MetricName', '')}={metric.get('Value', '?')}")
    print(f"hyperparameters: {json.dumps(hps, sort_keys=True)} -> {path}")


def create_tuning_job(access: Access, *, job_name: str | None, job: jobs.JobOptions, search: Search,
                      hyperparameters_file: Path | None = None, hp: Sequence[tuple[str, str]] = (),
                      tags: Sequence[tuple[str, str]] = ()) -> tuple[Api, str]:
    """Check the inputs (before anything is sent), then send CreateHyperParameterTuningJob; (the Api, its name).
    The static hyperparameters: --hyperparameters FILE, then each --hp over it."""
    space, static = search.space(), jobs.hyperparameters_from(hyperparameters_file, hp)
    if search.strategy == "Hyperband":
        space, static = hyperband_inputs(search, space, static)
    static = static_hyperparameters(space, static)
    hyperparameter_strings(static)  # a bad value stops here, before anything is sent
    if job.checkpoint_s3:
        # One definition serves every training job of the tuning job: parallel jobs must not share checkpoints.
        raise UserError("--checkpoint-s3 is for train.py: the training jobs of a tuning job would share it")
    parents = list(dict.fromkeys(search.warm_start))
    if len(parents) > MAX_WARM_START_PARENTS:
        raise UserError(f"--warm-start {len(parents)} tuning jobs: SageMaker takes at most "
                        f"{MAX_WARM_START_PARENTS} parents; keep the best {MAX_WARM_START_PARENTS}")
    api = scripting.make_api(access)
    name = job_name or scripting.resource_name("imgclf-hpo", suffix=scripting.timestamp()[2:], max_len=MAX_NAME)
    if len(name) > MAX_NAME:
        raise UserError(f"--job-name {name!r}: tuning job names have at most {MAX_NAME} characters")
    max_parallel = min(2, search.max_jobs) if search.max_parallel is None else search.max_parallel
    request = tuning_job_request(
        name, jobs.job_spec(api, name, job, checkpoints=False), space, static, objective=search.objective,
        max_jobs=search.max_jobs, max_parallel=max_parallel, early_stopping=not search.no_early_stopping,
        strategy=search.strategy, warm_start_from=parents, warm_start_type=search.warm_start_type,
        tags=scripting.tags_from(tags), hyperband_min_epochs=search.hyperband_min_epochs,
        target_objective=search.target_objective, max_runtime_s=search.max_tuning_runtime,
        random_seed=search.random_seed)
    if parents:  # SageMaker's rules, before anything is sent
        check_warm_start(request, warm_start_parents(api, parents))
    jobs.create(api, "CreateHyperParameterTuningJob", request, name, "tuning job")
    return api, name


def tune(access: Access, *, job: jobs.JobOptions, search: Search, best_out: Path,
         hyperparameters_file: Path | None = None, hp: Sequence[tuple[str, str]] = (), attach: str | None = None,
         job_name: str | None = None, tags: Sequence[tuple[str, str]] = (), waiting: Waiting = Waiting()) -> int:
    """Create a tuning job (or attach to the one named `attach`), wait for it, write its best hyperparameters to
    `best_out`; with --no-wait print its name instead."""
    if attach:
        api, name = scripting.make_api(access), attach
    else:
        api, name = create_tuning_job(access, job_name=job_name, job=job, search=search,
                                      hyperparameters_file=hyperparameters_file, hp=hp, tags=tags)
    if not jobs.waits(name, dry_run=access.dry_run, no_wait=waiting.no_wait, attached=bool(attach)):
        return EXIT_OK

    described = wait_tuning_job(api, name, waiting)
    status = described["HyperParameterTuningJobStatus"]
    if status == "Failed":
        raise JobFailed(f"tuning job {name} failed: {described.get('FailureReason') or 'no reason given'}")
    write_best(described, best_out)
    if status != "Completed":
        raise JobFailed(f"tuning job {name} {status}; the best job so far was written to {best_out}")
    return EXIT_OK
