"""Batch transform (scripts/batch_predict.py): the request builder (CreateTransformJob), the summary of its
outputs, and `batch_predict`, which runs a job and writes that summary.

One image per request, as an endpoint gets it: SplitType None (each object is one record) and BatchStrategy
SingleRecord, so the serving image's handlers see exactly what InvokeEndpoint sends. SageMaker writes one
`<key>.out` per input object under the output prefix (the handler's JSON answer); `summary_row` turns each
answer into a row of the CSV written next to them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from imgclf import atomic, instances
from imgclf.aws import endpoints, s3sync, scripting
from imgclf.aws.images import LOCAL_INSTANCE_TYPES
from imgclf.aws.scripting import Access, Waiting
from imgclf.aws.session import Api
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_OK, JobFailed
from imgclf.processes import free_port

log = logging.getLogger("imgclf.aws")

# One content type for every object: the serving handlers decode any image format from its bytes.
CONTENT_TYPE = "application/x-image"
ACCEPT = "application/json"
OUTPUT_SUFFIX = ".out"  # SageMaker's name for a record's answer: <input key>.out
SUMMARY_HEADER = ("file", "class_name", "probability", "error")
SUMMARY = "summary.csv"
LOCAL_OUTPUT = "sagemaker-local/batch"  # --local's default output folder: <this>/<job>


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


def local_path(uri: str) -> Path:
    return Path(urllib.parse.urlsplit(uri).path)


def answers(api: Api, output_uri: str) -> dict[str, bytes]:
    """Input file (relative to the input prefix) -> its answer, from the <file>.out objects under the output."""
    if output_uri.startswith("file://"):
        root = local_path(output_uri)
        return {p.relative_to(root).as_posix().removesuffix(OUTPUT_SUFFIX): p.read_bytes()
                for p in sorted(root.rglob(f"*{OUTPUT_SUFFIX}")) if p.is_file()}
    bucket, prefix = s3sync.parse_s3_uri(output_uri)
    keys = sorted(k for k in s3sync.remote_objects(api, bucket, prefix) if k.endswith(OUTPUT_SUFFIX))
    api.client("s3")  # create the client before the threads share it

    def read(key: str) -> bytes:
        return api.call("s3", "GetObject", {"Bucket": bucket, "Key": key}, mutates=False)["Body"].read()

    with ThreadPoolExecutor(max_workers=16) as pool:
        bodies = list(pool.map(read, keys))
    return {key.removeprefix(prefix).removesuffix(OUTPUT_SUFFIX): body for key, body in zip(keys, bodies)}


def write_summary(api: Api, output_uri: str, rows: Sequence[tuple[str, ...]]) -> str:
    """summary.csv beside the answers; returns where it went."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(SUMMARY_HEADER)
    writer.writerows(rows)
    if output_uri.startswith("file://"):
        path = local_path(output_uri) / SUMMARY
        atomic.write_text(path, text.getvalue())  # no half-written summary
        return str(path)
    bucket, prefix = s3sync.parse_s3_uri(output_uri)
    api.call("s3", "PutObject", {"Bucket": bucket, "Key": prefix + SUMMARY, "Body": text.getvalue().encode(),
                                 "ContentType": "text/csv"})
    return f"s3://{bucket}/{prefix}{SUMMARY}"


def wait_transform_job(api: Api, name: str, waiting: Waiting) -> dict:
    job = scripting.wait_for(
        lambda: api.call("sagemaker", "DescribeTransformJob", {"TransformJobName": name}, mutates=False),
        lambda j: j["TransformJobStatus"], {"Completed", "Failed", "Stopped"}, waiting.poll_interval, waiting.timeout,
        scripting.log_status_changes("transform job", name, lambda d: d["TransformJobStatus"]))
    if job["TransformJobStatus"] != "Completed":
        raise JobFailed(f"transform job {name} {job['TransformJobStatus']}: "
                        f"{job.get('FailureReason') or 'no reason given'}")
    return job


def locations(api: Api, name: str, input_location: str, output_location: str | None) -> tuple[str, str]:
    """(input URI, output URI): S3 prefixes, or with --local file:// folders (the output one created)."""
    if not scripting.is_local(api):
        input_uri = input_location.rstrip("/") + "/"
        bucket, _ = s3sync.parse_s3_uri(input_uri)
        output_uri = output_location or f"s3://{bucket}/imgclf/batch/{name}"
        s3sync.parse_s3_uri(output_uri)
        return input_uri, output_uri
    input_uri = scripting.local_uri(input_location, "--input")
    nested = [p for p in local_path(input_uri).rglob("*") if p.is_file() and p.parent != local_path(input_uri)]
    if nested:  # SageMaker reads every object under the prefix; the SDK's local mode one folder level only
        log.warning("%d file(s) in subfolders of %s are not scored: the SDK's local mode reads only the files "
                    "directly in the folder", len(nested), input_location)
    output_uri = scripting.local_uri(output_location or f"{LOCAL_OUTPUT}/{name}", "--output", must_exist=False)
    local_path(output_uri).mkdir(parents=True, exist_ok=True)
    # Its own port: a local endpoint of deploy.py --local may hold the SDK's default 8080.
    config = dict(api.local.config or {})
    api.local.config = {**config, "local": {**config.get("local", {}), "serving_port": free_port()}}
    return input_uri, output_uri


def create_model(api: Api, model: endpoints.ModelSource, instance_type: str) -> str:
    """The model, as deploy creates it (same image, artifact and environment, so the same answers)."""
    if instances.has_nvidia_gpus(instance_type) and not model.image:
        raise UserError(f"{instance_type}: batch transform's GPU hosts run NVIDIA driver R470 or R535 "
                        "(TransformAmiVersion), older than the R580 that the serve-gpu image's CUDA 13.0 needs: use "
                        "a CPU instance type (ml.c5, ml.m5, ...), or --image with a serving image built for CUDA 12")
    spec = endpoints.ServingSpec(name="imgclf-batch", image="", model_data="", role_arn="",
                                 environment=model.environment(), instance_type=instance_type,
                                 local=scripting.is_local(api))
    endpoints.resolve_model(api, spec, model)
    return endpoints.create_model(api, spec.model_request())


def summarize(api: Api, output_uri: str) -> str:
    """Read the job's answers, write summary.csv (the top-1 class of each image); return where it went."""
    rows = [summary_row(file, answer) for file, answer in sorted(answers(api, output_uri).items())]
    failed = sum(1 for row in rows if row[3])
    summary = write_summary(api, output_uri, rows)
    log.info("%d image(s) scored%s; summary: %s", len(rows) - failed, f", {failed} refused" if failed else "",
             summary)
    return summary


def batch_predict(access: Access, *, input_location: str, model: endpoints.ModelSource,
                  output_location: str | None, job_name: str | None, instance_type: str | None,
                  instance_count: int, max_payload_mb: int, max_concurrent: int | None = None,
                  invocation_timeout_s: int | None = None, invocation_retries: int | None = None,
                  volume_kms_key: str | None = None, output_kms_key: str | None = None,
                  tags: Sequence[tuple[str, str]] = (), waiting: Waiting = Waiting()) -> int:
    """Score every image under `input_location` with a transform job on the model; print where summary.csv went
    (with --no-wait: the job's name)."""
    if access.local and waiting.no_wait:
        raise UserError("--local runs the job within this command (the SDK's local mode keeps no jobs between "
                        "commands): drop --no-wait")
    api = scripting.make_api(access)
    local = scripting.is_local(api)
    name = job_name or scripting.resource_name("imgclf-batch", suffix=scripting.timestamp())
    input_uri, output_uri = locations(api, name, input_location, output_location)
    spec = TransformSpec(
        model_name="", input_uri=input_uri, output_uri=output_uri,
        instance_type=instance_type or ("local" if local else "ml.m5.large"), instance_count=instance_count,
        max_concurrent=max_concurrent, max_payload_mb=max_payload_mb, invocation_timeout_s=invocation_timeout_s,
        invocation_retries=invocation_retries, volume_kms_key=volume_kms_key, output_kms_key=output_kms_key,
        local=local)
    spec.check()  # the flags alone: before the model is created
    placeholder = replace(spec, model_name=spec.model_name or "imgclf-batch")
    api.validate("sagemaker", "CreateTransformJob", transform_job_request(name, placeholder))  # its instance type
    spec.model_name = create_model(api, model, spec.instance_type)
    api.call("sagemaker", "CreateTransformJob", transform_job_request(name, spec, scripting.tags_from(tags)))
    if api.dry_run:
        return EXIT_OK
    log.info("transform job %s created: %s -> %s", name, input_uri, output_uri)
    if waiting.no_wait:
        print(name)
        return EXIT_OK
    wait_transform_job(api, name, waiting)
    print(summarize(api, output_uri))
    return EXIT_OK
