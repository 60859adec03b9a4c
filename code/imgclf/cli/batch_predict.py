"""Score every image under an S3 prefix with a SageMaker batch transform job; write a CSV summary next to it.

    imgclf-batch-predict --input s3://my-bucket/photos --model-data s3://.../model.tar.gz --role ROLE
    imgclf-batch-predict --input s3://my-bucket/photos --training-job imgclf-vgg16-20260101-120000
    imgclf-batch-predict --local --input photos --model-data sagemaker-local/<job>/output/model.tar.gz

The serving image answers each image as an endpoint does (one image per request: SplitType None, BatchStrategy
SingleRecord). SageMaker writes one JSON answer per image, <output>/<image path>.out; then this script reads
them and writes <output>/summary.csv (file, class_name, probability, error: the top-1 class of each image) and
prints its location. Default output: s3://<input bucket>/imgclf/batch/<job> (with --local: sagemaker-local/batch/
<job>). Batch transform has no spot instances; a VPC is the model's setting.
"""

from __future__ import annotations

import argparse
import sys

from imgclf.aws import endpoints, scripting, transform
from imgclf.aws.images import image_tag_default
from imgclf.exit_codes import EXIT_CODES_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, metavar="S3URI",
                        help="prefix holding the images (every object under it is scored); with --local: a folder")
    parser.add_argument("--output", metavar="S3URI", help=f"where the answers and {transform.SUMMARY} go (default: "
                        f"s3://<input bucket>/imgclf/batch/<job>; with --local: {transform.LOCAL_OUTPUT}/<job>)")
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


@scripting.program
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = vars(args)
    return transform.batch_predict(
        scripting.Access.from_flags(flags), input_location=args.input, model=endpoints.ModelSource.from_flags(flags),
        output_location=args.output, job_name=args.job_name, instance_type=args.instance_type,
        instance_count=args.instance_count, max_concurrent=args.max_concurrent, max_payload_mb=args.max_payload,
        invocation_timeout_s=args.invocation_timeout, invocation_retries=args.invocation_retries,
        volume_kms_key=args.volume_kms_key, output_kms_key=args.output_kms_key, tags=args.tag,
        waiting=scripting.Waiting.from_flags(flags))


if __name__ == "__main__":
    sys.exit(main())
