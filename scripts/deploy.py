#!/usr/bin/env python3
"""Deploy a trained model to a SageMaker endpoint: model -> endpoint config -> endpoint (create or update).

    python scripts/deploy.py --name dog-breeds --training-job imgclf-vgg16-20260101-120000 --role MySageMakerRole
    python scripts/deploy.py --name dog-breeds --model-data s3://.../model.tar.gz --instance-count 2 \\
        --autoscale-min 1 --autoscale-max 4 --autoscale-target 200
    python scripts/deploy.py --name dog-breeds --model-data s3://... --serverless-memory 4096
    python scripts/deploy.py --name dog-breeds --delete
    python scripts/deploy.py --local --name dog-breeds --model-data sagemaker-local/<job>/output/model.tar.gz

The endpoint keeps --name; the model and endpoint config are named <name>-<hash of their contents>
(or <name>-<timestamp> with --timestamp-names), so a re-run with the same inputs changes nothing and a
changed input updates the endpoint in place.

With --local, SageMaker's local mode (the SageMaker SDK's local client) runs the same requests on this machine's
serving image; such an endpoint lives in the deploy.py process: it serves on http://localhost:8080 until Ctrl-C
or SIGTERM, which deletes it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import sys
import time

from imgclf.aws import endpoints, scripting
from imgclf.aws.images import image_tag_default
from imgclf.aws.session import Api, AwsError
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_CODES_HELP, EXIT_OK, JobFailed

log = logging.getLogger("deploy")
BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting", "UpdateRollbackFailed")


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
    fleet.add_argument("--serverless-memory", type=int, metavar="MB",
                       help="serverless endpoint with this memory (1024-6144, steps of 1024) instead of instances")
    fleet.add_argument("--serverless-concurrency", type=int, default=5, help="serverless: max concurrent requests")
    fleet.add_argument("--data-capture", metavar="S3URI", help="capture requests and responses to this S3 prefix")
    fleet.add_argument("--data-capture-percent", type=int, default=100, help="sampling percentage (default 100)")
    security = parser.add_argument_group("security")
    security.add_argument("--kms-key", metavar="KEY", help="KMS key (ID or ARN) for the instances' storage volumes")
    security.add_argument("--network-isolation", action="store_true",
                          help="the model container gets no network access (EnableNetworkIsolation)")
    scaling = parser.add_argument_group("autoscaling (target tracking on InvocationsPerInstance)")
    scaling.add_argument("--autoscale-min", type=int, metavar="N", help="fewest instances")
    scaling.add_argument("--autoscale-max", type=int, metavar="N", help="most instances (turns autoscaling on)")
    scaling.add_argument("--autoscale-target", type=float, default=100.0, metavar="REQUESTS",
                         help="invocations per instance per minute to aim for (default 100)")
    parser.add_argument("--tag", action="append", type=scripting.key_value, default=[], metavar="KEY=VALUE")
    scripting.add_wait_args(parser, "endpoint")
    scripting.add_common_args(parser, role=True)
    scripting.add_local_arg(parser, "the endpoint's container")
    parser.set_defaults(poll_interval=30.0)
    return parser


def model_data_of(api: Api, args: argparse.Namespace) -> str:
    if args.model_data:
        return scripting.local_uri(args.model_data, "--model-data") if scripting.is_local(api) else args.model_data
    if not args.training_job:
        raise UserError("no model: pass --model-data s3://.../model.tar.gz or --training-job NAME")
    job = scripting.describe_or_none(api, "sagemaker", "DescribeTrainingJob", {"TrainingJobName": args.training_job})
    if job is None:
        if scripting.is_offline(api):
            return f"s3://<output of {args.training_job}>/model.tar.gz"
        if scripting.is_local(api):
            raise UserError(f"training job {args.training_job}: the SDK's local mode keeps a job only in the "
                            "train.py --local that ran it; pass --model-data with the path that command printed")
        raise AwsError(f"training job {args.training_job} not found in {scripting.region_of(api, args)}")
    if job["TrainingJobStatus"] != "Completed":
        raise UserError(f"training job {args.training_job} is {job['TrainingJobStatus']}: deploy a Completed one")
    return job["ModelArtifacts"]["S3ModelArtifacts"]


def current_scaling(api: Api, endpoint: str) -> tuple[dict, dict] | None:
    """(scalable target, target-tracking config) registered for the endpoint, or None."""
    if scripting.is_offline(api):
        return None
    resource = endpoints.scaling_resource_id(endpoint)
    targets = api.call("application-autoscaling", "DescribeScalableTargets", {
        "ServiceNamespace": "sagemaker", "ResourceIds": [resource],
        "ScalableDimension": endpoints.SCALABLE_DIMENSION}, mutates=False).get("ScalableTargets", [])
    if not targets:
        return None
    policies = api.call("application-autoscaling", "DescribeScalingPolicies", {
        "ServiceNamespace": "sagemaker", "ResourceId": resource,
        "PolicyNames": [endpoints.scaling_policy_name(endpoint)]}, mutates=False).get("ScalingPolicies", [])
    return targets[0], (policies[0].get("TargetTrackingScalingPolicyConfiguration", {}) if policies else {})


def apply_scaling(api: Api, endpoint: str, min_n: int, max_n: int, target: float) -> None:
    api.call("application-autoscaling", "RegisterScalableTarget",
             endpoints.register_scalable_target_request(endpoint, min_n, max_n))
    api.call("application-autoscaling", "PutScalingPolicy", endpoints.scaling_policy_request(endpoint, target))
    log.info("autoscaling %s: %d-%d instances, target %g invocations/instance/minute", endpoint, min_n, max_n, target)


def wait_in_service(api: Api, name: str, config_name: str, args: argparse.Namespace) -> None:
    ep = scripting.wait_for(
        lambda: api.call("sagemaker", "DescribeEndpoint", {"EndpointName": name}, mutates=False),
        lambda e: e["EndpointStatus"], {"InService", "Failed", "OutOfService", "UpdateRollbackFailed"},
        args.poll_interval, args.timeout,
        scripting.log_status_changes("endpoint", name, lambda d: d["EndpointStatus"]))
    if ep["EndpointStatus"] != "InService":
        raise JobFailed(f"endpoint {name} {ep['EndpointStatus']}: {ep.get('FailureReason') or 'no reason given'}")
    if ep["EndpointConfigName"] != config_name:
        raise JobFailed(f"endpoint {name} rolled back to {ep['EndpointConfigName']}: "
                            f"{ep.get('FailureReason') or 'the new config did not become healthy'}")


def serve_locally(api: Api, args: argparse.Namespace, model_name: str, config_name: str) -> int:
    """SageMaker's local mode keeps an endpoint in the process that created it (the SDK's LocalSagemakerClient,
    with docker-compose attached to the container): create it, serve until Ctrl-C or SIGTERM, then delete the
    endpoint, its config and model, as `--delete` does on AWS (also when it never became healthy)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    port = ((api.local.config or {}).get("local") or {}).get("serving_port", 8080)
    out = sys.stdout
    # The SDK's hosting thread prints docker-compose's output on stdout for as long as the endpoint lives; stdout
    # carries only the endpoint's name.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            api.call("sagemaker", "CreateEndpoint", endpoints.endpoint_request(args.name, config_name,
                                                                               scripting.tags_from(args.tag)))
            wait_in_service(api, args.name, config_name, args)
            print(args.name, file=out, flush=True)
            log.info("local endpoint %s InService on http://localhost:%s (predict.py --local --endpoint %s); Ctrl-C "
                     "or SIGTERM deletes it", args.name, port, args.name)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("deleting local endpoint %s", args.name)
        finally:
            for service, operation, request in endpoints.delete_requests(args.name, [config_name], [model_name],
                                                                         False):
                api.call(service, operation, request)
    return EXIT_OK


def scaling_values(scaling: tuple[dict, dict] | None, default_target: float) -> tuple[int, int, float] | None:
    """(min, max, target) of what current_scaling found, or None."""
    if not scaling:
        return None
    target, policy = scaling
    return target["MinCapacity"], target["MaxCapacity"], policy.get("TargetValue", default_target)


def restore_scaling(api: Api, args: argparse.Namespace, wanted: tuple[int, int, float]) -> None:
    """Register autoscaling again after an update that needed it lifted, however the update ended."""
    try:
        apply_scaling(api, args.name, *wanted)
    except AwsError as e:  # e.g. the endpoint is still Updating after --timeout: say how to restore it
        min_n, max_n, target = wanted
        log.error("autoscaling of %s is NOT registered (%s): once the endpoint is InService, run deploy.py again "
                  "with the same flags and --autoscale-min %d --autoscale-max %d --autoscale-target %g",
                  args.name, e, min_n, max_n, target)


def deploy(api: Api, args: argparse.Namespace) -> int:
    local = scripting.is_local(api)
    if local:
        unsupported = [flag for flag, value in (
            ("--serverless-memory", args.serverless_memory), ("--data-capture", args.data_capture),
            ("--autoscale-min", args.autoscale_min), ("--autoscale-max", args.autoscale_max),
            ("--no-wait", args.no_wait)) if value]
        if unsupported:
            raise UserError(f"{', '.join(unsupported)}: not in SageMaker's local mode (one container per endpoint, "
                            "alive while deploy.py --local runs); drop them, or deploy on AWS")
    if args.serverless_memory and (args.autoscale_max or args.autoscale_min):
        raise UserError("autoscaling is for instance endpoints: serverless endpoints scale by themselves")
    if args.autoscale_min and not args.autoscale_max:
        raise UserError("--autoscale-min needs --autoscale-max")
    if args.autoscale_max:  # check the autoscaling flags before anything is created
        endpoints.register_scalable_target_request(args.name, args.autoscale_min or 1, args.autoscale_max)
        endpoints.scaling_policy_request(args.name, args.autoscale_target)
    env = {k: str(v) for k, v in (("SAGEMAKER_MODEL_SERVER_WORKERS", args.workers), ("IMGCLF_TOP_K", args.top_k))
           if v is not None}
    env.update(dict(args.env))
    spec = endpoints.ServingSpec(
        name=args.name, image=args.image or "<image>",
        model_data=args.model_data if args.model_data and not local else "s3://x/model.tar.gz",
        role_arn="", environment=env, instance_type=args.instance_type or ("local" if local else "ml.m5.large"),
        instance_count=args.instance_count,
        serverless_memory_mb=args.serverless_memory, serverless_concurrency=args.serverless_concurrency,
        data_capture_uri=args.data_capture, data_capture_percent=args.data_capture_percent,
        kms_key=args.kms_key, network_isolation=args.network_isolation, tags=scripting.tags_from(args.tag),
        suffix=scripting.timestamp() if args.timestamp_names else None, local=local)
    spec.check()  # the flags alone: before any AWS call
    spec.model_data = model_data_of(api, args)
    spec.role_arn = scripting.role_arn(api, args.role)
    spec.image = scripting.serving_image(api, args)
    spec.check()
    model = spec.model_request()
    config = spec.endpoint_config_request(model["ModelName"])
    config_name = config["EndpointConfigName"]

    # Everything SageMaker would refuse, and everything autoscaling needs, is decided before anything changes.
    endpoint = scripting.describe_or_none(api, "sagemaker", "DescribeEndpoint", {"EndpointName": args.name})
    changes = endpoint is None or endpoint["EndpointConfigName"] != config_name
    scaling = current_scaling(api, args.name) if endpoint else None
    lift = False  # whether autoscaling must be deregistered for the update
    if endpoint is not None and changes:
        if endpoint["EndpointStatus"] in BUSY:
            raise AwsError(f"endpoint {args.name} is {endpoint['EndpointStatus']}: wait until it is InService, then "
                           "deploy again")
        if endpoint["EndpointStatus"] == "Failed":
            raise AwsError(f"endpoint {args.name} is Failed ({endpoint.get('FailureReason', 'no reason given')}): "
                           f"delete it with `deploy.py --name {args.name} --delete`, then deploy again")
        current = api.call("sagemaker", "DescribeEndpointConfig",
                           {"EndpointConfigName": endpoint["EndpointConfigName"]}, mutates=False)
        if endpoints.is_serverless(current) != endpoints.is_serverless(config):
            kinds = ("serverless", "instance") if endpoints.is_serverless(current) else ("instance", "serverless")
            raise UserError(f"endpoint {args.name} is a {kinds[0]} endpoint and SageMaker cannot update it to a "
                            f"{kinds[1]} one: deploy under another --name, or delete it first (`deploy.py --name "
                            f"{args.name} --delete`)")
        # SageMaker refuses an update that changes an autoscaled variant's instance type; a new model is allowed.
        lift = scaling is not None and endpoints.instance_type_of(current) != endpoints.instance_type_of(config)
    registered = scaling_values(scaling, args.autoscale_target)
    # After the deploy: the flags' autoscaling, else what was registered before.
    wanted = (args.autoscale_min or 1, args.autoscale_max, args.autoscale_target) if args.autoscale_max else registered
    if args.no_wait and changes and (lift or args.autoscale_max):
        raise UserError(f"autoscaling of {args.name} can only be registered once the endpoint is InService, and "
                        "--no-wait would leave it without: drop --no-wait (or deploy without --autoscale-* now and "
                        "run deploy.py with them again once it is InService)")

    if scripting.describe_or_none(api, "sagemaker", "DescribeModel", {"ModelName": model["ModelName"]}):
        log.info("model %s exists (same image, artifact and environment)", model["ModelName"])
    else:
        api.call("sagemaker", "CreateModel", model)
    if scripting.describe_or_none(api, "sagemaker", "DescribeEndpointConfig", {"EndpointConfigName": config_name}):
        log.info("endpoint config %s exists", config_name)
    else:
        api.call("sagemaker", "CreateEndpointConfig", config)

    if endpoint is None:
        if local:
            return serve_locally(api, args, model["ModelName"], config_name)
        api.call("sagemaker", "CreateEndpoint", endpoints.endpoint_request(args.name, config_name, spec.tags))
    elif not changes:
        log.info("endpoint %s already uses %s: nothing to update", args.name, config_name)
    else:
        if lift:
            for service, operation, request in endpoints.deregister_scaling_requests(args.name):
                api.call(service, operation, request)
        try:
            # Autoscaled: keep the instance count autoscaling chose rather than the config's initial count.
            api.call("sagemaker", "UpdateEndpoint",
                     endpoints.update_endpoint_request(args.name, config_name, keep_instance_count=bool(scaling)))
            log.info("endpoint %s: updating from %s to %s (the old fleet serves until the new one is healthy)",
                     args.name, endpoint["EndpointConfigName"], config_name)
            if not (args.dry_run or args.no_wait):
                wait_in_service(api, args.name, config_name, args)
        except BaseException:  # failed call, timeout, rollback, interrupt: never leave it without autoscaling
            if lift:
                restore_scaling(api, args, registered)  # what it had: a rollback brings the old instances back
            raise
    if args.dry_run:
        if lift and wanted:
            apply_scaling(api, args.name, *wanted)
        return EXIT_OK
    if endpoint is None and not args.no_wait:
        wait_in_service(api, args.name, config_name, args)
    if wanted and (lift or args.autoscale_max):  # --no-wait gets here only when nothing changed (checked above)
        apply_scaling(api, args.name, *wanted)
    print(args.name)
    return EXIT_OK


def _ours(name: str, endpoint: str) -> bool:
    """Names deploy.py gives: <endpoint>-<8 hex> or <endpoint>-<YYYYmmdd-HHMMSS>."""
    return re.fullmatch(re.escape(endpoint) + r"-(?:[0-9a-f]{8}|\d{8}-\d{6})", name) is not None


def _list_names(api: Api, operation: str, key: str, name_key: str, contains: str) -> list[str]:
    names, token = [], None
    while True:
        request = {"NameContains": contains, **({"NextToken": token} if token else {})}
        page = api.call("sagemaker", operation, request, mutates=False)
        names += [item[name_key] for item in page.get(key, [])]
        token = page.get("NextToken")
        if not token:
            return names


def delete(api: Api, args: argparse.Namespace) -> int:
    if scripting.is_local(api):
        raise UserError(f"a local endpoint lives in the deploy.py --local process that created it: stop that "
                        f"process (Ctrl-C or SIGTERM) to delete {args.name}")
    configs: list[str] = []
    models: list[str] = []
    if not scripting.is_offline(api):
        endpoint = scripting.describe_or_none(api, "sagemaker", "DescribeEndpoint", {"EndpointName": args.name})
        if endpoint is None:
            raise AwsError(f"endpoint {args.name} not found in {scripting.region_of(api, args)}: nothing to delete "
                           "(list endpoints with `aws sagemaker list-endpoints`)")
        # The current config and its models, and those earlier deploys left behind (names deploy.py gives).
        current = endpoint["EndpointConfigName"]
        config = api.call("sagemaker", "DescribeEndpointConfig", {"EndpointConfigName": current}, mutates=False)
        configs = [current] + [c for c in _list_names(api, "ListEndpointConfigs", "EndpointConfigs",
                                                      "EndpointConfigName", args.name)
                               if _ours(c, args.name) and c != current]
        models = [v["ModelName"] for v in config.get("ProductionVariants", [])]
        models += [m for m in _list_names(api, "ListModels", "Models", "ModelName", args.name)
                   if _ours(m, args.name) and m not in models]
    scaling = current_scaling(api, args.name) is not None
    for service, operation, request in endpoints.delete_requests(args.name, configs, models, scaling):
        api.call(service, operation, request)
        if not args.dry_run:
            log.info("%s %s", operation, request.get("ResourceId") or next(iter(request.values())))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = scripting.parse_args(build_parser(), argv)
    api = scripting.make_api(args)
    return delete(api, args) if args.delete else deploy(api, args)


if __name__ == "__main__":
    scripting.run(main)
