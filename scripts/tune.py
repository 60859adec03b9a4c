#!/usr/bin/env python3
"""Run a SageMaker hyperparameter tuning job over the training image; write the best hyperparameters.

    python scripts/tune.py --data s3://my-bucket/dogImages --role MySageMakerRole --max-jobs 12 --max-parallel 3
    python scripts/tune.py ... --param lr=0.0001:0.01:log --param freeze=head,none --hp model=resnet50
    python scripts/tune.py --attach imgclf-hpo-20260101-1200     # wait for a tuning job already running
    python scripts/tune.py --local --data dogImages --hp model=resnet50 --max-jobs 20   # Optuna, on this machine

The default search space is the reference project's: lr 0.001-0.1 (log), batch-size {128, 256}, epochs
{5, 7, 10}. --search-space FILE replaces it (JSON, shape in imgclf/search/space.py), --param adds or
replaces one range. The best job's hyperparameters go to --best-out (JSON), which
`scripts/train.py --hyperparameters FILE` accepts. --local runs the same search here with Optuna, each trial a
local-mode training run (imgclf/search/local_search.py; see README).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from imgclf.aws import jobs, scripting
from imgclf.aws.session import Api, AwsError
from imgclf.aws.training import MAX_WARM_START_PARENTS, best_hyperparameters, check_warm_start, tuning_job_request
from imgclf.config import hyperparameter_strings
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_CODES_HELP, EXIT_OK, JobFailed
from imgclf.search import local_search
from imgclf.search.flags import CLOUD, only_for
from imgclf.search.results import write_best_file
from imgclf.search.space import DEFAULT_SEARCH_SPACE, OBJECTIVES, load_search_space, parse_range

log = logging.getLogger("tune")
COUNTERS = ("Completed", "InProgress", "RetryableError", "NonRetryableError", "Stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    only_for(CLOUD,
             parser.add_argument("--job-name", help="tuning job name, at most 32 characters (default: "
                                                    "imgclf-hpo-<timestamp>)"),
             parser.add_argument("--attach", metavar="TUNING_JOB", help="wait for an existing tuning job instead"))
    parser.add_argument("--best-out", type=Path, default=Path("best_hyperparameters.json"),
                        help="where the best hyperparameters are written (default best_hyperparameters.json)")
    space = parser.add_argument_group("search")
    space.add_argument("--search-space", type=Path, metavar="FILE", help="JSON search space replacing the default")
    space.add_argument("--param", action="append", type=scripting.key_value, default=[], metavar="NAME=RANGE",
                       help="a range: MIN:MAX[:log|linear] or a,b,c (repeat)")
    space.add_argument("--objective", choices=sorted(OBJECTIVES), default="accuracy",
                       help="accuracy: maximise valid:accuracy (default); loss: minimise valid:loss")
    space.add_argument("--strategy", choices=("Bayesian", "Random"), default="Bayesian")
    space.add_argument("--max-jobs", type=int, default=10, help="training jobs in all (default 10)")
    space.add_argument("--no-early-stopping", action="store_true", help="let every training job run to the end")
    only_for(CLOUD,
             space.add_argument("--max-parallel", type=int, default=None, help="training jobs at once (default 2)"),
             space.add_argument("--warm-start", action="append", default=[], metavar="TUNING_JOB",
                                help="start from an earlier tuning job's results (repeat, up to 5)"),
             space.add_argument("--warm-start-type", choices=("IdenticalDataAndAlgorithm", "TransferLearning"),
                                default="IdenticalDataAndAlgorithm"))
    local_search.add_args(parser)  # --local: the same search with Optuna on this machine
    jobs.add_job_args(parser)
    scripting.add_wait_args(parser, "tuning job")
    scripting.add_common_args(parser, role=True)
    return parser


def search_space(args: argparse.Namespace) -> dict:
    space = load_search_space(args.search_space) if args.search_space else dict(DEFAULT_SEARCH_SPACE)
    for name, spec in args.param:
        space[name] = parse_range(name, spec)
    return space


def wait(api: Api, name: str, args: argparse.Namespace) -> dict:
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
            args.poll_interval, args.timeout, on_poll)
    finally:
        if bar:
            bar.close()


def warm_start_parents(api: Api, names: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """The parents' descriptions, for check_warm_start (a dry run without AWS access cannot read them)."""
    parents = {}
    for name in names:
        if scripting.is_offline(api):
            log.warning("dry run without AWS access: warm start parent %s not checked", name)
            continue
        parent = scripting.describe_or_none(api, "sagemaker", "DescribeHyperParameterTuningJob",
                                            {"HyperParameterTuningJobName": name})
        if parent is None:
            raise AwsError(f"warm start parent {name}: no such tuning job in {scripting.region_of(api, args)} "
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = scripting.parse_args(parser, argv)
    local_search.check_flags(args)
    if args.local:
        return local_search.run(args, search_space(args), jobs.hyperparameters_from(args))
    if args.attach:
        api = scripting.make_api(args)
        name = args.attach
    else:
        space = search_space(args)
        static = jobs.hyperparameters_from(args)
        hyperparameter_strings(static)  # a bad value stops here, before anything is sent
        if args.checkpoint_s3:
            # One definition serves every training job of the tuning job: parallel jobs must not share checkpoints.
            raise UserError("--checkpoint-s3 is for train.py: the training jobs of a tuning job would share it")
        parents = list(dict.fromkeys(args.warm_start))
        if len(parents) > MAX_WARM_START_PARENTS:
            raise UserError(f"--warm-start {len(parents)} tuning jobs: SageMaker takes at most "
                            f"{MAX_WARM_START_PARENTS} parents; keep the best {MAX_WARM_START_PARENTS}")
        api = scripting.make_api(args)
        name = args.job_name or scripting.resource_name("imgclf-hpo", suffix=scripting.timestamp()[2:], max_len=32)
        if len(name) > 32:
            raise UserError(f"--job-name {name!r}: tuning job names have at most 32 characters")
        request = tuning_job_request(
            name, jobs.job_spec(api, args, name, checkpoints=False), space, static, objective=args.objective,
            max_jobs=args.max_jobs, max_parallel=args.max_parallel or 2, early_stopping=not args.no_early_stopping,
            strategy=args.strategy, warm_start_from=parents, warm_start_type=args.warm_start_type,
            tags=scripting.tags_from(args.tag))
        if parents:  # SageMaker's rules, before anything is sent
            check_warm_start(request, warm_start_parents(api, parents, args))
        jobs.create(api, "CreateHyperParameterTuningJob", request, name, "tuning job")
    if not jobs.waits(args, name, attached=bool(args.attach)):
        return EXIT_OK

    job = wait(api, name, args)
    status = job["HyperParameterTuningJobStatus"]
    if status == "Failed":
        raise JobFailed(f"tuning job {name} failed: {job.get('FailureReason') or 'no reason given'}")
    write_best(job, args.best_out)
    if status != "Completed":
        raise JobFailed(f"tuning job {name} {status}; the best job so far was written to {args.best_out}")
    return EXIT_OK


if __name__ == "__main__":
    scripting.run(main)
