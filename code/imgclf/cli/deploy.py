"""Deploy a trained model to a SageMaker endpoint: model -> endpoint config -> endpoint (create or update).

    imgclf-deploy --name dog-breeds --training-job imgclf-vgg16-20260101-120000 --role MySageMakerRole
    imgclf-deploy --name dog-breeds --model-data s3://.../model.tar.gz --instance-count 2 \\
        --autoscale-min 1 --autoscale-max 4 --autoscale-target 200
    imgclf-deploy --name dog-breeds --model-data s3://... --serverless-memory 4096
    imgclf-deploy --name dog-breeds-per-site --multi-model s3://bucket/models/   # a multi-model endpoint
    imgclf-deploy --name dog-breeds-async --model-data s3://... --async-output s3://bucket/async/ \
        --autoscale-min 0 --autoscale-max 2          # asynchronous inference, scaling to zero when idle
    imgclf-deploy --name dog-breeds --model-data s3://.../v2/model.tar.gz --canary 25 --canary-wait 600 \
        --rollback-alarm dog-breeds-5xx       # an update: a quarter of the fleet first, rolled back on the alarm
    imgclf-deploy --name dog-breeds --model-data s3://.../v1/model.tar.gz --shadow-model-data s3://.../v2/... \
        --shadow-percent 20                   # v2 answers a copy of 20% of the requests, unseen by callers
    imgclf-deploy --name dog-breeds --promote-shadow --linear 20 --linear-wait 300   # then v2 serves them
    imgclf-deploy --name dog-breeds --model-package arn:aws:sagemaker:...:model-package/dog-breeds/3  # approved
    imgclf-deploy --name dog-breeds --delete
    imgclf-deploy --local --name dog-breeds --model-data sagemaker-local/<job>/output/model.tar.gz

The endpoint keeps --name; the model and endpoint config are named <name>-<hash of their contents>
(or <name>-<timestamp> with --timestamp-names), so a re-run with the same inputs changes nothing and a
changed input updates the endpoint in place.

With --local, SageMaker's local mode (the SageMaker SDK's local client) runs the same requests on this machine's
serving image; such an endpoint lives in the deploy.py process: it serves on http://localhost:8080 until Ctrl-C
or SIGTERM, which deletes it.
"""

from __future__ import annotations

import argparse
import sys

from imgclf import instances
from imgclf.aws import endpoints, scripting
from imgclf.aws.images import image_tag_default
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_CODES_HELP

# Flags SageMaker's local mode has no use for (one container, no updates, no CloudWatch), what --promote-shadow
# reads besides the endpoint's own settings, and what --delete reads.
CLOUD_ONLY = {"model_package", "canary", "canary_wait", "linear", "linear_wait", "rollback_alarm", "shadow_model_data",
              "shadow_training_job", "shadow_percent", "promote_shadow"}
PROMOTE_FLAGS = {"name", "promote_shadow", "canary", "canary_wait", "linear", "linear_wait", "rollback_alarm",
                 "no_wait", "timeout", "poll_interval", "region", "profile", "endpoint_url", "dry_run", "verbose",
                 "role", "local"}
DELETE_FLAGS = {"name", "delete", "region", "profile", "endpoint_url", "dry_run", "verbose", "role", "local"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EXIT_CODES_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="endpoint name (letters, digits, hyphens), e.g. dog-breeds")
    parser.add_argument("--delete", action="store_true",
                        help="delete the endpoint, its autoscaling, and the configs and models deploy.py made for it")
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--model-data", metavar="S3URI", help="s3://.../model.tar.gz (train.py prints it)")
    source.add_argument("--training-job", metavar="JOB", help="take the model artifact of this training job")
    source.add_argument("--model-package", metavar="ARN",
                        help="an Approved version of the model registry (register_model.py prints its ARN); any "
                             "other status is refused")
    source.add_argument("--multi-model", metavar="S3PREFIX",
                        help="a multi-model endpoint (Mode MultiModel): the S3 prefix that holds the models' "
                             "model.tar.gz files, loaded on demand; predict.py --target-model a/model.tar.gz picks one")
    model.add_argument("--image", help="serving image URI (default: <account>.dkr.ecr.<region>.amazonaws.com/"
                                       "imgclf-serve:<tag>)")
    model.add_argument("--image-tag", default=image_tag_default(),
                       help="tag of the default image (default: this checkout's git sha, what `make push` pushed; "
                            "else latest); deploy.py resolves it to the image's digest")
    model.add_argument("--workers", type=int, help="model server workers per instance (SAGEMAKER_MODEL_SERVER_WORKERS)")
    model.add_argument("--top-k", type=int, help="default number of breeds per prediction (IMGCLF_TOP_K)")
    model.add_argument("--env", action="append", type=scripting.key_value, default=[], metavar="KEY=VALUE",
                       help="more container environment (repeat)")
    model.add_argument("--timestamp-names", action="store_true",
                       help="name the model and config <name>-<timestamp> instead of <name>-<content hash>")
    fleet = parser.add_argument_group("instances")
    fleet.add_argument("--instance-type", help="default ml.m5.large; with --local: local (the default) or local_gpu")
    fleet.add_argument("--instance-count", type=int, default=1)
    fleet.add_argument("--inference-ami-version", metavar="AMI",
                       help="the hosts' InferenceAmiVersion, i.e. their NVIDIA driver (default for GPU instance types: "
                            f"{instances.SERVE_GPU_AMI}, R580, which the serve-gpu image's CUDA 13.0 needs)")
    fleet.add_argument("--serverless-memory", type=int, metavar="MB",
                       help="serverless endpoint with this memory (1024-6144, steps of 1024) instead of instances")
    fleet.add_argument("--serverless-concurrency", type=int, default=5, help="serverless: max concurrent requests")
    asyn = parser.add_argument_group("asynchronous inference (predict.py --async)")
    asyn.add_argument("--async-output", metavar="S3URI", help="an asynchronous endpoint: requests queue (up to 1 GB "
                      "each, up to an hour), answers land under this S3 prefix")
    asyn.add_argument("--async-failure", metavar="S3URI", help="where failed requests' errors land (S3 prefix)")
    asyn.add_argument("--async-max-concurrency", type=int, metavar="N",
                      help="requests each instance takes at once (default: SageMaker's)")
    fleet.add_argument("--data-capture", metavar="S3URI", help="capture requests and responses to this S3 prefix")
    fleet.add_argument("--data-capture-percent", type=int, default=100, help="sampling percentage (default 100)")
    security = parser.add_argument_group("security")
    security.add_argument("--kms-key", metavar="KEY", help="KMS key (ID or ARN) for the instances' storage volumes")
    security.add_argument("--network-isolation", action="store_true",
                          help="the model container gets no network access (EnableNetworkIsolation)")
    scaling = parser.add_argument_group("autoscaling (target tracking on InvocationsPerInstance)")
    scaling.add_argument("--autoscale-min", type=int, metavar="N",
                         help="fewest instances (default 1; 0 for an asynchronous endpoint: it scales to zero when "
                              "idle, and out again on the first queued request)")
    scaling.add_argument("--autoscale-max", type=int, metavar="N", help="most instances (turns autoscaling on)")
    scaling.add_argument("--autoscale-target", type=float, metavar="N",
                         help="invocations per instance per minute to aim for (default 100); for an asynchronous "
                              "endpoint, queued requests per instance (ApproximateBacklogSizePerInstance, default 5)")
    rollout = parser.add_argument_group(
        "safe rollout: how an update moves the traffic to the new model (SageMaker's deployment guardrails; "
        "docs/aws.md#rolling-out-a-new-model-safely)")
    steps = rollout.add_mutually_exclusive_group()
    steps.add_argument("--canary", type=int, metavar="PERCENT",
                       help="first this share of the new fleet's capacity (1-50) takes traffic, the rest after "
                            "--canary-wait")
    rollout.add_argument("--canary-wait", type=int, metavar="SECONDS",
                         help=f"how long the canary, then the whole new fleet, bakes (0-3600, default "
                              f"{endpoints.STEP_WAIT})")
    steps.add_argument("--linear", type=int, metavar="PERCENT",
                       help="move the traffic in steps of this share of the capacity (10-50), each baked --linear-wait")
    rollout.add_argument("--linear-wait", type=int, metavar="SECONDS",
                         help=f"how long each step bakes (0-3600, default {endpoints.STEP_WAIT})")
    rollout.add_argument("--rollback-alarm", action="append", default=[], metavar="NAME",
                         help="a CloudWatch alarm that sends all traffic back to the old fleet if it goes off while "
                              "the update bakes (repeat, up to 10); deploy.py then exits 1 naming it")
    shadow = parser.add_argument_group("shadow variant: a second model answers a copy of the requests; only its "
                                       "metrics and data capture see the answers")
    shadow_source = shadow.add_mutually_exclusive_group()
    shadow_source.add_argument("--shadow-model-data", metavar="S3URI", help="the shadow's s3://.../model.tar.gz")
    shadow_source.add_argument("--shadow-training-job", metavar="JOB", help="the shadow: this training job's model")
    shadow.add_argument("--shadow-percent", type=int, default=endpoints.Shadow.shadow_percent, metavar="PERCENT",
                        help="share of the requests copied to the shadow (1-100, default 100)")
    shadow.add_argument("--promote-shadow", action="store_true",
                        help="make the endpoint's shadow model its production model, without shadow (an update: "
                             "--canary or --linear apply)")
    parser.add_argument("--tag", action="append", type=scripting.key_value, default=[], metavar="KEY=VALUE")
    scripting.add_wait_args(parser, "endpoint")
    scripting.add_common_args(parser, role=True)
    scripting.add_local_arg(parser, "the endpoint's container")
    parser.set_defaults(poll_interval=30.0)
    return parser


@scripting.program
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    flags = vars(args)
    if args.local and (cloud_only := scripting.given(parser, args, CLOUD_ONLY)):
        raise UserError(f"{', '.join(cloud_only)}: not in SageMaker's local mode (one container per endpoint, no "
                        "updates to roll out, no shadow variants); drop them, or deploy on AWS")
    if args.delete:
        if unused := scripting.given(parser, args, set(flags) - DELETE_FLAGS):
            raise UserError(f"{', '.join(unused)}: --delete deletes the endpoint and what deploy.py made for it; "
                            "drop them")
        return endpoints.delete(scripting.Access.from_flags(flags), args.name)
    if args.promote_shadow:
        if unused := scripting.given(parser, args, set(flags) - PROMOTE_FLAGS):
            raise UserError(f"{', '.join(unused)}: --promote-shadow keeps the endpoint's settings and takes the model "
                            "of its shadow variant; drop them")
        return endpoints.promote_shadow(scripting.Access.from_flags(flags), args.name,
                                        endpoints.Rollout.from_flags(flags), scripting.Waiting.from_flags(flags))
    return endpoints.deploy(
        scripting.Access.from_flags(flags), name=args.name, model=endpoints.ModelSource.from_flags(flags),
        instance_type=args.instance_type, instance_count=args.instance_count,
        serverless_memory=args.serverless_memory, serverless_concurrency=args.serverless_concurrency,
        data_capture=args.data_capture, data_capture_percent=args.data_capture_percent, kms_key=args.kms_key,
        network_isolation=args.network_isolation,
        autoscaling=endpoints.Autoscaling(args.autoscale_min, args.autoscale_max, args.autoscale_target),
        tags=args.tag, timestamp_names=args.timestamp_names, waiting=scripting.Waiting.from_flags(flags),
        async_output=args.async_output, async_failure=args.async_failure,
        async_max_concurrency=args.async_max_concurrency, rollout=endpoints.Rollout.from_flags(flags),
        shadow=endpoints.Shadow.from_flags(flags), inference_ami=args.inference_ami_version)


if __name__ == "__main__":
    sys.exit(main())
