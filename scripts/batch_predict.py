#!/usr/bin/env python3
"""Score every image under an S3 prefix with a SageMaker batch transform job; write a CSV summary next to it.

    python scripts/batch_predict.py --input s3://my-bucket/photos --model-data s3://.../model.tar.gz --role ROLE
    python scripts/batch_predict.py --input s3://my-bucket/photos --training-job imgclf-vgg16-20260101-120000
    python scripts/batch_predict.py --local --input photos --model-data sagemaker-local/<job>/output/model.tar.gz

The serving image answers each image as an endpoint does (one image per request: SplitType None, BatchStrategy
SingleRecord). SageMaker writes one JSON answer per image, <output>/<image path>.out; then this script reads
them and writes <output>/summary.csv (file, class_name, probability, error: the top-1 class of each image) and
prints its location. Default output: s3://<input bucket>/imgclf/batch/<job> (with --local: sagemaker-local/batch/
<job>). Batch transform has no spot instances; a VPC is the model's setting.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imgclf.aws import endpoints, s3sync, scripting, transform
from imgclf.aws.images import image_tag_default
from imgclf.aws.session import Api, AwsError
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_CODES_HELP, EXIT_OK, JobFailed
from imgclf.processes import free_port

log = logging.getLogger("batch_predict")
LOCAL_OUTPUT = "sagemaker-local/batch"
SUMMARY = "summary.csv"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="S3URI",
                        help="prefix holding the images (every object under it is scored); with --local: a folder")
    parser.add_argument("--output", metavar="S3URI", help="where the answers and summary.csv go (default: "
                        "s3://<input bucket>/imgclf/batch/<job>; with --local: sagemaker-local/batch/<job>)")
    parser.add_argument("--job-name", help="default: imgclf-batch-<UTC timestamp>")
    model = parser.add_argument_group("model (created as deploy.py creates it, named imgclf-batch-<content hash>)")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-data", metavar="S3URI", help="s3://.../model.tar.gz (train.py prints it)")
    source.add_argument("--training-job", metavar="JOB", help="take the model artifact of this training job")
    model.add_argument("--image", help="serving image URI (default: <account>.dkr.ecr.<region>.amazonaws.com/"
                                       "imgclf-serve:<tag>; with --local: imgclf-serve:<tag>)")
    model.add_argument("--image-tag", default=image_tag_default(),
                       help="tag of the default image (default: this checkout's git sha, what `make push` pushes)")
    model.add_argument("--workers", type=int, help="model server workers per instance (SAGEMAKER_MODEL_SERVER_WORKERS)")
    model.add_argument("--top-k", type=int, help="classes per image in each answer (IMGCLF_TOP_K; default 5)")
    model.add_argument("--env", action="append", type=scripting.key_value, default=[], metavar="KEY=VALUE",
                       help="more container environment (repeat)")
    res = parser.add_argument_group("resources")
    res.add_argument("--instance-type", help="default ml.m5.large; with --local: local (the default) or local_gpu")
    res.add_argument("--instance-count", type=int, default=1)
    res.add_argument("--max-concurrent", type=int, metavar="N",
                     help="requests in flight per instance (default: the container's answer to /execution-parameters, "
                          "one per model server worker)")
    res.add_argument("--max-payload", type=int, default=6, metavar="MB", help="largest image (default 6)")
    res.add_argument("--invocation-timeout", type=int, metavar="SECONDS", help="per image (SageMaker's default 600)")
    res.add_argument("--invocation-retries", type=int, metavar="N", help="0-3 (SageMaker's default 3)")
    res.add_argument("--volume-kms-key", metavar="KEY", help="KMS key for the instances' storage volumes")
    res.add_argument("--output-kms-key", metavar="KEY", help="KMS key that encrypts the answers in S3")
    parser.add_argument("--tag", action="append", type=scripting.key_value, default=[], metavar="KEY=VALUE")
    scripting.add_wait_args(parser, "transform job")
    scripting.add_common_args(parser, role=True)
    scripting.add_local_arg(parser, "the transform job")
    return parser


def model_data_of(api: Api, args: argparse.Namespace) -> str:
    if args.model_data:
        return scripting.local_uri(args.model_data, "--model-data") if scripting.is_local(api) else args.model_data
    if scripting.is_local(api):
        raise UserError(f"training job {args.training_job}: the SDK's local mode keeps a job only in the train.py "
                        "--local that ran it; pass --model-data with the path that command printed")
    job = scripting.describe_or_none(api, "sagemaker", "DescribeTrainingJob", {"TrainingJobName": args.training_job})
    if job is None:
        if scripting.is_offline(api):
            return f"s3://<output of {args.training_job}>/model.tar.gz"
        raise AwsError(f"training job {args.training_job} not found in {scripting.region_of(api, args)}")
    if job["TrainingJobStatus"] != "Completed":
        raise UserError(f"training job {args.training_job} is {job['TrainingJobStatus']}: use a Completed one")
    return job["ModelArtifacts"]["S3ModelArtifacts"]


def create_model(api: Api, args: argparse.Namespace, local: bool) -> str:
    """The model, as deploy.py makes it (same image, artifact and environment, so the same answers)."""
    env = {k: str(v) for k, v in (("SAGEMAKER_MODEL_SERVER_WORKERS", args.workers), ("IMGCLF_TOP_K", args.top_k))
           if v is not None}
    env.update(dict(args.env))
    spec = endpoints.ServingSpec(name="imgclf-batch", image="", model_data=model_data_of(api, args),
                                 role_arn=scripting.role_arn(api, args.role), environment=env,
                                 instance_type=args.instance_type or ("local" if local else "ml.m5.large"), local=local)
    spec.image = scripting.serving_image(api, args)
    spec.check()
    model = spec.model_request()
    if scripting.describe_or_none(api, "sagemaker", "DescribeModel", {"ModelName": model["ModelName"]}):
        log.info("model %s exists (same image, artifact and environment)", model["ModelName"])
    else:
        api.call("sagemaker", "CreateModel", model)
    return model["ModelName"]


def local_path(uri: str) -> Path:
    return Path(urllib.parse.urlsplit(uri).path)


def answers(api: Api, output_uri: str) -> dict[str, bytes]:
    """Input file (relative to the input prefix) -> its answer, from the <file>.out objects under the output."""
    suffix = transform.OUTPUT_SUFFIX
    if output_uri.startswith("file://"):
        root = local_path(output_uri)
        return {p.relative_to(root).as_posix().removesuffix(suffix): p.read_bytes()
                for p in sorted(root.rglob(f"*{suffix}")) if p.is_file()}
    bucket, prefix = s3sync.parse_s3_uri(output_uri)
    keys = sorted(k for k in s3sync.remote_objects(api, bucket, prefix) if k.endswith(suffix))
    api.client("s3")  # create the client before the threads share it

    def read(key: str) -> bytes:
        return api.call("s3", "GetObject", {"Bucket": bucket, "Key": key}, mutates=False)["Body"].read()

    with ThreadPoolExecutor(max_workers=16) as pool:
        bodies = list(pool.map(read, keys))
    return {key.removeprefix(prefix).removesuffix(suffix): body for key, body in zip(keys, bodies)}


def write_summary(api: Api, output_uri: str, rows: list[tuple[str, ...]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(transform.SUMMARY_HEADER)
    writer.writerows(rows)
    if output_uri.startswith("file://"):
        path = local_path(output_uri) / SUMMARY
        tmp = path.with_name(f".{SUMMARY}.tmp")  # no half-written summary
        tmp.write_text(text.getvalue())
        tmp.replace(path)
        return str(path)
    bucket, prefix = s3sync.parse_s3_uri(output_uri)
    api.call("s3", "PutObject", {"Bucket": bucket, "Key": prefix + SUMMARY, "Body": text.getvalue().encode(),
                                 "ContentType": "text/csv"})
    return f"s3://{bucket}/{prefix}{SUMMARY}"


def wait_transform_job(api: Api, name: str, args: argparse.Namespace) -> dict:
    job = scripting.wait_for(
        lambda: api.call("sagemaker", "DescribeTransformJob", {"TransformJobName": name}, mutates=False),
        lambda j: j["TransformJobStatus"], {"Completed", "Failed", "Stopped"}, args.poll_interval, args.timeout,
        scripting.log_status_changes("transform job", name, lambda d: d["TransformJobStatus"]))
    if job["TransformJobStatus"] != "Completed":
        raise JobFailed(f"transform job {name} {job['TransformJobStatus']}: "
                        f"{job.get('FailureReason') or 'no reason given'}")
    return job


def main(argv: list[str] | None = None) -> int:
    args = scripting.parse_args(build_parser(), argv)
    if args.local and args.no_wait:
        raise UserError("--local runs the job within this command (the SDK's local mode keeps no jobs between "
                        "commands): drop --no-wait")
    api = scripting.make_api(args)
    local = scripting.is_local(api)
    name = args.job_name or scripting.resource_name("imgclf-batch", suffix=scripting.timestamp())
    if local:
        input_uri = scripting.local_uri(args.input, "--input")
        nested = [p for p in local_path(input_uri).rglob("*") if p.is_file() and p.parent != local_path(input_uri)]
        if nested:  # SageMaker reads every object under the prefix; the SDK's local mode one folder level only
            log.warning("%d file(s) in subfolders of %s are not scored: the SDK's local mode reads only the files "
                        "directly in the folder", len(nested), args.input)
        output_uri = scripting.local_uri(args.output or f"{LOCAL_OUTPUT}/{name}", "--output", must_exist=False)
        local_path(output_uri).mkdir(parents=True, exist_ok=True)
        # Its own port: a local endpoint of deploy.py --local may hold the SDK's default 8080.
        config = dict(api.local.config or {})
        api.local.config = {**config, "local": {**config.get("local", {}), "serving_port": free_port()}}
    else:
        input_uri = args.input.rstrip("/") + "/"
        bucket, _ = s3sync.parse_s3_uri(input_uri)
        output_uri = args.output or f"s3://{bucket}/imgclf/batch/{name}"
        s3sync.parse_s3_uri(output_uri)
    spec = transform.TransformSpec(
        model_name="", input_uri=input_uri, output_uri=output_uri,
        instance_type=args.instance_type or ("local" if local else "ml.m5.large"), instance_count=args.instance_count,
        max_concurrent=args.max_concurrent, max_payload_mb=args.max_payload,
        invocation_timeout_s=args.invocation_timeout, invocation_retries=args.invocation_retries,
        volume_kms_key=args.volume_kms_key, output_kms_key=args.output_kms_key, local=local)
    spec.check()  # the flags alone: before the model is created
    spec.model_name = create_model(api, args, local)
    api.call("sagemaker", "CreateTransformJob", transform.transform_job_request(name, spec,
                                                                                scripting.tags_from(args.tag)))
    if args.dry_run:
        return EXIT_OK
    log.info("transform job %s created: %s -> %s", name, input_uri, output_uri)
    if args.no_wait:
        print(name)
        return EXIT_OK
    wait_transform_job(api, name, args)

    found = answers(api, output_uri)
    rows = [transform.summary_row(file, answer) for file, answer in sorted(found.items())]
    failed = sum(1 for row in rows if row[3])
    summary = write_summary(api, output_uri, rows)
    log.info("%d image(s) scored%s; summary: %s", len(rows) - failed, f", {failed} refused" if failed else "",
             summary)
    print(summary)
    return EXIT_OK


if __name__ == "__main__":
    scripting.run(main)
