"""Serving: model -> endpoint config -> endpoint, autoscaling, and deletion; the request builders, then `deploy`
and `delete` (scripts/deploy.py), which send them.

Model and endpoint-config names end in a hash of what they contain, so deploying the same artifact with the
same settings twice reuses them, and any change gives new names: the endpoint then moves to the new
config with UpdateEndpoint (SageMaker's blue/green: the old fleet serves until the new one is healthy; with a
Rollout, the traffic moves in baked steps that CloudWatch alarms can roll back).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from imgclf import instances
from imgclf.aws import registry, scripting
from imgclf.aws.images import DEFAULT_TAG, LOCAL_INSTANCE_TYPES, REPOSITORIES
from imgclf.aws.scripting import Access, Waiting, resource_name
from imgclf.aws.session import Api, AwsError
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_OK, JobFailed
from imgclf.flags import FlagGroup
from imgclf.serving.settings import VARIABLES, ServingSettings, SettingsError

log = logging.getLogger("imgclf.aws")

VARIANT = "AllTraffic"
SHADOW_VARIANT = "Shadow"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)
MULTI_MODEL_ENV = "SAGEMAKER_MULTI_MODEL"  # what makes `serve` a multi-model endpoint (imgclf.serving.multi_model)
PAYLOAD_ENV, ASYNC_PAYLOAD_MB = "SAGEMAKER_MAX_PAYLOAD_IN_MB", 100  # the container's request limit; async's default
# Deployment guardrails (UpdateEndpoint's DeploymentConfig): SageMaker's limits, and what deploy.py assumes.
CANARY_PERCENT, LINEAR_PERCENT = (1, 50), (10, 50)  # a canary is at most half the fleet; linear steps 10-50% of it
STEP_WAIT, MAX_STEP_WAIT = 300, 3600  # seconds each step bakes (WaitIntervalInSeconds: 0-3600)
MAX_ROLLOUT = 28800  # MaximumExecutionTimeoutInSeconds' ceiling
PROVISIONING = 3600  # what starting the new fleet may take, on top of the baking
MAX_ALARMS = 10


def content_hash(*parts: object, length: int = 8) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass
class ServingSpec:
    name: str  # the endpoint's name; the model and config names derive from it
    image: str
    model_data: str  # s3://.../model.tar.gz
    role_arn: str
    environment: dict[str, str] = field(default_factory=dict)
    instance_type: str | None = "ml.m5.large"
    instance_count: int = 1
    serverless_memory_mb: int | None = None
    serverless_concurrency: int = 5
    data_capture_uri: str | None = None
    data_capture_percent: int = 100
    kms_key: str | None = None  # encrypts the instances' ML storage volume
    network_isolation: bool = False  # the container gets no network access
    tags: list[dict[str, str]] = field(default_factory=list)  # not part of the names' hash: tags change nothing served
    suffix: str | None = None  # e.g. a timestamp; default: a hash of the contents
    local: bool = False  # SageMaker's local mode: a file:// model, instance type local or local_gpu
    multi_model: bool = False  # model_data is the S3 prefix of a multi-model endpoint's models
    async_output: str | None = None  # asynchronous inference: answers land here (S3 prefix)
    async_failure: str | None = None  # and failures here
    async_max_concurrency: int | None = None  # requests a container takes at once (SageMaker's default: its own)
    shadow_model_data: str | None = None  # a shadow variant's model (same image and instances): s3://.../model.tar.gz
    shadow_percent: int = 100  # the share of the requests SageMaker copies to the shadow
    model_package: str | None = None  # a registry's version (ARN): it names the image and model_data itself
    inference_ami: str | None = None  # the hosts' InferenceAmiVersion (their NVIDIA driver); GPU types get one

    def check(self) -> None:
        problems = []
        if resource_name(self.name) != self.name or len(self.name) > 50:
            problems.append(f"endpoint name {self.name!r}: use letters, digits and single hyphens, at most 50 "
                            "characters (e.g. dog-breeds)")
        schemes = ("s3://", "file://") if self.local else ("s3://",)
        if self.multi_model:
            problems += multi_model_problems(self)
        elif not (self.model_data.startswith(schemes) and self.model_data.endswith(".tar.gz")):
            problems.append(f"model data {self.model_data!r}: expected s3://.../model.tar.gz (train.py prints it)")
        if self.async_output or self.async_failure or self.async_max_concurrency:
            problems += async_problems(self)
        if self.shadow_model_data is not None:
            problems += shadow_problems(self)
        if self.serverless_memory_mb is not None:
            if self.serverless_memory_mb not in SERVERLESS_MEMORY_MB:
                problems.append(f"serverless memory {self.serverless_memory_mb} MB: choose one of "
                                + ", ".join(map(str, SERVERLESS_MEMORY_MB)))
            if not 1 <= self.serverless_concurrency <= 200:
                problems.append(f"serverless concurrency {self.serverless_concurrency}: must be 1-200")
            # SageMaker Serverless Inference supports neither data capture nor a volume KMS key (it has no volume).
            if self.data_capture_uri is not None:
                problems.append("data capture is not available on serverless endpoints: drop --data-capture, or "
                                "deploy to instances (--instance-type) instead of --serverless-memory")
            if self.kms_key:
                problems.append("--kms-key encrypts instance storage volumes, which serverless endpoints do not "
                                "have: drop --kms-key or --serverless-memory")
        elif self.local:
            if self.instance_type not in LOCAL_INSTANCE_TYPES:
                problems.append(f"instance type {self.instance_type!r}: local mode takes "
                                + " or ".join(LOCAL_INSTANCE_TYPES))
        else:
            if not (self.instance_type or "").startswith("ml."):
                problems.append(f"instance type {self.instance_type!r}: SageMaker types start with ml. (ml.m5.large)")
            if self.instance_count < 1:
                problems.append(f"instance count {self.instance_count}: must be at least 1")
        if self.data_capture_uri is not None:
            if not self.data_capture_uri.startswith("s3://"):
                problems.append(f"data capture destination {self.data_capture_uri!r} is not an s3:// URI")
            if not 0 <= self.data_capture_percent <= 100:
                problems.append(f"data capture sampling {self.data_capture_percent}%: must be 0-100")
        elif self.data_capture_percent != ServingSpec.data_capture_percent:
            problems.append("--data-capture-percent goes with --data-capture S3URI")
        if problems:
            raise UserError("; ".join(problems))

    def model_request(self) -> dict:
        environment = {**self.environment, **({MULTI_MODEL_ENV: "true"} if self.multi_model else {})}
        if self.async_output:  # queued requests may be large photos (up to 1 GB): the container's limit, raised
            environment.setdefault(PAYLOAD_ENV, str(ASYNC_PAYLOAD_MB))
        container: dict = ({"ModelPackageName": self.model_package} if self.model_package
                           else {"Image": self.image, "ModelDataUrl": self.model_data})
        container["Environment"] = environment
        if self.multi_model:  # SageMaker loads the models under the prefix on demand (TargetModel)
            container["Mode"] = "MultiModel"
        # Isolation changes the name; without it, names stay what earlier versions gave (no needless update).
        hashed: tuple = (container, self.role_arn) + ((True,) if self.network_isolation else ())
        name = resource_name(self.name, suffix=self.suffix or content_hash(*hashed))
        request: dict = {"ModelName": name, "ExecutionRoleArn": self.role_arn, "PrimaryContainer": container}
        if self.network_isolation:
            request["EnableNetworkIsolation"] = True
        if self.tags:
            request["Tags"] = list(self.tags)
        return request

    def shadow_model_request(self) -> dict:
        """The shadow variant's model: this one with the shadow's artifact. Always named by its content hash, so that
        it differs from the production model under --timestamp-names too."""
        return replace(self, model_data=self.shadow_model_data or "", model_package=None, suffix=None).model_request()

    def endpoint_config_request(self, model_name: str, shadow_model_name: str | None = None) -> dict:
        variant: dict = {"VariantName": VARIANT, "ModelName": model_name}
        if self.serverless_memory_mb is not None:
            variant["ServerlessConfig"] = {"MemorySizeInMB": self.serverless_memory_mb,
                                           "MaxConcurrency": self.serverless_concurrency}
        else:
            variant.update({"InstanceType": self.instance_type, "InitialInstanceCount": self.instance_count,
                            "InitialVariantWeight": 1.0})
            if self.inference_ami:
                variant["InferenceAmiVersion"] = self.inference_ami
        request: dict = {"ProductionVariants": [variant]}
        if shadow_model_name:  # SageMaker copies to a shadow the share of requests its weight is of production's (1.0)
            request["ShadowProductionVariants"] = [{
                **variant, "VariantName": SHADOW_VARIANT, "ModelName": shadow_model_name,
                "InitialVariantWeight": self.shadow_percent / 100}]
        if self.async_output:  # InvokeEndpointAsync: requests queue, answers land in S3
            output = {"S3OutputPath": self.async_output, **({"S3FailurePath": self.async_failure}
                                                              if self.async_failure else {})}
            request["AsyncInferenceConfig"] = {"OutputConfig": output, **(
                {"ClientConfig": {"MaxConcurrentInvocationsPerInstance": self.async_max_concurrency}}
                if self.async_max_concurrency else {})}
        if self.data_capture_uri:
            request["DataCaptureConfig"] = {
                "EnableCapture": True, "InitialSamplingPercentage": self.data_capture_percent,
                "DestinationS3Uri": self.data_capture_uri,
                "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
                "CaptureContentTypeHeader": {"JsonContentTypes": ["application/json"]},
            }
        if self.kms_key:
            request["KmsKeyId"] = self.kms_key
        name = resource_name(self.name, suffix=self.suffix or content_hash(request))
        return {"EndpointConfigName": name, **request, **({"Tags": list(self.tags)} if self.tags else {})}


def multi_model_problems(spec: ServingSpec) -> list[str]:
    """What SageMaker's multi-model endpoints do not take (CPU instances, an S3 prefix of model.tar.gz files)."""
    problems = []
    if not (spec.model_data.startswith("s3://") and spec.model_data.endswith("/")):
        problems.append(f"--multi-model {spec.model_data!r}: give the S3 prefix that holds the models, ending in / "
                        "(s3://bucket/models/; predict.py --target-model names one, e.g. a/model.tar.gz)")
    if spec.serverless_memory_mb is not None:
        problems.append("serverless endpoints cannot host multiple models: drop --serverless-memory")
    if spec.instance_type and instances.has_nvidia_gpus(spec.instance_type):
        problems.append(f"{spec.instance_type}: SageMaker runs multi-model endpoints on GPU instances only with "
                        "its Triton container; use a CPU instance type (ml.m5, ml.c5, ...)")
    return problems


def async_problems(spec: ServingSpec) -> list[str]:
    """What asynchronous inference does not take."""
    problems = []
    if not spec.async_output:
        problems.append("--async-failure and --async-max-concurrency go with --async-output s3://.../")
    for flag, uri in (("--async-output", spec.async_output), ("--async-failure", spec.async_failure)):
        if uri and not uri.startswith("s3://"):
            problems.append(f"{flag} {uri!r} is not an s3:// URI")
    if spec.async_max_concurrency is not None and not 1 <= spec.async_max_concurrency <= 1000:
        problems.append(f"--async-max-concurrency {spec.async_max_concurrency}: must be 1-1000")
    if spec.serverless_memory_mb is not None:
        problems.append("asynchronous inference runs on instances: drop --serverless-memory")
    if spec.multi_model:
        problems.append("asynchronous inference hosts one model: drop --multi-model or the --async-* flags")
    return problems


def shadow_problems(spec: ServingSpec) -> list[str]:
    """What a shadow variant does not take: SageMaker's shadow variants exclude serverless, asynchronous and
    multi-model endpoints, and local mode has none."""
    problems = []
    if not (spec.shadow_model_data or "").startswith("s3://") or not (spec.shadow_model_data or "").endswith(".tar.gz"):
        problems.append(f"--shadow-model-data {spec.shadow_model_data!r}: expected s3://.../model.tar.gz")
    if not 1 <= spec.shadow_percent <= 100:
        problems.append(f"--shadow-percent {spec.shadow_percent}: must be 1-100 (the share of requests copied)")
    for excluded, what in ((spec.serverless_memory_mb is not None, "serverless"), (spec.async_output, "asynchronous"),
                           (spec.multi_model, "multi-model"), (spec.local, "local-mode")):
        if excluded:
            problems.append(f"SageMaker has no shadow variants on {what} endpoints: drop the --shadow-* flags")
    return problems


@dataclass(frozen=True)
class Rollout(FlagGroup):
    """How an update moves the traffic (SageMaker's deployment guardrails): a canary share of the new fleet first, or
    linear steps, each baked for its wait while the rollback alarms may send all traffic back to the old fleet."""

    canary: int | None = None  # percent of the new fleet's capacity that takes traffic first
    canary_wait: int | None = None  # seconds the canary (then the whole new fleet) bakes; default STEP_WAIT
    linear: int | None = None  # percent of the capacity each step adds
    linear_wait: int | None = None  # seconds each step bakes
    rollback_alarm: Sequence[str] = ()  # CloudWatch alarms that roll the update back

    @property
    def given(self) -> bool:
        return bool(self.rollback_alarm) or any(
            v is not None for v in (self.canary, self.canary_wait, self.linear, self.linear_wait))

    def problems(self) -> list[str]:
        problems = []
        if self.canary is not None and self.linear is not None:
            problems.append("--canary and --linear: choose one")
        for flag, percent, (low, high), wait in (("--canary", self.canary, CANARY_PERCENT, self.canary_wait),
                                                  ("--linear", self.linear, LINEAR_PERCENT, self.linear_wait)):
            if percent is not None and not low <= percent <= high:
                problems.append(f"{flag} {percent}: must be {low}-{high} (percent of the new fleet's capacity that "
                                "SageMaker allows per step)")
            if wait is not None and percent is None:
                problems.append(f"{flag}-wait goes with {flag} PERCENT")
            if wait is not None and not 0 <= wait <= MAX_STEP_WAIT:
                problems.append(f"{flag}-wait {wait}: must be 0-{MAX_STEP_WAIT} seconds (SageMaker's limit)")
        if self.rollback_alarm and self.canary is None and self.linear is None:
            problems.append("--rollback-alarm watches a rollout in steps: add --canary PERCENT or --linear PERCENT")
        if len(self.rollback_alarm) > MAX_ALARMS:
            problems.append(f"{len(self.rollback_alarm)} --rollback-alarm: SageMaker takes at most {MAX_ALARMS}")
        problems += [f"--rollback-alarm {a!r}: not a CloudWatch alarm name (1-255 characters, not blank)"
                     for a in self.rollback_alarm if not 1 <= len(a) <= 255 or not a.strip()]
        return problems

    def deployment_config(self) -> dict | None:
        """UpdateEndpoint's DeploymentConfig; None without rollout flags. Raises UserError naming each bad value."""
        if not self.given:
            return None
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))
        canary = self.canary is not None
        percent = self.canary if canary else self.linear
        assert percent is not None  # problems() refuses a wait or an alarm without a step size
        kind, size = ("CANARY", "CanarySize") if canary else ("LINEAR", "LinearStepSize")
        wait = self.wait
        steps = 2 if canary else -(-100 // percent)  # a canary, then the rest; or as many steps as fill 100%
        # Every step bakes (the last one before the old fleet goes too), after the new fleet has started: SageMaker
        # gives up on the whole rollout at MaximumExecutionTimeoutInSeconds, which must leave room for all of it.
        deadline = steps * wait + PROVISIONING
        if deadline > MAX_ROLLOUT:
            raise UserError(f"{steps} steps baking {wait} s each, plus up to {PROVISIONING} s to start the new fleet, "
                            f"exceed SageMaker's limit of {MAX_ROLLOUT} s for a rollout: use a shorter wait or "
                            "larger steps")
        config: dict = {"BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": kind, size: {"Type": "CAPACITY_PERCENT", "Value": percent},
                                            "WaitIntervalInSeconds": wait},
            "TerminationWaitInSeconds": 0, "MaximumExecutionTimeoutInSeconds": deadline}}
        if self.rollback_alarm:
            config["AutoRollbackConfiguration"] = {"Alarms": [{"AlarmName": a} for a in self.rollback_alarm]}
        return config

    @property
    def wait(self) -> int:
        given = self.canary_wait if self.canary is not None else self.linear_wait
        return STEP_WAIT if given is None else given

    def summary(self) -> str:
        steps = (f"{self.canary}% of the new fleet first, the rest {self.wait} s later" if self.canary is not None
                 else f"steps of {self.linear}% every {self.wait} s")
        alarms = f"; rolled back if {' or '.join(self.rollback_alarm)} goes off" if self.rollback_alarm else ""
        return steps + alarms


@dataclass(frozen=True)
class Shadow(FlagGroup):
    """A shadow variant: a second model on the same image and instances that gets a copy of shadow_percent of the
    requests; its answers go only to its metrics and data capture, never to the caller."""

    shadow_model_data: str | None = None  # s3://.../model.tar.gz
    shadow_training_job: str | None = None  # else the artifact of this Completed training job
    shadow_percent: int = 100

    @property
    def given(self) -> bool:
        return bool(self.shadow_model_data or self.shadow_training_job)


def endpoint_request(name: str, config_name: str, tags: list[dict[str, str]] | None = None) -> dict:
    request: dict = {"EndpointName": name, "EndpointConfigName": config_name}
    if tags:
        request["Tags"] = tags
    return request


def update_endpoint_request(name: str, config_name: str, keep_instance_count: bool = False,
                            deployment: dict | None = None) -> dict:
    """keep_instance_count: the variant keeps its current instance count (what autoscaling set) and weight
    instead of the new config's InitialInstanceCount; the new config's data capture settings still apply.
    deployment: a Rollout's DeploymentConfig."""
    request: dict = {"EndpointName": name, "EndpointConfigName": config_name}
    if keep_instance_count:
        request.update({"RetainAllVariantProperties": True,
                        "ExcludeRetainedVariantProperties": [{"VariantPropertyType": "DataCaptureConfig"}]})
    if deployment:
        request["DeploymentConfig"] = deployment
    return request


def is_serverless(config: dict) -> bool:
    """Whether a DescribeEndpointConfig answer (or a CreateEndpointConfig request) is a serverless endpoint's."""
    return any("ServerlessConfig" in v for v in config.get("ProductionVariants", []))


def instance_type_of(config: dict) -> str | None:
    return next((v.get("InstanceType") for v in config.get("ProductionVariants", []) if v["VariantName"] == VARIANT),
                None)


def scaling_resource_id(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def register_scalable_target_request(endpoint: str, min_instances: int, max_instances: int,
                                     backlog: bool = False) -> dict:
    """backlog: an asynchronous endpoint's, which may scale to zero instances."""
    if not (0 if backlog else 1) <= min_instances <= max_instances or max_instances < 1:
        fewest = "0 (asynchronous endpoints)" if backlog else "1 (0 only for asynchronous endpoints: --async-output)"
        raise UserError(f"autoscaling: need {fewest} <= min ({min_instances}) <= max ({max_instances}) instances")
    return {"ServiceNamespace": "sagemaker", "ResourceId": scaling_resource_id(endpoint),
            "ScalableDimension": SCALABLE_DIMENSION, "MinCapacity": min_instances, "MaxCapacity": max_instances}


def scaling_policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def scaling_policy_request(endpoint: str, target: float, scale_in_cooldown: int = 300,
                           scale_out_cooldown: int = 60, backlog: bool = False) -> dict:
    """Target tracking on SageMakerVariantInvocationsPerInstance (requests per instance per minute); for an
    asynchronous endpoint (backlog) on ApproximateBacklogSizePerInstance (queued requests per instance), as AWS
    documents for asynchronous inference."""
    if target <= 0:
        unit = "queued requests per instance" if backlog else "invocations per instance per minute"
        raise UserError(f"autoscaling target {target}: must be > 0 {unit}")
    metric: dict = ({"CustomizedMetricSpecification": {
        "MetricName": "ApproximateBacklogSizePerInstance", "Namespace": "AWS/SageMaker", "Statistic": "Average",
        "Dimensions": [{"Name": "EndpointName", "Value": endpoint}]}} if backlog else
        {"PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}})
    return {
        "PolicyName": scaling_policy_name(endpoint), "ServiceNamespace": "sagemaker",
        "ResourceId": scaling_resource_id(endpoint), "ScalableDimension": SCALABLE_DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(target), **metric,
            "ScaleInCooldown": scale_in_cooldown, "ScaleOutCooldown": scale_out_cooldown,
        },
    }


def from_zero_name(endpoint: str) -> str:
    return f"{endpoint}-backlog-without-capacity"


def from_zero_policy_request(endpoint: str) -> dict:
    """Scale-out from zero instances (target tracking cannot: there is no per-instance backlog then): a step
    policy adding one instance, triggered by from_zero_alarm_request's alarm, as AWS documents for asynchronous
    endpoints that scale to zero."""
    return {"PolicyName": from_zero_name(endpoint), "ServiceNamespace": "sagemaker",
            "ResourceId": scaling_resource_id(endpoint), "ScalableDimension": SCALABLE_DIMENSION,
            "PolicyType": "StepScaling", "StepScalingPolicyConfiguration": {
                "AdjustmentType": "ChangeInCapacity", "MetricAggregationType": "Average", "Cooldown": 300,
                "StepAdjustments": [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]}}


def from_zero_alarm_request(endpoint: str, policy_arn: str) -> dict:
    """The CloudWatch alarm on HasBacklogWithoutCapacity that runs the step policy `policy_arn`."""
    return {"AlarmName": from_zero_name(endpoint), "MetricName": "HasBacklogWithoutCapacity",
            "Namespace": "AWS/SageMaker", "Statistic": "Average", "Period": 60, "EvaluationPeriods": 2,
            "DatapointsToAlarm": 2, "Threshold": 1.0, "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "TreatMissingData": "missing", "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
            "AlarmActions": [policy_arn]}


def deregister_scaling_requests(endpoint: str, from_zero: bool = False) -> list[tuple[str, str, dict]]:
    """Remove the endpoint's scaling policy and scalable target (service, operation, request); with `from_zero`
    also the alarm of the scale-out from zero (deregistering the target removes its step policy)."""
    target = {"ServiceNamespace": "sagemaker", "ResourceId": scaling_resource_id(endpoint),
              "ScalableDimension": SCALABLE_DIMENSION}
    requests = [("cloudwatch", "DeleteAlarms", {"AlarmNames": [from_zero_name(endpoint)]})] if from_zero else []
    return requests + [
        ("application-autoscaling", "DeleteScalingPolicy", {"PolicyName": scaling_policy_name(endpoint), **target}),
        ("application-autoscaling", "DeregisterScalableTarget", target)]


def delete_requests(endpoint: str, config_names: list[str], model_names: list[str],
                    scaling_registered: bool, from_zero: bool = False) -> list[tuple[str, str, dict]]:
    """(service, operation, request) in the order that leaves nothing dangling."""
    requests = deregister_scaling_requests(endpoint, from_zero) if scaling_registered else []
    requests.append(("sagemaker", "DeleteEndpoint", {"EndpointName": endpoint}))
    requests += [("sagemaker", "DeleteEndpointConfig", {"EndpointConfigName": c}) for c in config_names]
    requests += [("sagemaker", "DeleteModel", {"ModelName": m}) for m in model_names]
    return requests


# ---- Deploying: what scripts/deploy.py (and batch_predict.py's model) send --------------------------------------

BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting", "UpdateRollbackFailed")


@dataclass(frozen=True)
class ModelSource(FlagGroup):
    """The model to serve, as deploy.py's and batch_predict.py's flags give it: its artifact (or the training job that
    made it), the serving image, the container's environment and the execution role."""

    OPTIONAL_FLAGS = frozenset({"multi_model", "model_package"})  # batch_predict.py: one model, by its artifact

    model_data: str | None = None  # s3://.../model.tar.gz; with --local a local file
    training_job: str | None = None  # else the artifact of this Completed training job
    multi_model: str | None = None  # else the S3 prefix of a multi-model endpoint's models
    model_package: str | None = None  # else an Approved version of the model registry (its ARN)
    image: str | None = None  # default: the serving image tagged image_tag
    image_tag: str = DEFAULT_TAG
    workers: int | None = None  # SAGEMAKER_MODEL_SERVER_WORKERS
    top_k: int | None = None  # IMGCLF_TOP_K
    env: Sequence[tuple[str, str]] = ()  # more container environment
    role: str | None = None  # execution role, ARN or name

    def __post_init__(self) -> None:
        """Refuse the container environment that the serving image would refuse (ServingSettings' rules), and a
        flag that --env contradicts: such an endpoint answers 503 until SageMaker gives up on it, minutes later."""
        given = dict(self.env)
        for flag, (variable, value) in self._flags().items():
            if value is not None and given.get(variable, str(value)) != str(value):
                raise UserError(f"{flag} {value} and --env {variable}={given[variable]}: give one of them")
            if value is not None:
                _check_serving_environment(flag, {variable: str(value)})
        _check_serving_environment("--env", self.environment())

    def _flags(self) -> dict[str, tuple[str, int | None]]:
        return {"--workers": (VARIABLES["workers"], self.workers), "--top-k": (VARIABLES["top_k"], self.top_k)}

    def environment(self) -> dict[str, str]:
        env = {variable: str(value) for variable, value in self._flags().values() if value is not None}
        env.update(dict(self.env))
        return env


def _check_serving_environment(flag: str, environment: dict[str, str]) -> None:
    try:
        ServingSettings.from_environment(environment)
    except SettingsError as e:
        raise UserError(f"{flag}: {e} (the serving container would refuse it)") from None


@dataclass(frozen=True)
class Autoscaling:
    """Target tracking on InvocationsPerInstance (asynchronous endpoints: on the backlog per instance, and they
    may scale to zero); max_instances turns it on."""

    min_instances: int | None = None
    max_instances: int | None = None
    given_target: float | None = None  # default: 100 invocations per instance per minute; 5 queued (backlog)
    backlog: bool = False  # an asynchronous endpoint's

    @property
    def target(self) -> float:
        return self.given_target if self.given_target is not None else (5.0 if self.backlog else 100.0)

    @property
    def fewest(self) -> int:
        return self.min_instances if self.min_instances is not None else 1


def model_data_of(api: Api, source: ModelSource) -> str:
    """The model artifact: as given, or the training job's (which must have Completed); the prefix of a
    multi-model endpoint's models."""
    if source.multi_model:
        return source.multi_model
    if source.model_data:
        return scripting.local_uri(source.model_data, "--model-data") if scripting.is_local(api) else source.model_data
    if not source.training_job:
        raise UserError("no model: pass --model-data s3://.../model.tar.gz or --training-job NAME")
    if scripting.is_local(api):
        raise UserError(f"training job {source.training_job}: the SDK's local mode keeps a job only in the train.py "
                        "--local that ran it; pass --model-data with the path that command printed")
    job = registry.completed_job(api, source.training_job)
    return job["ModelArtifacts"]["S3ModelArtifacts"] if job else f"s3://<output of {source.training_job}>/model.tar.gz"


def resolve_model(api: Api, spec: ServingSpec, source: ModelSource) -> None:
    """Fill in what takes AWS (or the local images): the artifact, the role's ARN, the image by digest; check."""
    gpu = instances.has_nvidia_gpus(spec.instance_type or "")
    if gpu and not spec.local and spec.serverless_memory_mb is None:  # the serve-gpu image's CUDA needs R580+
        spec.inference_ami = spec.inference_ami or instances.SERVE_GPU_AMI
    spec.role_arn = scripting.role_arn(api, source.role)
    if source.model_package:
        if source.image:
            raise UserError("--image: a model package names its image (by digest); drop --image or --model-package")
        spec.model_package = source.model_package
        if package := registry.approved_package(api, source.model_package):
            container = package["InferenceSpecification"]["Containers"][0]
            spec.image, spec.model_data = container["Image"], container["ModelDataUrl"]
            if gpu and repository_of(spec.image) == REPOSITORIES["serve"]:
                raise UserError(f"{spec.instance_type} has NVIDIA GPUs, and model package {source.model_package} "
                                f"names the CPU serving image ({spec.image}): the GPU would be paid for and idle. "
                                "Deploy it on a CPU instance type (ml.c5, ml.m5, ...), or register the model with the "
                                "serve-gpu image (register_model.py --image-tag, or --image)")
    else:
        spec.model_data = model_data_of(api, source)
        kind = instances.serving_image(spec.instance_type or "")
        spec.image = scripting.serving_image(api, source.image, source.image_tag, kind)
    spec.check()


def repository_of(image: str) -> str:
    """<registry>/<repository>:<tag> or @<digest> -> <repository>."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def create_model(api: Api, request: dict) -> str:
    """CreateModel, unless the model exists: its name hashes its contents, so it is this very model."""
    if scripting.describe_or_none(api, "sagemaker", "DescribeModel", {"ModelName": request["ModelName"]}):
        log.info("model %s exists (same image, artifact and environment)", request["ModelName"])
    else:
        api.call("sagemaker", "CreateModel", request)
    return request["ModelName"]


def has_from_zero_alarm(api: Api, endpoint: str) -> bool:
    if scripting.is_offline(api):
        return False
    answer = api.call("cloudwatch", "DescribeAlarms", {"AlarmNames": [from_zero_name(endpoint)]}, mutates=False)
    return bool(answer.get("MetricAlarms"))


def current_scaling(api: Api, endpoint: str) -> tuple[dict, dict] | None:
    """(scalable target, target-tracking config) registered for the endpoint, or None."""
    if scripting.is_offline(api):
        return None
    resource = scaling_resource_id(endpoint)
    targets = api.call("application-autoscaling", "DescribeScalableTargets", {
        "ServiceNamespace": "sagemaker", "ResourceIds": [resource],
        "ScalableDimension": SCALABLE_DIMENSION}, mutates=False).get("ScalableTargets", [])
    if not targets:
        return None
    policies = api.call("application-autoscaling", "DescribeScalingPolicies", {
        "ServiceNamespace": "sagemaker", "ResourceId": resource,
        "PolicyNames": [scaling_policy_name(endpoint)]}, mutates=False).get("ScalingPolicies", [])
    return targets[0], (policies[0].get("TargetTrackingScalingPolicyConfiguration", {}) if policies else {})


def scaling_values(scaling: tuple[dict, dict] | None, default_target: float) -> tuple[int, int, float] | None:
    """(min, max, target) of what current_scaling found, or None."""
    if not scaling:
        return None
    target, policy = scaling
    return target["MinCapacity"], target["MaxCapacity"], policy.get("TargetValue", default_target)


def apply_scaling(api: Api, endpoint: str, min_n: int, max_n: int, target: float, backlog: bool = False) -> None:
    api.call("application-autoscaling", "RegisterScalableTarget",
             register_scalable_target_request(endpoint, min_n, max_n, backlog))
    api.call("application-autoscaling", "PutScalingPolicy", scaling_policy_request(endpoint, target, backlog=backlog))
    if backlog and min_n == 0:
        policy = api.call("application-autoscaling", "PutScalingPolicy", from_zero_policy_request(endpoint))
        arn = policy.get("PolicyARN", "<policy ARN>")  # a dry run has none
        api.call("cloudwatch", "PutMetricAlarm", from_zero_alarm_request(endpoint, arn))
    unit = "queued requests/instance" if backlog else "invocations/instance/minute"
    log.info("autoscaling %s: %d-%d instances, target %g %s", endpoint, min_n, max_n, target, unit)


def restore_scaling(api: Api, endpoint: str, wanted: tuple[int, int, float], backlog: bool = False) -> None:
    """Register autoscaling again after an update that needed it lifted, however the update ended."""
    try:
        apply_scaling(api, endpoint, *wanted, backlog=backlog)
    except AwsError as e:  # e.g. the endpoint is still Updating after --timeout: say how to restore it
        min_n, max_n, target = wanted
        log.error("autoscaling of %s is NOT registered (%s): once the endpoint is InService, run deploy.py again "
                  "with the same flags and --autoscale-min %d --autoscale-max %d --autoscale-target %g",
                  endpoint, e, min_n, max_n, target)


def describe_alarms(api: Api, names: Sequence[str]) -> list[dict]:
    answer = api.call("cloudwatch", "DescribeAlarms", {"AlarmNames": list(names),
                                                      "AlarmTypes": ["MetricAlarm", "CompositeAlarm"]}, mutates=False)
    return answer.get("MetricAlarms", []) + answer.get("CompositeAlarms", [])


def check_alarms_exist(api: Api, names: Sequence[str]) -> None:
    """SageMaker watches the rollback alarms by name: a misspelt one would guard nothing."""
    if not names or scripting.is_offline(api):
        return
    found = {a["AlarmName"] for a in describe_alarms(api, names)}
    missing = [n for n in names if n not in found]
    if missing:
        raise UserError(f"CloudWatch alarm {', '.join(missing)} not found in {scripting.region_of(api)}: create it "
                        "first (docs/aws.md#rolling-out-a-new-model-safely shows one), or correct --rollback-alarm")


def rollback_cause(api: Api, endpoint: dict, alarms: Sequence[str], since: datetime | None) -> str:
    """Why an update ended on the old config. DescribeEndpoint has only FailureReason (often empty after an alarm),
    so CloudWatch says which rollback alarm is in ALARM, or changed state since the update began (it may be OK
    again once the old fleet serves)."""
    reason = endpoint.get("FailureReason")
    if not alarms:
        return reason or "the new config did not become healthy"
    states = describe_alarms(api, alarms)
    firing = [a["AlarmName"] for a in states if a["StateValue"] == "ALARM"]
    changed = [a["AlarmName"] for a in states if a["AlarmName"] not in firing and since is not None
               and a["StateUpdatedTimestamp"] >= since]
    causes = ([f"rollback alarm {', '.join(firing)} in ALARM"] if firing else []) + (
        [f"rollback alarm {', '.join(changed)} changed state during the rollout"] if changed else [])
    if not causes:
        causes = [f"no rollback alarm ({', '.join(alarms)}) went off: the new fleet failed to become healthy"]
    return "; ".join(causes) + (f" ({reason})" if reason else "")


def wait_in_service(api: Api, name: str, config_name: str, waiting: Waiting, alarms: Sequence[str] = (),
                    since: datetime | None = None) -> None:
    """Wait until the endpoint is InService on `config_name`; a rollback (InService on another config) or a failure
    raises JobFailed with the cause (the rollback `alarms` of an update begun at `since` among them)."""
    ep = scripting.wait_for(
        lambda: api.call("sagemaker", "DescribeEndpoint", {"EndpointName": name}, mutates=False),
        lambda e: e["EndpointStatus"], {"InService", "Failed", "OutOfService", "UpdateRollbackFailed"},
        waiting.poll_interval, waiting.timeout,
        scripting.log_status_changes("endpoint", name, lambda d: d["EndpointStatus"]))
    if ep["EndpointStatus"] != "InService":
        raise JobFailed(f"endpoint {name} {ep['EndpointStatus']}: {ep.get('FailureReason') or 'no reason given'}")
    if ep["EndpointConfigName"] != config_name:
        raise JobFailed(f"endpoint {name} rolled back to {ep['EndpointConfigName']}: "
                        + rollback_cause(api, ep, alarms, since))


def serve_locally(api: Api, name: str, model_name: str, config_name: str, tags: list[dict[str, str]],
                  waiting: Waiting) -> int:
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
            api.call("sagemaker", "CreateEndpoint", endpoint_request(name, config_name, tags))
            wait_in_service(api, name, config_name, waiting)
            print(name, file=out, flush=True)
            log.info("local endpoint %s InService on http://localhost:%s (predict.py --local --endpoint %s); Ctrl-C "
                     "or SIGTERM deletes it", name, port, name)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            log.info("deleting local endpoint %s", name)
        finally:
            for service, operation, request in delete_requests(name, [config_name], [model_name], False):
                api.call(service, operation, request)
    return EXIT_OK


def check_deploy_flags(name: str, local: bool, serverless_memory: int | None, data_capture: str | None,
                       autoscaling: Autoscaling, no_wait: bool, multi_model: bool = False,
                       asynchronous: bool = False) -> None:
    """What the flags alone decide, before anything is read or created."""
    if local and multi_model:
        raise UserError("--multi-model: SageMaker's local mode hosts no multi-model endpoints (it never loads models "
                        "into the container); try one on this machine with `python -m imgclf.local serve --models "
                        "FOLDER` (docs/serving.md#multi-model-endpoints), or deploy on AWS")
    if local:
        unsupported = [flag for flag, value in (
            ("--serverless-memory", serverless_memory), ("--data-capture", data_capture),
            ("--autoscale-min", autoscaling.min_instances is not None), ("--autoscale-max", autoscaling.max_instances),
            ("--no-wait", no_wait), ("--async-output", asynchronous)) if value]
        if unsupported:
            raise UserError(f"{', '.join(unsupported)}: not in SageMaker's local mode (one container per endpoint, "
                            "alive while deploy.py --local runs); drop them, or deploy on AWS")
    if serverless_memory and (autoscaling.max_instances or autoscaling.min_instances is not None):
        raise UserError("autoscaling is for instance endpoints: serverless endpoints scale by themselves")
    if autoscaling.min_instances is not None and not autoscaling.max_instances:
        raise UserError("--autoscale-min needs --autoscale-max")
    if autoscaling.max_instances:  # check the autoscaling flags before anything is created
        register_scalable_target_request(name, autoscaling.fewest, autoscaling.max_instances, autoscaling.backlog)
        scaling_policy_request(name, autoscaling.target, backlog=autoscaling.backlog)


@dataclass
class DeployPlan:
    """Everything SageMaker would refuse, and everything autoscaling needs, decided before anything changes."""

    endpoint: dict | None  # DescribeEndpoint's answer; None: the endpoint is created
    changes: bool  # the endpoint does not run the config yet
    scaling: tuple[dict, dict] | None  # the autoscaling registered now
    lift: bool = False  # autoscaling must be deregistered for the update
    registered: tuple[int, int, float] | None = None  # (min, max, target) registered now
    wanted: tuple[int, int, float] | None = None  # after the deploy: the flags' autoscaling, else what was registered


def check_update(api: Api, name: str, endpoint: dict, config: dict | None = None) -> dict:
    """Refuse an update (to `config`, when given) SageMaker would refuse; return the endpoint's current config."""
    if endpoint["EndpointStatus"] in BUSY:
        raise AwsError(f"endpoint {name} is {endpoint['EndpointStatus']}: wait until it is InService, then "
                       "deploy again")
    if endpoint["EndpointStatus"] == "Failed":
        raise AwsError(f"endpoint {name} is Failed ({endpoint.get('FailureReason', 'no reason given')}): "
                       f"delete it with `deploy.py --name {name} --delete`, then deploy again")
    current = api.call("sagemaker", "DescribeEndpointConfig",
                       {"EndpointConfigName": endpoint["EndpointConfigName"]}, mutates=False)
    if config is not None and is_serverless(current) != is_serverless(config):
        kinds = ("serverless", "instance") if is_serverless(current) else ("instance", "serverless")
        raise UserError(f"endpoint {name} is a {kinds[0]} endpoint and SageMaker cannot update it to a "
                        f"{kinds[1]} one: deploy under another --name, or delete it first (`deploy.py --name "
                        f"{name} --delete`)")
    return current


def plan_deploy(api: Api, name: str, config: dict, autoscaling: Autoscaling, no_wait: bool,
                rollout: Rollout = Rollout()) -> DeployPlan:
    endpoint = scripting.describe_or_none(api, "sagemaker", "DescribeEndpoint", {"EndpointName": name})
    if endpoint is None and rollout.given:
        if not scripting.is_offline(api):
            raise UserError(f"endpoint {name} does not exist yet, and --canary/--linear/--rollback-alarm shape an "
                            "update (traffic moving from the old fleet to the new one): deploy without them first, "
                            "then deploy the next model with them")
        log.warning("dry run without AWS access: showing the update of an existing endpoint %s, the only deploy the "
                    "rollout flags apply to", name)
        endpoint = {"EndpointName": name, "EndpointConfigName": "<its current config>", "EndpointStatus": "InService"}
    plan = DeployPlan(endpoint, endpoint is None or endpoint["EndpointConfigName"] != config["EndpointConfigName"],
                      current_scaling(api, name) if endpoint else None)
    if endpoint is not None and plan.changes and not scripting.is_offline(api):
        current = check_update(api, name, endpoint, config)
        # SageMaker refuses an update that changes an autoscaled variant's instance type; a new model is allowed.
        plan.lift = plan.scaling is not None and instance_type_of(current) != instance_type_of(config)
    plan.registered = scaling_values(plan.scaling, autoscaling.target)
    plan.wanted = ((autoscaling.fewest, autoscaling.max_instances, autoscaling.target)
                   if autoscaling.max_instances else plan.registered)
    if no_wait and plan.changes and (plan.lift or autoscaling.max_instances):
        raise UserError(f"autoscaling of {name} can only be registered once the endpoint is InService, and "
                        "--no-wait would leave it without: drop --no-wait (or deploy without --autoscale-* now and "
                        "run deploy.py with them again once it is InService)")
    return plan


def update_endpoint(api: Api, name: str, config_name: str, plan: DeployPlan, waiting: Waiting,
                    backlog: bool = False, rollout: Rollout = Rollout()) -> None:
    """Move the endpoint to the new config (in the rollout's steps), lifting autoscaling around the update when the
    plan says so."""
    if plan.lift:
        for service, operation, request in deregister_scaling_requests(name, has_from_zero_alarm(api, name)):
            api.call(service, operation, request)
    try:
        since = datetime.now(UTC)
        # Autoscaled: keep the instance count autoscaling chose rather than the config's initial count.
        api.call("sagemaker", "UpdateEndpoint", update_endpoint_request(
            name, config_name, keep_instance_count=bool(plan.scaling), deployment=rollout.deployment_config()))
        how = rollout.summary() if rollout.given else "the old fleet serves until the new one is healthy"
        log.info("endpoint %s: updating from %s to %s (%s)", name, (plan.endpoint or {}).get("EndpointConfigName"),
                 config_name, how)
        if not (api.dry_run or waiting.no_wait):
            wait_in_service(api, name, config_name, waiting, rollout.rollback_alarm, since)
    except BaseException:  # failed call, timeout, rollback, interrupt: never leave it without autoscaling
        if plan.lift and plan.registered is not None:  # what it had: a rollback brings the old instances back
            restore_scaling(api, name, plan.registered, backlog)
        raise


def deploy(access: Access, *, name: str, model: ModelSource, instance_type: str | None, instance_count: int,
           serverless_memory: int | None, serverless_concurrency: int, data_capture: str | None,
           data_capture_percent: int, kms_key: str | None = None, network_isolation: bool = False,
           autoscaling: Autoscaling = Autoscaling(), tags: Sequence[tuple[str, str]] = (),
           timestamp_names: bool = False, waiting: Waiting = Waiting(), async_output: str | None = None,
           async_failure: str | None = None, async_max_concurrency: int | None = None,
           rollout: Rollout = Rollout(), shadow: Shadow = Shadow(), inference_ami: str | None = None) -> int:
    """Create or update the endpoint `name` (with its model and config, and a shadow variant's model) and its
    autoscaling; an update moves in the rollout's steps. Print its name once it is InService. With access.local,
    serve it here until Ctrl-C or SIGTERM (serve_locally)."""
    api = scripting.make_api(access)
    local = scripting.is_local(api)
    autoscaling = replace(autoscaling, backlog=bool(async_output))
    check_deploy_flags(name, local, serverless_memory, data_capture, autoscaling, waiting.no_wait,
                       bool(model.multi_model), bool(async_output))
    if rollout.deployment_config() and serverless_memory:  # checks the rollout flags too, before any AWS call
        raise UserError("--canary/--linear/--rollback-alarm: SageMaker's deployment guardrails are for instance "
                        "endpoints; a serverless endpoint updates all at once")
    if shadow.shadow_percent != Shadow.shadow_percent and not shadow.given:
        raise UserError("--shadow-percent goes with --shadow-model-data or --shadow-training-job")
    spec = ServingSpec(
        name=name, image=model.image or "<image>",
        model_data=model.multi_model or (model.model_data if model.model_data and not local else "s3://x/model.tar.gz"),
        role_arn="", environment=model.environment(),
        instance_type=instance_type or ("local" if local else "ml.m5.large"), instance_count=instance_count,
        serverless_memory_mb=serverless_memory, serverless_concurrency=serverless_concurrency,
        data_capture_uri=data_capture, data_capture_percent=data_capture_percent, kms_key=kms_key,
        network_isolation=network_isolation, tags=scripting.tags_from(tags),
        suffix=scripting.timestamp() if timestamp_names else None, local=local, multi_model=bool(model.multi_model),
        async_output=async_output, async_failure=async_failure, async_max_concurrency=async_max_concurrency,
        shadow_model_data=shadow.shadow_model_data or ("s3://x/model.tar.gz" if shadow.given else None),
        shadow_percent=shadow.shadow_percent, inference_ami=inference_ami)
    spec.check()  # the flags alone: before any AWS call
    if shadow.shadow_training_job:
        spec.shadow_model_data = model_data_of(api, ModelSource(training_job=shadow.shadow_training_job))
    resolve_model(api, spec, model)
    model_request = spec.model_request()
    shadow_request = spec.shadow_model_request() if shadow.given else None
    config = spec.endpoint_config_request(model_request["ModelName"],
                                          shadow_request["ModelName"] if shadow_request else None)
    config_name = config["EndpointConfigName"]
    api.validate("sagemaker", "CreateEndpointConfig", config)  # its instance type, before the model is created
    plan = plan_deploy(api, name, config, autoscaling, waiting.no_wait, rollout)
    check_alarms_exist(api, rollout.rollback_alarm)

    create_model(api, model_request)
    if shadow_request:
        create_model(api, shadow_request)
    if scripting.describe_or_none(api, "sagemaker", "DescribeEndpointConfig", {"EndpointConfigName": config_name}):
        log.info("endpoint config %s exists", config_name)
    else:
        api.call("sagemaker", "CreateEndpointConfig", config)
    if plan.endpoint is None:
        if local:
            return serve_locally(api, name, model_request["ModelName"], config_name, spec.tags, waiting)
        api.call("sagemaker", "CreateEndpoint", endpoint_request(name, config_name, spec.tags))
    elif not plan.changes:
        log.info("endpoint %s already uses %s: nothing to update", name, config_name)
    else:
        update_endpoint(api, name, config_name, plan, waiting, autoscaling.backlog, rollout)
    if plan.endpoint is None and not (waiting.no_wait or api.dry_run):
        wait_in_service(api, name, config_name, waiting)
    if plan.wanted and (plan.lift or autoscaling.max_instances):  # --no-wait only when nothing changed (plan_deploy)
        apply_scaling(api, name, *plan.wanted, backlog=autoscaling.backlog)
    if not api.dry_run:
        print(name)
    return EXIT_OK


def promote_shadow(access: Access, name: str, rollout: Rollout = Rollout(), waiting: Waiting = Waiting()) -> int:
    """Make the endpoint's shadow model its production model: a new config whose production variant is the current
    one with the shadow's model, and no shadow variant; the endpoint moves to it in the rollout's steps."""
    rollout.deployment_config()  # checks the flags before any AWS call
    api = scripting.make_api(access)
    if scripting.is_offline(api):
        log.warning("dry run without AWS access: the promoted config copies the endpoint's current one, which "
                    "cannot be read; showing the update only")
        plan = DeployPlan({"EndpointConfigName": "<its current config>"}, True, None)
        update_endpoint(api, name, "<the promoted config>", plan, waiting, rollout=rollout)
        return EXIT_OK
    endpoint = scripting.describe_or_none(api, "sagemaker", "DescribeEndpoint", {"EndpointName": name})
    if endpoint is None:
        raise AwsError(f"endpoint {name} not found in {scripting.region_of(api)}: nothing to promote")
    current = check_update(api, name, endpoint)
    shadows = current.get("ShadowProductionVariants") or []
    if not shadows:
        raise UserError(f"endpoint {name} has no shadow variant (its config {endpoint['EndpointConfigName']}): deploy "
                        "one first with --shadow-model-data or --shadow-training-job")
    [production] = current["ProductionVariants"]  # SageMaker allows one production variant beside a shadow
    request: dict = {"ProductionVariants": [{**production, "ModelName": shadows[0]["ModelName"]}],
                     **{key: current[key] for key in ("DataCaptureConfig", "KmsKeyId") if current.get(key)}}
    config_name = resource_name(name, suffix=content_hash(request))
    check_alarms_exist(api, rollout.rollback_alarm)
    log.info("endpoint %s: promoting shadow model %s (config %s)", name, shadows[0]["ModelName"], config_name)
    if not scripting.describe_or_none(api, "sagemaker", "DescribeEndpointConfig", {"EndpointConfigName": config_name}):
        api.call("sagemaker", "CreateEndpointConfig", {"EndpointConfigName": config_name, **request})
    plan = DeployPlan(endpoint, True, current_scaling(api, name))
    update_endpoint(api, name, config_name, plan, waiting, rollout=rollout)
    if not api.dry_run:
        print(name)
    return EXIT_OK


def _ours(name: str, endpoint: str) -> bool:
    """Names deploy gives: <endpoint>-<8 hex> or <endpoint>-<YYYYmmdd-HHMMSS>."""
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


def deployed_names(api: Api, name: str, current: str) -> tuple[list[str], list[str]]:
    """(configs, models) of endpoint `name`: its current config and that config's models, and those earlier deploys
    left behind (the names deploy gives)."""
    config = api.call("sagemaker", "DescribeEndpointConfig", {"EndpointConfigName": current}, mutates=False)
    configs = [current] + [c for c in _list_names(api, "ListEndpointConfigs", "EndpointConfigs", "EndpointConfigName",
                                                  name) if _ours(c, name) and c != current]
    models = [v["ModelName"] for v in config.get("ProductionVariants", []) + config.get("ShadowProductionVariants", [])]
    models += [m for m in _list_names(api, "ListModels", "Models", "ModelName", name)
               if _ours(m, name) and m not in models]
    return configs, models


def delete(access: Access, name: str) -> int:
    """Delete the endpoint, its autoscaling, and the configs and models deploy made for it."""
    api = scripting.make_api(access)
    if scripting.is_local(api):
        raise UserError(f"a local endpoint lives in the deploy.py --local process that created it: stop that "
                        f"process (Ctrl-C or SIGTERM) to delete {name}")
    configs: list[str] = []
    models: list[str] = []
    if not scripting.is_offline(api):
        endpoint = scripting.describe_or_none(api, "sagemaker", "DescribeEndpoint", {"EndpointName": name})
        if endpoint is None:
            raise AwsError(f"endpoint {name} not found in {scripting.region_of(api)}: nothing to delete "
                           "(list endpoints with `aws sagemaker list-endpoints`)")
        configs, models = deployed_names(api, name, endpoint["EndpointConfigName"])
    scaling = current_scaling(api, name) is not None
    for service, operation, request in delete_requests(name, configs, models, scaling, has_from_zero_alarm(api, name)):
        api.call(service, operation, request)
        if not api.dry_run:
            log.info("%s %s", operation, request.get("ResourceId") or next(iter(request.values())))
    return EXIT_OK
