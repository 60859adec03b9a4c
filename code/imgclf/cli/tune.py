"""Run a SageMaker hyperparameter tuning job over the training image; write the best hyperparameters.

    imgclf-tune --data s3://my-bucket/dogImages --role MySageMakerRole --max-jobs 12 --max-parallel 3
    imgclf-tune ... --param lr=0.0001:0.01:log --param freeze=head,none --hp model=resnet50
    imgclf-tune --attach imgclf-hpo-20260101-1200     # wait for a tuning job already running
    imgclf-tune ... --strategy Hyperband --hp epochs=20 --target-objective 0.9 --max-tuning-runtime 21600
    imgclf-tune --local --data dogImages --hp model=resnet50 --max-jobs 20   # Optuna, on this machine

The default search space is the reference project's: lr 0.001-0.1 (log), batch-size {128, 256}, epochs
{5, 7, 10}. --search-space FILE replaces it (JSON, shape in imgclf/search/space.py), --param adds or
replaces one range. The best job's hyperparameters go to --best-out (JSON), which
`imgclf-train --hyperparameters FILE` accepts. --local runs the same search here with Optuna, each trial a
local-mode training run (imgclf/search/local_search.py; see README).

--strategy Hyperband hands out epochs itself (up to the static epochs; --hp epochs=N), so epochs is not tuned
then: the default space's epochs range gives way to its largest value, and a range you give is refused
(docs/tuning.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgclf.aws import jobs, scripting, tuning
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_CODES_HELP
from imgclf.flags import CLOUD, LOCAL, only_for
from imgclf.search import local_search
from imgclf.search.space import OBJECTIVES


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
    space.add_argument("--objective", choices=sorted(OBJECTIVES), default=tuning.Search.objective,
                       help="accuracy: maximise valid:accuracy (default); loss: minimise valid:loss")
    space.add_argument("--strategy", choices=("Bayesian", "Random", "Hyperband"), default=tuning.Search.strategy,
                       help="Bayesian (default), Random, or Hyperband (SageMaker only: hands out epochs, stopping "
                            "poor jobs early; epochs is then static)")
    space.add_argument("--max-jobs", type=int, default=tuning.Search.max_jobs,
                       help=f"training jobs in all (default {tuning.Search.max_jobs})")
    space.add_argument("--no-early-stopping", action="store_true", help="let every training job run to the end")
    only_for(CLOUD,
             space.add_argument("--max-parallel", type=int, default=None,
                                help="training jobs at once (default 2, or --max-jobs when fewer)"),
             space.add_argument("--warm-start", action="append", default=[], metavar="TUNING_JOB",
                                help="start from an earlier tuning job's results (repeat, up to 5)"),
             space.add_argument("--warm-start-type", choices=("IdenticalDataAndAlgorithm", "TransferLearning"),
                                default=tuning.Search.warm_start_type),
             space.add_argument("--hyperband-min-epochs", type=int, metavar="N",
                                help="Hyperband: the fewest epochs a job runs before it may be stopped (MinResource)"),
             space.add_argument("--target-objective", type=float, metavar="VALUE",
                                help="end the tuning job once a training job reaches this objective value (e.g. "
                                     "0.9 for accuracy)"),
             space.add_argument("--max-tuning-runtime", type=int, metavar="SECONDS",
                                help="end the tuning job after this long (--max-runtime limits each training job)"),
             space.add_argument("--random-seed", type=int, metavar="N",
                                help="seed of SageMaker's search, for more repeatable tuning jobs"))
    local_search.add_args(parser)  # --local: the same search with Optuna on this machine
    jobs.add_job_args(parser)
    scripting.add_wait_args(parser, "tuning job")
    scripting.add_common_args(parser, role=True)
    return parser


# Flags of one path with an equivalent on the other: (dest, path it belongs to) -> what to use instead.
EQUIVALENTS = {
    ("random_seed", CLOUD): "--random-seed is a tuning job's; the local search's sampler takes --seed N",
    ("max_tuning_runtime", CLOUD): "--max-tuning-runtime is a tuning job's; the local search takes --timeout "
                                     "SECONDS (no trial starts after it)",
    ("seed", LOCAL): "--seed is the local search's; a tuning job takes --random-seed N",
}


def check_paths(flags: dict) -> None:
    """Flags of the other path that have an equivalent on this one, and Hyperband with --local: one line each."""
    local = flags["local"]
    if local and flags["strategy"] == "Hyperband":
        raise UserError("--strategy Hyperband is a SageMaker tuning job's: the local search (Optuna) samples with "
                        "Bayesian (TPE) or Random, and its --pruner halving stops poor trials by successive "
                        "halving, the rule Hyperband runs in each of its brackets")
    for (dest, path), instead in EQUIVALENTS.items():
        if flags[dest] is not None and (path == CLOUD) == local:
            raise UserError(instead)


@scripting.program
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = vars(args)
    job = jobs.check_job_options(jobs.JobOptions.from_flags(flags), local=args.local)
    check_paths(flags)
    local_search.check_flags(flags)
    scripting.check_output_path("--best-out", args.best_out, folder=False)
    if args.local:
        return local_search.run(local_search.Options.from_flags(flags), tuning.Search.from_flags(flags).space(),
                                jobs.hyperparameters_from(args.hyperparameters, args.hp))
    return tuning.tune(scripting.Access.from_flags(flags), job=job,
                       search=tuning.Search.from_flags(flags), hyperparameters_file=args.hyperparameters, hp=args.hp,
                       attach=args.attach, job_name=args.job_name, tags=args.tag, best_out=args.best_out,
                       waiting=scripting.Waiting.from_flags(flags))


if __name__ == "__main__":
    sys.exit(main())
