"""scripts/register_model.py as a subprocess against a moto server (model package groups and versions, approval),
and offline dry runs: what a version names, and the clear errors before anything is created."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from imgclf import instances
from imgclf.aws import registry
from imgclf.aws.endpoints import ServingSpec
from imgclf.aws.transform import TransformSpec

from tests.aws_helpers import (
    ACCOUNT,
    ROLE,
    client,
    dry_run_requests,
    failed,
    offline_env,
    output_tarball,
    put_ecr_image,
    run_script,
    sagemaker_backend,
)

BUCKET, TAG = "dogs-registry", "registry-v1"
OUTPUT = f"s3://{BUCKET}/imgclf/output"
SERVE_REPOSITORY = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/imgclf-serve"
METRICS = {"best_epoch": 4, "test_accuracy": 0.8312, "test_loss": 0.61, "valid_accuracy": 0.85, "valid_loss": 0.55,
           "hyperparameters": {"model": "resnet18", "lr": 0.001}, "history": [{"epoch": 0, "valid_accuracy": 0.4}]}
GRAVITON = ("ml.c6g.large", "ml.m6g.large", "ml.r7gd.large", "ml.c8g.large")


def _training_job(endpoint: str, name: str, files: dict[str, bytes] | None) -> dict:
    """A Completed training job in moto (its model artifact <OUTPUT>/<name>/output/model.tar.gz), and its
    output.tar.gz holding `files` (None: no output.tar.gz at all)."""
    sm, s3 = client("sagemaker", endpoint), client("s3", endpoint)
    s3.create_bucket(Bucket=BUCKET)
    sm.create_training_job(
        TrainingJobName=name, RoleArn=f"arn:aws:iam::{ACCOUNT}:role/imgclf-sagemaker",
        AlgorithmSpecification={"TrainingImage": f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/imgclf-train-cpu:latest",
                                "TrainingInputMode": "File"},
        HyperParameters={"model": "resnet18"}, OutputDataConfig={"S3OutputPath": OUTPUT},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})
    if files is not None:
        s3.put_object(Bucket=BUCKET, Key=f"imgclf/output/{name}/output/output.tar.gz", Body=output_tarball(files))
    return sm.describe_training_job(TrainingJobName=name)


def _register(env: dict, job: str, group: str, *more: str):
    return run_script("register_model.py", "--training-job", job, "--group", group, "--image-tag", TAG, *more,
                      env=env)


@pytest.fixture(scope="module")
def serve_digest(moto_server) -> str:
    """The serving image as `make push` leaves it, tagged TAG: its digest."""
    return put_ecr_image(moto_server, "imgclf-serve", [TAG], layer="serve-registry")


def test_the_version_names_what_the_serving_image_accepts_and_where_it_runs():
    from imgclf.serving import inference

    assert registry.CONTENT_TYPES == inference.CONTENT_TYPES
    assert registry.RESPONSE_TYPES == (inference.JSON_TYPE,)
    result = run_script("register_model.py", "--training-job", "imgclf-resnet18-1", "--group", "dog-breeds",
                        "--region", "us-east-1", "--tag", "project=dogs", "--dry-run", env=offline_env())
    assert result.returncode == 0, failed(result)
    sent = dry_run_requests(result.stdout)  # each validated against botocore's model
    assert [s["operation"] for s in sent] == ["CreateModelPackageGroup", "CreateModelPackage"]
    assert all(line.startswith("{") for line in result.stdout.splitlines())  # no ARN: nothing was created
    group, package = (s["request"] for s in sent)
    assert group["ModelPackageGroupName"] == package["ModelPackageGroupName"] == "dog-breeds"
    assert group["Tags"] == package["Tags"] == [{"Key": "project", "Value": "dogs"}]
    assert package["ModelApprovalStatus"] == "PendingManualApproval"
    spec = package["InferenceSpecification"]
    assert spec["SupportedContentTypes"] == list(inference.CONTENT_TYPES)
    assert spec["SupportedResponseMIMETypes"] == ["application/json"]
    realtime, transform = spec["SupportedRealtimeInferenceInstanceTypes"], spec["SupportedTransformInstanceTypes"]
    # deploy.py's and batch_predict.py's defaults, and CPU x86 families only
    assert {ServingSpec.instance_type, "ml.c5.xlarge", "ml.t2.medium", "ml.r6i.large"} <= set(realtime)
    assert {TransformSpec.instance_type, "ml.c5.xlarge"} <= set(transform)
    for kind in realtime + transform:
        assert not instances.has_nvidia_gpus(kind), kind
        assert instances.family(kind) not in instances.UNSUPPORTED, kind  # Inferentia, Trainium, Gaudi, old GPUs
        assert not kind.startswith(("ml.g", "ml.p")), kind  # GPU families the table does not know yet
    assert not set(GRAVITON) & set(realtime)
    assert [registry.serves_on(t) for t in GRAVITON] == [False] * len(GRAVITON)
    assert not registry.serves_on("ml.inf2.xlarge") and not registry.serves_on("ml.g7e.2xlarge")
    assert registry.serves_on("ml.m7i.large")


def test_register_approve_and_reject_against_moto(aws_env, moto_server, serve_digest):
    sm, s3 = client("sagemaker", moto_server), client("s3", moto_server)
    body = json.dumps(METRICS).encode()
    job = _training_job(moto_server, "imgclf-registry-1", {"metrics.json": body, "confusion_matrix_test.csv": b"x"})

    first = _register(aws_env, job["TrainingJobName"], "dog-breeds-registry", "--tag", "project=dogs")
    assert first.returncode == 0, failed(first)
    arn = first.stdout.strip()
    assert registry.PACKAGE_ARN.fullmatch(arn) and arn.endswith(":model-package/dog-breeds-registry/1"), arn
    assert "model package group dog-breeds-registry created" in first.stderr
    package = sm.describe_model_package(ModelPackageName=arn)
    assert package["ModelApprovalStatus"] == "PendingManualApproval"
    assert package["ModelPackageGroupName"] == "dog-breeds-registry"
    [container] = package["InferenceSpecification"]["Containers"]
    assert container["Image"] == f"{SERVE_REPOSITORY}@{serve_digest}"  # by digest, not by tag
    assert container["ModelDataUrl"] == job["ModelArtifacts"]["S3ModelArtifacts"]
    assert package["InferenceSpecification"]["SupportedContentTypes"] == list(registry.CONTENT_TYPES)
    assert "ml.m5.large" in package["InferenceSpecification"]["SupportedRealtimeInferenceInstanceTypes"]
    assert "ml.m5.large" in package["InferenceSpecification"]["SupportedTransformInstanceTypes"]
    statistics = package["ModelMetrics"]["ModelQuality"]["Statistics"]
    assert statistics == {"ContentType": "application/json",
                          "S3Uri": f"{OUTPUT}/imgclf-registry-1/output/metrics.json",
                          "ContentDigest": "sha256:" + hashlib.sha256(body).hexdigest()}
    uploaded = s3.get_object(Bucket=BUCKET, Key="imgclf/output/imgclf-registry-1/output/metrics.json")
    assert uploaded["Body"].read() == body and uploaded["ContentType"] == "application/json"
    assert package["CustomerMetadataProperties"] == {
        "training-job": "imgclf-registry-1", "architecture": "resnet18", "test_accuracy": "0.8312",
        "test_loss": "0.6100", "valid_accuracy": "0.8500", "valid_loss": "0.5500", "best_epoch": "4"}
    assert package["ModelPackageDescription"].startswith("resnet18 trained by imgclf-registry-1: test_accuracy 0.8312")
    assert package["MetadataProperties"] == {"GeneratedBy": job["TrainingJobArn"]}
    group = sm.describe_model_package_group(ModelPackageGroupName="dog-breeds-registry")
    assert group["ModelPackageGroupStatus"] == "Completed"

    # A second job: the group is reused, the version is the next one.
    second_job = _training_job(moto_server, "imgclf-registry-2", {"metrics.json": body})
    second = _register(aws_env, second_job["TrainingJobName"], "dog-breeds-registry")
    assert second.returncode == 0, failed(second)
    assert "model package group dog-breeds-registry exists" in second.stderr
    second_arn = second.stdout.strip()
    assert second_arn.endswith(":model-package/dog-breeds-registry/2")
    groups = sm.list_model_package_groups(NameContains="dog-breeds-registry")["ModelPackageGroupSummaryList"]
    assert [g["ModelPackageGroupName"] for g in groups] == ["dog-breeds-registry"]
    versions = sm.list_model_packages(ModelPackageGroupName="dog-breeds-registry")["ModelPackageSummaryList"]
    assert sorted(v["ModelPackageArn"] for v in versions) == sorted([arn, second_arn])

    # A dry run with AWS access reads (the group exists), prints the upload and the version, creates nothing.
    dry = _register(aws_env, second_job["TrainingJobName"], "dog-breeds-registry", "--dry-run")
    assert dry.returncode == 0, failed(dry)
    assert [s["operation"] for s in dry_run_requests(dry.stdout)] == ["PutObject", "CreateModelPackage"]
    assert len(sm.list_model_packages(ModelPackageGroupName="dog-breeds-registry")["ModelPackageSummaryList"]) == 2

    # deploy.py serves a version only once it is Approved: before, it says why and creates nothing.
    deploy = ["--name", "dog-breeds-registry", "--model-package", arn, "--role", ROLE, "--poll-interval", "0.1"]
    pending = run_script("deploy.py", *deploy, env=aws_env)
    assert pending.returncode == 2, failed(pending)
    assert f"model package {arn} is PendingManualApproval" in pending.stderr and "--approve" in pending.stderr
    # (moto's ListModels ignores NameContains, and other tests share its server)
    assert not [m for m in sm.list_models()["Models"] if m["ModelName"].startswith("dog-breeds-registry")]

    approved = run_script("register_model.py", "--approve", arn, env=aws_env)
    assert approved.returncode == 0, failed(approved)
    # The version names the CPU serving image: a GPU instance would idle, so deploy.py refuses it.
    on_gpu = run_script("deploy.py", *deploy, "--instance-type", "ml.g5.xlarge", env=aws_env)
    assert on_gpu.returncode == 2 and "names the CPU serving image" in on_gpu.stderr, failed(on_gpu)
    deployed = run_script("deploy.py", *deploy, env=aws_env)
    assert deployed.returncode == 0, failed(deployed)
    config = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="dog-breeds-registry")["EndpointConfigName"])
    model = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelPackageName"] == arn and "Image" not in model["PrimaryContainer"]
    assert approved.stdout.strip() == arn
    assert sm.describe_model_package(ModelPackageName=arn)["ModelApprovalStatus"] == "Approved"
    again = run_script("register_model.py", "--approve", arn, env=aws_env)
    assert again.returncode == 0 and "already Approved" in again.stderr, failed(again)

    rejected = run_script("register_model.py", "--reject", second_arn, "--description", "valid accuracy too low",
                          env=aws_env)
    assert rejected.returncode == 0, failed(rejected)
    described = sm.describe_model_package(ModelPackageName=second_arn)
    assert (described["ModelApprovalStatus"], described["ApprovalDescription"]) == ("Rejected",
                                                                                     "valid accuracy too low")
    assert sm.describe_model_package(ModelPackageName=arn)["ModelApprovalStatus"] == "Approved"  # the other kept

    # Only a Completed package can be approved (SageMaker validates a version after it is created).
    sagemaker_backend().model_packages[second_arn].model_package_status = "Failed"
    refused = run_script("register_model.py", "--approve", second_arn, env=aws_env)
    assert refused.returncode == 2, failed(refused)
    assert f"model package {second_arn} is Failed: only a Completed package can be approved" in refused.stderr
    assert sm.describe_model_package(ModelPackageName=second_arn)["ModelApprovalStatus"] == "Rejected"


def _in_progress(endpoint: str, name: str) -> None:
    _training_job(endpoint, name, {"metrics.json": b"{}"})
    sagemaker_backend().training_jobs[name].training_job_status = "InProgress"


@pytest.mark.parametrize("case, make, args, code, messages", [
    ("missing job", None, [], 3, ["training job imgclf-registry-nope not found in us-east-1"]),
    ("unfinished job", _in_progress, [], 2, ["is InProgress: only a Completed job", "train.py --attach"]),
    ("image not pushed", {"metrics.json": b"{}"}, ["--image-tag", "never-pushed"], 3,
     ["imgclf-serve:never-pushed not found (ImageNotFoundException)", "make push"]),
    ("image without a digest", {"metrics.json": b"{}"}, ["--image", "registry.example.com/serve:1"], 2,
     ["a version names its image by digest"]),
    ("no output.tar.gz", "no-output", [], 3, ["its output.tar.gz could not be read"]),
    ("no metrics.json", {"rules.json": b"{}"}, [], 2, ["its output.tar.gz holds no metrics.json"]),
    ("metrics.json not JSON", {"metrics.json": b"epoch 1"}, [], 2, ["its metrics.json is not JSON"]),
    ("bad group name", {"metrics.json": b"{}"}, ["--group=-dogs"], 2, ["--group '-dogs': a model package group"]),
])
def test_register_refuses_with_the_reason_and_creates_nothing(aws_env, moto_server, serve_digest, case, make, args,
                                                              code, messages):
    name = "imgclf-registry-" + re.sub(r"\W+", "-", case)
    job = "imgclf-registry-nope" if make is None else name
    if callable(make):
        make(moto_server, name)
    elif make is not None:
        _training_job(moto_server, name, None if make == "no-output" else make)
    group = "refused-" + re.sub(r"\W+", "-", case)
    cmd = ["--training-job", job, "--group", group, "--image-tag", TAG, *args]
    result = run_script("register_model.py", *cmd, env=aws_env)
    assert result.returncode == code, failed(result)
    for message in messages:
        assert message in result.stderr, failed(result)
    assert "Traceback" not in result.stderr and not result.stdout.strip()
    groups = client("sagemaker", moto_server).list_model_package_groups()["ModelPackageGroupSummaryList"]
    assert not [g for g in groups if g["ModelPackageGroupName"].startswith("refused-")]


@pytest.mark.parametrize("args, code, message", [
    (["--approve", "arn:aws:sagemaker:us-east-1:123456789012:model-package/dog-breeds"], 2,
     "expected the ARN of a model package version"),
    (["--reject", "dog-breeds/1"], 2, "expected the ARN of a model package version"),
    (["--approve", f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/no-such-group/7"], 3,
     f"model package arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/no-such-group/7 not found"),
    (["--approve", f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/dog-breeds/1", "--group", "dog-breeds"], 2,
     "take the version's ARN only"),
    (["--training-job", "imgclf-x"], 2, "--training-job needs --group NAME"),
    (["--training-job", "imgclf-x", "--group", "g", "--description", "why"], 2, "--description goes with"),
    (["--group", "dog-breeds"], 2, "one of the arguments --training-job --approve --reject is required"),
])
def test_approval_flags_are_checked(aws_env, args, code, message):
    result = run_script("register_model.py", *args, env=aws_env)
    assert result.returncode == code, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr, failed(result)


def test_approval_dry_run_offline_prints_the_update():
    arn = f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:model-package/dog-breeds/3"
    result = run_script("register_model.py", "--reject", arn, "--description", "valid accuracy 0.61", "--dry-run",
                        env=offline_env())
    assert result.returncode == 0, failed(result)
    [sent] = dry_run_requests(result.stdout)
    assert (sent["operation"], sent["request"]) == ("UpdateModelPackage", {
        "ModelPackageArn": arn, "ModelApprovalStatus": "Rejected", "ApprovalDescription": "valid accuracy 0.61"})
