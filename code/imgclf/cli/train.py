"""Run a SageMaker training job with the training image; wait, streaming its log; fetch its reports.

    imgclf-train --data s3://my-bucket/dogImages --role MySageMakerRole \\
        --hp model=vgg16 --hp epochs=10 --spot --max-wait 14400
    imgclf-train --hyperparameters best_hyperparameters.json --data ... --role ...
    imgclf-train --attach imgclf-vgg16-20260101-120000     # wait for a job already running
    imgclf-train --local --data dogImages --hp model=resnet18   # SageMaker's local mode, no AWS
    imgclf-train --channel train=s3://.../train/ --channel valid=s3://.../valid/ --instance-count 4 \\
        --shard-by-s3-key --input-mode FastFile --max-retries 3     # each instance trains on its part of train

Prints the model artifact URI (for deploy.py --model-data) on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields
from pathlib import Path

from imgclf import config
from imgclf.aws import jobs, scripting
from imgclf.aws.session import AwsError
from imgclf.aws.training import training_job_request
from imgclf.config import hyperparameter_strings
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_CODES_HELP, EXIT_OK, JobFailed

log = logging.getLogger("train")
# What defines a new job, which --attach does not read (the role too, but SAGEMAKER_ROLE may set it for every run).
ATTACH_IGNORES = {f.name for f in fields(jobs.JobOptions)} - {"role"} | {"hyperparameters", "hp", "job_name", "tag"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-name", help="default: imgclf-<model>-<UTC timestamp>")
    parser.add_argument("--attach", metavar="JOB", help="wait for (and report on) an existing training job instead")
    parser.add_argument("--reports-dir", type=Path,
                        help="where the job's reports are extracted (default: ./reports/<job>); rules.json and "
                             "profiler-report.html there are kept current while the job runs")
    parser.add_argument("--no-logs", action="store_true", help="do not stream the job's CloudWatch log")
    jobs.add_job_args(parser)
    scripting.add_wait_args(parser, "training job")
    scripting.add_common_args(parser, role=True)
    scripting.add_local_arg(parser, "the training job")
    return parser


@scripting.program
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = vars(args)
    if args.local and (args.attach or args.no_wait):
        raise UserError("--local runs the job within this command (the SDK's local mode keeps no jobs between "
                        "commands): drop --attach / --no-wait")

    reports = args.reports_dir or Path("reports")  # default: reports/<job>
    if not (args.no_wait or args.dry_run):  # where the reports go, before anything is sent
        scripting.check_output_path("--reports-dir", reports, folder=True)
    if args.attach:
        if ignored := scripting.given(parser, args, ATTACH_IGNORES):
            raise UserError(f"{', '.join(ignored)}: --attach waits for a job that exists, with its own settings; "
                            "drop them")
        api = scripting.make_api(scripting.Access.from_flags(flags))
        name = args.attach
    else:
        options = jobs.check_job_options(jobs.JobOptions.from_flags(flags), local=args.local)
        hps = jobs.hyperparameters_from(args.hyperparameters, args.hp)
        hyperparameter_strings(hps)  # a bad value stops here, before anything is sent
        api = scripting.make_api(scripting.Access.from_flags(flags))
        model = str(hps.get("model", config.default("model")))
        name = args.job_name or scripting.resource_name("imgclf", model, suffix=scripting.timestamp())
        request = training_job_request(name, jobs.job_spec(api, name, options), hps, scripting.tags_from(args.tag))
        if args.local:
            request = jobs.local_output_path(request)
        try:
            jobs.create(api, "CreateTrainingJob", request, name, "training job")
        except JobFailed as e:  # local mode: docker-compose exited non-zero
            if not args.local:
                raise
            raise JobFailed(f"training job {name} Failed: {jobs.local_failure(request) or e}") from None
        if args.local and (reason := jobs.local_failure(request)):
            raise JobFailed(f"training job {name} Failed: {reason}")
    if not jobs.waits(name, dry_run=args.dry_run, no_wait=args.no_wait, attached=bool(args.attach)):
        return EXIT_OK

    reports = args.reports_dir or reports / name
    # On AWS, rules.json and the report are fetched into `reports` while the job runs, then replaced by the final
    # ones. Local mode: the job ran within CreateTrainingJob, its log went to stderr; there is no CloudWatch.
    job = jobs.wait_training_job(api, name, args.poll_interval, args.timeout, logs=not (args.no_logs or args.local),
                                 live=None if args.local else jobs.LiveReports(api, reports))
    try:  # whatever the job's end: a Failed or Stopped job's rules and profiler report say why
        jobs.download_reports(api, job, reports)
    except AwsError as e:  # the job's end is the news, reported next: a Completed job's model URI is printed
        log.warning("no reports: %s", e)
    jobs.report_training_job(job)  # raises JobFailed for a Failed or Stopped job
    print(job["ModelArtifacts"]["S3ModelArtifacts"])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
