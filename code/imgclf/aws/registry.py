"""The model registry (scripts/register_model.py): a Completed training job's model as a new version (model
package) of a model package group, with the serving image by digest, the content types it answers, the instance
types it runs on, its metrics (the job's metrics.json) and an approval status, PendingManualApproval; and the
approval itself (Approved or Rejected). deploy.py --model-package deploys an Approved version only.

A version names what it serves: the image by digest (a tag moves with every `make push`) and the model artifact;
its ModelMetrics point to the job's metrics.json, which register uploads next to the job's output.tar.gz (the
archive holds it, and SageMaker wants a JSON object in S3)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from imgclf import instances
from imgclf.aws import jobs, s3sync, scripting
from imgclf.aws.scripting import Access
from imgclf.aws.session import Api, AwsError
from imgclf.errors import UserError
from imgclf.exit_codes import EXIT_OK

log = logging.getLogger("imgclf.aws")

PENDING, APPROVED, REJECTED = "PendingManualApproval", "Approved", "Rejected"
# What the serving image accepts and answers: imgclf.serving.inference's CONTENT_TYPES and JSON_TYPE, restated
# because the scripts do not install the serving side (tests/integration/test_aws_registry.py keeps them equal).
CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "application/x-image", "application/octet-stream",
                 "application/json")
RESPONSE_TYPES = ("application/json",)
METRICS_FILE = "metrics.json"
MAX_METRICS_BYTES = 16 << 20  # far more than a metrics.json holds; the archive is untrusted
GROUP_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")  # SageMaker's ModelPackageGroupName
PACKAGE_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[a-z0-9-]{9,16}:\d{12}:model-package/"
                         r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}/\d{1,9}")
# AWS Graviton families (c6g, m7g, r7gd, ...): arm64, and the images are built for linux/amd64 (Makefile PLATFORM).
GRAVITON = re.compile(r"[a-z]+\d+g[a-z]*")
# Statuses of a group that takes no new version: SageMaker is removing it, or failed to make it.
GONE = ("Deleting", "DeleteFailed", "Failed")
# CustomerMetadataProperties: what SageMaker takes (keys of at most 128 characters; 50 entries, one of them the job)
METADATA_VALUE = re.compile(r"[\w.:/=+\-@ ]{1,256}")
MAX_FACTS = 49


def serves_on(instance_type: str) -> bool:
    """Whether the serving image (ONNX Runtime on the CPU, linux/amd64) runs on this instance type: a CPU family
    by imgclf.instances' table (not its GPU families, nor those it refuses: Inferentia, Trainium, Gaudi, or GPU
    families it does not know), and not Graviton."""
    if instances.has_nvidia_gpus(instance_type) or GRAVITON.fullmatch(instances.family(instance_type)):
        return False
    try:
        return instances.training_image(instance_type) == "train-cpu"
    except instances.InstanceTypeError:
        return False


def supported_instance_types(api: Api) -> tuple[list[str], list[str]]:
    """(real-time, transform) instance types of a version: those SageMaker offers (botocore's service model, the
    enums of InferenceSpecification) that the serving image runs on."""
    spec = api.client("sagemaker").meta.service_model.operation_model("CreateModelPackage").input_shape.members[
        "InferenceSpecification"].members
    realtime = [t for t in spec["SupportedRealtimeInferenceInstanceTypes"].member.enum if serves_on(t)]
    transform = [t for t in spec["SupportedTransformInstanceTypes"].member.enum if serves_on(t)]
    return realtime, transform


def check_group_name(name: str) -> None:
    if not GROUP_NAME.fullmatch(name):
        raise UserError(f"--group {name!r}: a model package group name is 1-63 letters, digits and hyphens, starting "
                        "and ending with a letter or digit (e.g. dog-breeds)")


def check_package_arn(arn: str, flag: str) -> None:
    if not PACKAGE_ARN.fullmatch(arn):
        raise UserError(f"{flag} {arn!r}: expected the ARN of a model package version, arn:aws:sagemaker:<region>:"
                        "<account>:model-package/<group>/<version> (register_model.py prints it)")


def group_request(name: str, tags: list[dict[str, str]]) -> dict:
    request: dict = {"ModelPackageGroupName": name,
                     "ModelPackageGroupDescription": "image classifiers trained by imgclf: one version per "
                                                     "registered training job"}
    if tags:
        request["Tags"] = tags
    return request


def metrics_uri(model_data: str) -> str:
    """Where register uploads a job's metrics.json: beside its model.tar.gz and output.tar.gz
    (<output>/<job>/output/metrics.json)."""
    return model_data.rsplit("/", 1)[0] + "/" + METRICS_FILE


def summary(metrics: dict) -> dict[str, str]:
    """The architecture and the final accuracies and losses of a metrics.json, as short strings (what a reviewer
    sees in the registry without opening the file); values SageMaker would refuse are left out."""
    found: dict[str, str] = {}
    hps = metrics.get("hyperparameters")
    if isinstance(hps, dict) and isinstance(hps.get("model"), str):
        found["architecture"] = hps["model"]
    for key, value in metrics.items():
        if key.endswith(("_accuracy", "_loss")) and isinstance(value, int | float) and not isinstance(value, bool):
            found[key] = f"{value:.4f}"
    if isinstance(metrics.get("best_epoch"), int):
        found["best_epoch"] = str(metrics["best_epoch"])
    kept = {k: v for k, v in found.items()
            if len(k) <= 128 and METADATA_VALUE.fullmatch(k) and METADATA_VALUE.fullmatch(v)}
    return dict(list(kept.items())[:MAX_FACTS])


def package_request(*, group: str, training_job: str, job_arn: str | None, image: str, model_data: str,
                    metrics_body: bytes | None, metrics: dict, realtime_types: Sequence[str],
                    transform_types: Sequence[str], tags: list[dict[str, str]]) -> dict:
    """CreateModelPackage: a new version of `group`, PendingManualApproval. metrics_body: the bytes of metrics.json
    as uploaded (None in a dry run that cannot read the job)."""
    facts = summary(metrics)
    scores = ", ".join(f"{k} {v}" for k, v in facts.items() if k.endswith(("_accuracy", "_loss")))
    description = f"{facts.get('architecture', 'model')} trained by {training_job}" + (f": {scores}" if scores else "")
    statistics: dict = {"ContentType": "application/json", "S3Uri": metrics_uri(model_data)}
    if metrics_body is not None:
        statistics["ContentDigest"] = "sha256:" + hashlib.sha256(metrics_body).hexdigest()
    request: dict = {
        "ModelPackageGroupName": group,
        "ModelPackageDescription": description[:1024],
        "InferenceSpecification": {
            "Containers": [{"Image": image, "ModelDataUrl": model_data}],
            "SupportedContentTypes": list(CONTENT_TYPES),
            "SupportedResponseMIMETypes": list(RESPONSE_TYPES),
            "SupportedRealtimeInferenceInstanceTypes": list(realtime_types),
            "SupportedTransformInstanceTypes": list(transform_types),
        },
        "ModelApprovalStatus": PENDING,
        "ModelMetrics": {"ModelQuality": {"Statistics": statistics}},
        "CustomerMetadataProperties": {"training-job": training_job, **facts},
    }
    if job_arn:
        request["MetadataProperties"] = {"GeneratedBy": job_arn}  # lineage: the version -> the job that made it
    if tags:
        request["Tags"] = tags
    return request


def _described(api: Api, operation: str, params: dict) -> dict | None:
    """A description, or None when SageMaker says the resource does not exist (or a dry run cannot read)."""
    try:
        return scripting.describe_or_none(api, "sagemaker", operation, params)
    except AwsError as e:  # the registry says "... does not exist." or "... not found"
        if e.code == "ValidationException" and re.search(r"does not exist|not found", str(e), re.I):
            return None
        raise


def _existing(api: Api, operation: str, params: dict, what: str, hint: str) -> dict | None:
    """The description of `what`, which must exist (AwsError naming it and `hint` if not); None only in a dry run
    without AWS access."""
    found = _described(api, operation, params)
    if found is None and not scripting.is_offline(api):
        raise AwsError(f"{what} not found in {scripting.region_of(api)}: {hint}")
    return found


def approved_package(api: Api, arn: str) -> dict | None:
    """The model package version `arn`, which deploy.py --model-package serves only once a person approved it (None
    in a dry run without AWS access)."""
    check_package_arn(arn, "--model-package")
    package = _existing(api, "DescribeModelPackage", {"ModelPackageName": arn}, f"model package {arn}",
                        "check the ARN (register_model.py printed it)")
    if package is None:
        return None
    status = package.get("ModelApprovalStatus", "unknown")
    if status != "Approved":
        raise UserError(f"model package {arn} is {status}: only an Approved version is deployed; after checking its "
                        f"metrics, approve it with register_model.py --approve {arn}, or deploy another version")
    return package


def completed_job(api: Api, name: str) -> dict | None:
    """The Completed training job `name`, with its model artifact (None in a dry run without AWS access): what
    register_model.py registers and deploy.py --training-job serves."""
    job = _existing(api, "DescribeTrainingJob", {"TrainingJobName": name}, f"training job {name}",
                    "check the name (train.py prints it; `aws sagemaker list-training-jobs` lists them) and --region")
    if job is None:
        return None
    status = job["TrainingJobStatus"]
    if status != "Completed":
        hint = (f"wait for it with `train.py --attach {name}`" if status in ("InProgress", "Stopping")
                else "use a Completed job")
        raise UserError(f"training job {name} is {status}: only a Completed job has a model; {hint}")
    if not (job.get("ModelArtifacts") or {}).get("S3ModelArtifacts"):
        raise AwsError(f"training job {name} is Completed but names no model artifact (ModelArtifacts)")
    return job


def read_metrics(api: Api, job: dict) -> bytes:
    """The job's metrics.json, from its output.tar.gz (what the training wrote to /opt/ml/output/data)."""
    name = job["TrainingJobName"]
    with tempfile.TemporaryDirectory(prefix="imgclf-register-") as tmp:
        if jobs.download_reports(api, job, Path(tmp)) is None:
            raise AwsError(f"training job {name}: its output.tar.gz could not be read (the warning above says why): "
                           f"register needs the {METRICS_FILE} in it")
        path = Path(tmp) / METRICS_FILE
        if not path.is_file():
            raise UserError(f"training job {name}: its output.tar.gz holds no {METRICS_FILE}; register takes jobs of "
                            "imgclf's training image, which writes it at the end of every run")
        if path.stat().st_size > MAX_METRICS_BYTES:
            raise UserError(f"training job {name}: its {METRICS_FILE} is {path.stat().st_size} bytes, more than a "
                            f"metrics file of imgclf's ({MAX_METRICS_BYTES} at most); refused")
        body = path.read_bytes()
    try:
        metrics = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"training job {name}: its {METRICS_FILE} is not JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise UserError(f"training job {name}: its {METRICS_FILE} is not a JSON object")
    return body


def ensure_group(api: Api, name: str, tags: list[dict[str, str]]) -> None:
    """Create the model package group unless it exists (and can take a new version)."""
    group = _described(api, "DescribeModelPackageGroup", {"ModelPackageGroupName": name})
    if group is None:
        api.call("sagemaker", "CreateModelPackageGroup", group_request(name, tags))
        if not api.dry_run:
            log.info("model package group %s created", name)
    elif group.get("ModelPackageGroupStatus") in GONE:
        raise AwsError(f"model package group {name} is {group['ModelPackageGroupStatus']}: it takes no new version; "
                       "register into another --group")
    else:
        log.info("model package group %s exists: adding a version", name)


def register(access: Access, *, training_job: str, group: str, image: str | None, image_tag: str,
             tags: Sequence[tuple[str, str]] = ()) -> int:
    """Register the model of `training_job` as a new version of `group` (created if missing), PendingManualApproval;
    print the version's ARN. Everything is read and checked before anything is created."""
    check_group_name(group)
    api = scripting.make_api(access)
    job = completed_job(api, training_job)
    serving = scripting.serving_image(api, image, image_tag)
    if not scripting.is_offline(api) and "@sha256:" not in serving:
        raise UserError(f"image {serving}: a version names its image by digest, and this URI has none: pass an "
                        "ECR image by tag (deploy.py's default, or --image <registry>/<repository>:<tag>), which is "
                        "resolved to its digest, or --image <repository>@sha256:<digest>")
    if job is None:  # a dry run without AWS access: the job's output cannot be read
        model_data = f"s3://<output of {training_job}>/model.tar.gz"
        body, metrics = None, {}
        log.warning("dry run without AWS access: %s of %s not read (register uploads it to %s)", METRICS_FILE,
                    training_job, metrics_uri(model_data))
    else:
        model_data = job["ModelArtifacts"]["S3ModelArtifacts"]
        body = read_metrics(api, job)
        metrics = json.loads(body)
    realtime, transform = supported_instance_types(api)
    request = package_request(group=group, training_job=training_job, job_arn=(job or {}).get("TrainingJobArn"),
                              image=serving, model_data=model_data, metrics_body=body, metrics=metrics,
                              realtime_types=realtime, transform_types=transform, tags=scripting.tags_from(tags))
    api.validate("sagemaker", "CreateModelPackage", request)  # before the group or the upload exist

    ensure_group(api, group, scripting.tags_from(tags))
    if body is not None:
        bucket, key = s3sync.parse_s3_uri(metrics_uri(model_data))
        api.call("s3", "PutObject", {"Bucket": bucket, "Key": key.rstrip("/"), "Body": body,
                                     "ContentType": "application/json"})
    answer = api.call("sagemaker", "CreateModelPackage", request)
    if not api.dry_run:
        log.info("%s registered as %s (%s): approve it with `register_model.py --approve %s`", training_job,
                 answer["ModelPackageArn"], PENDING, answer["ModelPackageArn"])
        print(answer["ModelPackageArn"])
    return EXIT_OK


def set_status(access: Access, arn: str, status: str, description: str | None = None) -> int:
    """Approve or reject the model package version `arn` (with `description` as the approval's reason); print its
    ARN. Only a version whose package is Completed can be approved."""
    flag = "--approve" if status == APPROVED else "--reject"
    check_package_arn(arn, flag)
    api = scripting.make_api(access)
    package = _existing(api, "DescribeModelPackage", {"ModelPackageName": arn}, f"model package {arn}",
                        "check the ARN (register_model.py printed it; `aws sagemaker list-model-packages "
                        "--model-package-group-name <group>` lists them)")
    if package is not None:
        state = package.get("ModelPackageStatus", "Completed")
        if status == APPROVED and state != "Completed":
            raise UserError(f"model package {arn} is {state}: only a Completed package can be approved")
        current = package.get("ModelApprovalStatus")
        if current == status and description in (None, package.get("ApprovalDescription")):
            log.info("model package %s is already %s", arn, status)
            print(arn)
            return EXIT_OK
    request: dict = {"ModelPackageArn": arn, "ModelApprovalStatus": status}
    if description is not None:
        request["ApprovalDescription"] = description
    api.call("sagemaker", "UpdateModelPackage", request)
    if not api.dry_run:
        log.info("model package %s: %s -> %s", arn, (package or {}).get("ModelApprovalStatus"), status)
        print(arn)
    return EXIT_OK
