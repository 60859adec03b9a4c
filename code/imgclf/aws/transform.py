"""Request builder for batch transform (CreateTransformJob), and the summary of its outputs.

One image per request, as an endpoint gets it: SplitType None (each object is one record) and BatchStrategy
SingleRecord, so the serving image's handlers see exactly what InvokeEndpoint sends. SageMaker writes one
`<key>.out` per input object under the output prefix (the handler's JSON answer); `summary_rows` turns those
answers into the CSV rows batch_predict.py writes next to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from imgclf.aws.images import LOCAL_INSTANCE_TYPES
from imgclf.errors import UserError

# One content type for every object: the serving handlers decode any image format from its bytes.
CONTENT_TYPE = "application/x-image"
ACCEPT = "application/json"
OUTPUT_SUFFIX = ".out"  # SageMaker's name for a record's answer: <input key>.out
SUMMARY_HEADER = ("file", "class_name", "probability", "error")


@dataclass
class TransformSpec:
    model_name: str
    input_uri: str  # prefix holding the images (s3://, or file:// in local mode)
    output_uri: str
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    max_concurrent: int | None = None  # None: SageMaker asks the container (GET /execution-parameters)
    max_payload_mb: int = 6
    invocation_timeout_s: int | None = None
    invocation_retries: int | None = None
    volume_kms_key: str | None = None
    output_kms_key: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    local: bool = False

    def check(self) -> None:
        problems = []
        schemes = ("s3://", "file://") if self.local else ("s3://",)
        for what, uri in (("input", self.input_uri), ("output", self.output_uri)):
            if not uri.startswith(schemes):
                problems.append(f"{what} location {uri!r} is not an s3:// URI")
        if self.local:
            if self.instance_type not in LOCAL_INSTANCE_TYPES:
                problems.append(f"instance type {self.instance_type!r}: local mode takes "
                                + " or ".join(LOCAL_INSTANCE_TYPES))
        elif not self.instance_type.startswith("ml."):
            problems.append(f"instance type {self.instance_type!r}: SageMaker types start with ml. (ml.m5.large)")
        if self.instance_count < 1:
            problems.append(f"instance count {self.instance_count}: must be at least 1")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            problems.append(f"max concurrent transforms {self.max_concurrent}: must be at least 1")
        if not 1 <= self.max_payload_mb <= 100:  # SageMaker's bounds for MaxPayloadInMB
            problems.append(f"max payload {self.max_payload_mb} MB: must be 1-100")
        if self.invocation_timeout_s is not None and not 1 <= self.invocation_timeout_s <= 3600:
            problems.append(f"invocation timeout {self.invocation_timeout_s} s: must be 1-3600")
        if self.invocation_retries is not None and not 0 <= self.invocation_retries <= 3:
            problems.append(f"invocation retries {self.invocation_retries}: must be 0-3")
        if problems:
            raise UserError("; ".join(problems))


def transform_job_request(name: str, spec: TransformSpec, tags: list[dict[str, str]] | None = None) -> dict:
    spec.check()
    request: dict = {
        "TransformJobName": name,
        "ModelName": spec.model_name,
        "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": spec.max_payload_mb,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": spec.input_uri}},
            "ContentType": CONTENT_TYPE, "SplitType": "None", "CompressionType": "None"},
        "TransformOutput": {"S3OutputPath": spec.output_uri, "Accept": ACCEPT, "AssembleWith": "None"},
        "TransformResources": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count},
    }
    if spec.max_concurrent is not None:
        request["MaxConcurrentTransforms"] = spec.max_concurrent
    client_config = {k: v for k, v in (("InvocationsTimeoutInSeconds", spec.invocation_timeout_s),
                                       ("InvocationsMaxRetries", spec.invocation_retries)) if v is not None}
    if client_config:
        request["ModelClientConfig"] = client_config
    if spec.volume_kms_key:
        request["TransformResources"]["VolumeKmsKeyId"] = spec.volume_kms_key
    if spec.output_kms_key:
        request["TransformOutput"]["KmsKeyId"] = spec.output_kms_key
    if spec.environment:
        request["Environment"] = dict(spec.environment)
    if tags:
        request["Tags"] = tags
    return request


def summary_row(file: str, answer: bytes | str) -> tuple[str, str, str, str]:
    """(input file, top-1 class, its probability, "") from one `.out` answer; an answer that is not our
    predictions JSON (the container refused that image) leaves class and probability empty and gives the error."""
    try:
        top = json.loads(answer)["predictions"][0]["top_k"][0]
        return file, str(top["class_name"]), f"{float(top['probability']):.6f}", ""
    except (ValueError, KeyError, IndexError, TypeError):
        text = answer.decode(errors="replace") if isinstance(answer, bytes) else answer
        try:
            text = str(json.loads(text)["message"])
        except (ValueError, KeyError, TypeError):
            pass
        return file, "", "", " ".join(text.split())[:300] or "(empty answer)"
