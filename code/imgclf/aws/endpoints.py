"""Request builders for serving: model -> endpoint config -> endpoint, autoscaling, and deletion.

Model and endpoint-config names end in a hash of what they contain, so deploying the same artifact with the
same settings twice reuses them, and any change gives new names: the endpoint then moves to the new
config with UpdateEndpoint (SageMaker's blue/green: the old fleet serves until the new one is healthy).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from imgclf.aws.images import LOCAL_INSTANCE_TYPES
from imgclf.aws.scripting import resource_name
from imgclf.errors import UserError

VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)


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

    def check(self) -> None:
        problems = []
        if resource_name(self.name) != self.name or len(self.name) > 50:
            problems.append(f"endpoint name {self.name!r}: use letters, digits and single hyphens, at most 50 "
                            "characters (e.g. dog-breeds)")
        schemes = ("s3://", "file://") if self.local else ("s3://",)
        if not (self.model_data.startswith(schemes) and self.model_data.endswith(".tar.gz")):
            problems.append(f"model data {self.model_data!r}: expected s3://.../model.tar.gz (train.py prints it)")
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
        if problems:
            raise UserError("; ".join(problems))

    def model_request(self) -> dict:
        container = {"Image": self.image, "ModelDataUrl": self.model_data, "Environment": dict(self.environment)}
        # Isolation changes the name; without it, names stay what earlier versions gave (no needless update).
        hashed: tuple = (container, self.role_arn) + ((True,) if self.network_isolation else ())
        name = resource_name(self.name, suffix=self.suffix or content_hash(*hashed))
        request: dict = {"ModelName": name, "ExecutionRoleArn": self.role_arn, "PrimaryContainer": container}
        if self.network_isolation:
            request["EnableNetworkIsolation"] = True
        if self.tags:
            request["Tags"] = list(self.tags)
        return request

    def endpoint_config_request(self, model_name: str) -> dict:
        variant: dict = {"VariantName": VARIANT, "ModelName": model_name}
        if self.serverless_memory_mb is not None:
            variant["ServerlessConfig"] = {"MemorySizeInMB": self.serverless_memory_mb,
                                           "MaxConcurrency": self.serverless_concurrency}
        else:
            variant.update({"InstanceType": self.instance_type, "InitialInstanceCount": self.instance_count,
                            "InitialVariantWeight": 1.0})
        request: dict = {"ProductionVariants": [variant]}
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


def endpoint_request(name: str, config_name: str, tags: list[dict[str, str]] | None = None) -> dict:
    request: dict = {"EndpointName": name, "EndpointConfigName": config_name}
    if tags:
        request["Tags"] = tags
    return request


def update_endpoint_request(name: str, config_name: str, keep_instance_count: bool = False) -> dict:
    """keep_instance_count: the variant keeps its current instance count (what autoscaling set) and weight
    instead of the new config's InitialInstanceCount; the new config's data capture settings still apply."""
    request: dict = {"EndpointName": name, "EndpointConfigName": config_name}
    if keep_instance_count:
        request.update({"RetainAllVariantProperties": True,
                        "ExcludeRetainedVariantProperties": [{"VariantPropertyType": "DataCaptureConfig"}]})
    return request


def is_serverless(config: dict) -> bool:
    """Whether a DescribeEndpointConfig answer (or a CreateEndpointConfig request) is a serverless endpoint's."""
    return any("ServerlessConfig" in v for v in config.get("ProductionVariants", []))


def instance_type_of(config: dict) -> str | None:
    return next((v.get("InstanceType") for v in config.get("ProductionVariants", []) if v["VariantName"] == VARIANT),
                None)


def scaling_resource_id(endpoint: str) -> str:
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def register_scalable_target_request(endpoint: str, min_instances: int, max_instances: int) -> dict:
    if not 1 <= min_instances <= max_instances:
        raise UserError(f"autoscaling: need 1 <= min ({min_instances}) <= max ({max_instances}) instances")
    return {"ServiceNamespace": "sagemaker", "ResourceId": scaling_resource_id(endpoint),
            "ScalableDimension": SCALABLE_DIMENSION, "MinCapacity": min_instances, "MaxCapacity": max_instances}


def scaling_policy_name(endpoint: str) -> str:
    return f"{endpoint}-invocations-per-instance"


def scaling_policy_request(endpoint: str, target_invocations: float, scale_in_cooldown: int = 300,
                           scale_out_cooldown: int = 60) -> dict:
    """Target tracking on SageMakerVariantInvocationsPerInstance (requests per instance per minute)."""
    if target_invocations <= 0:
        raise UserError(f"autoscaling target {target_invocations}: must be > 0 invocations per instance per minute")
    return {
        "PolicyName": scaling_policy_name(endpoint), "ServiceNamespace": "sagemaker",
        "ResourceId": scaling_resource_id(endpoint), "ScalableDimension": SCALABLE_DIMENSION,
        "PolicyType": "TargetTrackingScaling",
        "TargetTrackingScalingPolicyConfiguration": {
            "TargetValue": float(target_invocations),
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            "ScaleInCooldown": scale_in_cooldown, "ScaleOutCooldown": scale_out_cooldown,
        },
    }


def deregister_scaling_requests(endpoint: str) -> list[tuple[str, str, dict]]:
    """Remove the endpoint's scaling policy and scalable target (service, operation, request)."""
    target = {"ServiceNamespace": "sagemaker", "ResourceId": scaling_resource_id(endpoint),
              "ScalableDimension": SCALABLE_DIMENSION}
    return [("application-autoscaling", "DeleteScalingPolicy", {"PolicyName": scaling_policy_name(endpoint), **target}),
            ("application-autoscaling", "DeregisterScalableTarget", target)]


def delete_requests(endpoint: str, config_names: list[str], model_names: list[str],
                    scaling_registered: bool) -> list[tuple[str, str, dict]]:
    """(service, operation, request) in the order that leaves nothing dangling."""
    requests = deregister_scaling_requests(endpoint) if scaling_registered else []
    requests.append(("sagemaker", "DeleteEndpoint", {"EndpointName": endpoint}))
    requests += [("sagemaker", "DeleteEndpointConfig", {"EndpointConfigName": c}) for c in config_names]
    requests += [("sagemaker", "DeleteModel", {"ModelName": m}) for m in model_names]
    return requests
