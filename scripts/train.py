#!/usr/bin/env python3
"""Run a SageMaker training job with the training image; wait, streaming its log; fetch its reports.

    python scripts/train.py --data s3://my-bucket/dogImages --role MySageMakerRole \\
        --hp model=vgg16 --hp epochs=10 --spot --max-wait 14400
    python scripts/train.py --hyperparameters best_hyperparameters.json --data ... --role ...
    python scripts/train.py --attach imgclf-vgg16-20260101-120000     # wait for a job already running

Prints the model artifact URI (for deploy.py --model-data) on stdout.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from imgclf.aws import cli, jobs
from imgclf.aws.training import hyperparameter_strings, training_job_request

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, epilog=cli.EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-name", help="default: imgclf-<model>-<UTC timestamp>")
    parser.add_argument("--attach", metavar="JOB", help="wait for (and report on) an existing training job instead")
    parser.add_argument("--reports-dir", type=Path,
                        help="where the job's reports are extracted (default: ./reports/<job>)")
    parser.add_argument("--no-logs", action="store_true", help="do not stream the job's CloudWatch log")
    jobs.add_job_args(parser)
    cli.add_wait_args(parser, "training job")
    cli.add_common_args(parser, role=True)
    args = cli.parse_args(parser, argv)

    if args.attach:
        api = cli.make_api(args)
        name = args.attach
    else:
        hps = jobs.hyperparameters_from(args)
        hyperparameter_strings(hps)  # a bad value stops here, before anything is sent
        api = cli.make_api(args)
        name = args.job_name or cli.resource_name("imgclf", str(hps.get("model", "vgg16")), suffix=cli.timestamp())
        request = training_job_request(name, jobs.job_spec(api, args, name), hps, cli.tags_from(args.tag))
        api.call("sagemaker", "CreateTrainingJob", request)
        if args.dry_run:
            return cli.EXIT_OK
        log.info("training job %s created", name)
    if args.no_wait:
        print(name)
        return cli.EXIT_OK
    if args.dry_run:
        return cli.EXIT_OK

    job = jobs.wait_training_job(api, name, args.poll_interval, args.timeout, logs=not args.no_logs)
    jobs.report_training_job(job)
    jobs.download_reports(api, job, args.reports_dir or Path("reports") / name)
    print(job["ModelArtifacts"]["S3ModelArtifacts"])
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
