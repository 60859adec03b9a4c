"""The IAM policies in docs/iam/ allow every (action, resource) the scripts and their SageMaker jobs need with the
default names, judged as IAM judges them: Action and Resource (wildcards * and ?, NotAction / NotResource),
Condition against the request's context, and an explicit Deny over any Allow (issue 31, item 7).

The names come from the scripts themselves: the documented commands of docs/aws.md and docs/registry.md run as
offline dry runs (`--dry-run`, no credentials) and print their Create* requests, whose names and S3 locations give
the ARNs; repositories, the log group and where register_model.py uploads metrics.json come from imgclf.aws. Only
the names the user must type are fixed here, as the docs type them: the bucket, the execution role, the endpoint
name and the model package group.

The evaluator fails closed: a statement whose Condition names a key the request's context lacks never allows
(and a Deny with such a condition counts as denying); a condition operator it does not know is an error.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.aws_helpers import offline_env
from tests.conftest import REPO

IAM = REPO / "docs" / "iam"
ACCOUNT, REGION = "123456789012", "us-east-1"
# What a user types (docs/aws.md): BUCKET=my-ml-bucket, SAGEMAKER_ROLE=imgclf-sagemaker, deploy.py --name dog-breeds,
# upload_data.py dogImages s3://$BUCKET/dogImages, train.py --weights s3://$BUCKET/weights/vgg16.pth,
# deploy.py --data-capture s3://$BUCKET/capture, batch_predict.py --input s3://$BUCKET/dogImages/test;
# register_model.py --group dog-breeds (docs/registry.md).
BUCKET, ROLE, ENDPOINT, GROUP = "my-ml-bucket", "imgclf-sagemaker", "dog-breeds", "dog-breeds"
DATA, WEIGHTS, CAPTURE = f"s3://{BUCKET}/dogImages", f"s3://{BUCKET}/weights/vgg16.pth", f"s3://{BUCKET}/capture"
BATCH_INPUT = f"{DATA}/test"
PLACEHOLDERS = {"REGION": REGION, "ACCOUNT": ACCOUNT, "BUCKET": BUCKET}

# ---- the evaluator -------------------------------------------------------------------------------------------


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def like(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """IAM wildcard match: * any run of characters, ? one character, everything else literal."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.S | (re.I if ignore_case else 0)) is not None


# operator -> (negated, match(pattern, value)); a negated operator holds when no pattern matches.
OPERATORS = {"StringEquals": (False, str.__eq__), "StringNotEquals": (True, str.__eq__),
             "StringLike": (False, like), "StringNotLike": (True, like)}


def conditions_hold(condition: dict, context: dict[str, str]) -> bool | None:
    """Whether every condition holds for the context; None when the context lacks one of the keys."""
    context = {k.lower(): v for k, v in context.items()}  # condition key names are case-insensitive
    for operator, pairs in condition.items():
        if operator not in OPERATORS:
            raise ValueError(f"condition operator {operator} is not evaluated by this test: add it to OPERATORS")
        negated, match = OPERATORS[operator]
        for key, wanted in pairs.items():
            if key.lower() not in context:
                return None
            if any(match(w, context[key.lower()]) for w in as_list(wanted)) == negated:
                return False
    return True


def applies(statement: dict, action: str, resource: str, context: dict[str, str]) -> bool:
    if "Action" in statement:
        acts = any(like(a, action, ignore_case=True) for a in as_list(statement["Action"]))
    else:
        acts = not any(like(a, action, ignore_case=True) for a in as_list(statement["NotAction"]))
    if "Resource" in statement:
        on = any(like(r, resource) for r in as_list(statement["Resource"]))
    else:
        on = not any(like(r, resource) for r in as_list(statement["NotResource"]))
    if not (acts and on):
        return False
    held = conditions_hold(statement.get("Condition", {}), context)
    return held if held is not None else statement["Effect"] == "Deny"  # unknown context: fail closed


def decide(doc: dict, action: str, resource: str, context: dict[str, str] | None = None) -> str:
    """Allow, Deny (an explicit Deny applies) or NotAllowed (no Allow applies)."""
    effects = {s["Effect"] for s in as_list(doc["Statement"]) if applies(s, action, resource, context or {})}
    return "Deny" if "Deny" in effects else "Allow" if "Allow" in effects else "NotAllowed"


def policy(name: str) -> dict:
    """A policy of docs/iam/ with REGION, ACCOUNT and BUCKET in its resources filled in."""
    doc = json.loads((IAM / name).read_text())
    for s in as_list(doc["Statement"]):
        for key in ("Resource", "NotResource"):
            if key in s:
                s[key] = [re.sub(r"\b(REGION|ACCOUNT|BUCKET)\b", lambda m: PLACEHOLDERS[m[1]], r)
                          for r in as_list(s[key])]
    return doc


# ---- what the scripts need -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Need:
    who: str  # the script, or "SageMaker" for what a job or endpoint does with the execution role
    action: str
    resource: str
    context: dict = field(default_factory=dict, hash=False)  # the condition keys the request carries

    def __str__(self) -> str:
        return f"{self.who}: {self.action} on {self.resource}" + (f" with {self.context}" if self.context else "")


def dry_run(script: str, *args: str, cwd: Path) -> dict[str, dict]:
    """operation -> request of what a dry run (offline, no credentials) of the script printed."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args, "--dry-run"], cwd=cwd,
                            env=offline_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{script} --dry-run: exit {result.returncode}\n{result.stderr[-2000:]}"
    printed = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {p["operation"]: p["request"] for p in printed}


def arn(service: str, resource: str) -> str:
    if service == "s3":
        return f"arn:aws:s3:::{resource}"
    if service == "iam":
        return f"arn:aws:iam::{ACCOUNT}:{resource}"
    return f"arn:aws:{service}:{REGION}:{ACCOUNT}:{resource}"


def s3(uri: str) -> str:
    """s3://bucket/key -> its object ARN."""
    return arn("s3", uri.removeprefix("s3://"))


def key_of(uri: str) -> str:
    return uri.removeprefix("s3://").partition("/")[2]


def sm(kind: str, name: str) -> str:
    return arn("sagemaker", f"{kind}/{name.lower()}")  # SageMaker ARNs spell names in lower case


def registry_needs(job: str, model_tar: str, group: str, version: str, serve_repository: str) -> list[Need]:
    """register_model.py --training-job JOB --group GROUP (the job's output read, the image's digest, metrics.json
    uploaded beside the model, the group and a version), --approve/--reject ARN; deploy.py --model-package ARN
    reads the version."""
    from imgclf.aws.registry import metrics_uri

    def sagemaker(who: str, kind: str, name: str, *operations: str) -> list[Need]:
        return [Need(who, f"sagemaker:{op}", sm(kind, name)) for op in operations]

    return [
        *sagemaker("register_model.py", "training-job", job, "DescribeTrainingJob"),
        Need("register_model.py", "s3:GetObject", s3(model_tar.replace("model.tar.gz", "output.tar.gz"))),
        Need("register_model.py", "ecr:DescribeImages", serve_repository),
        Need("register_model.py", "s3:PutObject", s3(metrics_uri(model_tar))),
        # a version is made in its group: CreateModelPackage is allowed on both ARNs
        *sagemaker("register_model.py", "model-package-group", group, "DescribeModelPackageGroup",
                   "CreateModelPackageGroup", "AddTags", "CreateModelPackage"),
        *sagemaker("register_model.py", "model-package", version, "CreateModelPackage", "AddTags",
                   "DescribeModelPackage", "UpdateModelPackage"),
        *sagemaker("deploy.py --model-package", "model-package", version, "DescribeModelPackage"),
    ]


def needs(tmp: Path) -> dict[str, list[Need]]:
    """policy file -> what it must allow, from the documented commands' dry runs."""
    from imgclf.aws.images import REPOSITORIES
    from imgclf.aws.jobs import LOG_GROUP

    common = ["--role", ROLE, "--tag", "project=imgclf", "--region", REGION]
    train = dry_run("train.py", "--data", DATA, "--weights", WEIGHTS, "--spot", *common, cwd=tmp)["CreateTrainingJob"]
    tune = dry_run("tune.py", "--data", DATA, *common, cwd=tmp)["CreateHyperParameterTuningJob"]
    job = train["TrainingJobName"]
    model_tar = f"{train['OutputDataConfig']['S3OutputPath']}/{job}/output/model.tar.gz"
    deploy = dry_run("deploy.py", "--name", ENDPOINT, "--model-data", model_tar, "--data-capture", CAPTURE, *common,
                     cwd=tmp)
    batch = dry_run("batch_predict.py", "--input", BATCH_INPUT, "--model-data", model_tar, *common, cwd=tmp)
    transform = batch["CreateTransformJob"]
    batch_out = transform["TransformOutput"]["S3OutputPath"]
    model, config = deploy["CreateModel"]["ModelName"], deploy["CreateEndpointConfig"]["EndpointConfigName"]
    batch_model = batch["CreateModel"]["ModelName"]
    register = dry_run("register_model.py", "--training-job", job, "--group", GROUP, "--tag", "project=imgclf",
                       "--region", REGION, cwd=tmp)
    package_group = register["CreateModelPackageGroup"]["ModelPackageGroupName"]
    assert register["CreateModelPackage"]["ModelPackageGroupName"] == package_group == GROUP
    version = f"{package_group}/1"  # SageMaker's ARN of a version: model-package/<group>/<version>
    assert deploy["CreateModel"]["ExecutionRoleArn"].endswith(f":role/{ROLE}")
    assert deploy["CreateEndpoint"]["EndpointName"] == ENDPOINT

    bucket = arn("s3", BUCKET)
    role = arn("iam", f"role/{ROLE}")
    passed = {"iam:PassedToService": "sagemaker.amazonaws.com"}
    group = arn("logs", f"log-group:{LOG_GROUP}")
    repos = {kind: arn("ecr", f"repository/{name}") for kind, name in REPOSITORIES.items()}
    image = f"{DATA}/train/001.Affenpinscher/Affenpinscher_00001.jpg"
    endpoint = sm("endpoint", ENDPOINT)
    scalable = arn("application-autoscaling", "scalable-target/056abcd1234567890abcdef1234567890")
    alarm = arn("cloudwatch", f"alarm:TargetTracking-endpoint/{ENDPOINT}/variant/AllTraffic-AlarmHigh-1a2b3c")

    def sagemaker(who: str, kind: str, name: str, *operations: str) -> list[Need]:
        return [Need(who, f"sagemaker:{op}", sm(kind, name)) for op in operations]

    scripts = [
        # upload_data.py dogImages s3://$BUCKET/dogImages: HeadBucket, ListObjectsV2, HeadObject, PutObject
        Need("upload_data.py", "s3:ListBucket", bucket),
        Need("upload_data.py", "s3:ListBucket", bucket, {"s3:prefix": key_of(DATA) + "/"}),
        Need("upload_data.py", "s3:GetObject", s3(image)),
        Need("upload_data.py", "s3:PutObject", s3(image)),
        # train.py: create (tagged), wait, tail the log, fetch live and final reports
        Need("train.py", "iam:PassRole", role, passed),
        *sagemaker("train.py", "training-job", job, "CreateTrainingJob", "AddTags", "DescribeTrainingJob"),
        Need("train.py", "logs:DescribeLogStreams", group),
        Need("train.py", "logs:DescribeLogStreams", group + ":*"),
        Need("train.py", "logs:GetLogEvents", f"{group}:log-stream:{job}/algo-1-1700000000"),
        Need("train.py", "s3:ListBucket", bucket,
             {"s3:prefix": key_of(train["TensorBoardOutputConfig"]["S3OutputPath"]) + "/"}),
        Need("train.py", "s3:GetObject", s3(f"{train['TensorBoardOutputConfig']['S3OutputPath']}/rules.json")),
        Need("train.py", "s3:GetObject", s3(model_tar.replace("model.tar.gz", "output.tar.gz"))),
        # tune.py
        Need("tune.py", "iam:PassRole", role, passed),
        *sagemaker("tune.py", "hyper-parameter-tuning-job", tune["HyperParameterTuningJobName"],
                   "CreateHyperParameterTuningJob", "AddTags", "DescribeHyperParameterTuningJob"),
        # deploy.py --training-job / --model-data: the image by digest, model -> config -> endpoint, autoscaling
        *sagemaker("deploy.py", "training-job", job, "DescribeTrainingJob"),
        Need("deploy.py", "ecr:DescribeImages", repos["serve"]),
        Need("deploy.py", "iam:PassRole", role, passed),
        *sagemaker("deploy.py", "model", model, "DescribeModel", "CreateModel", "AddTags", "DeleteModel"),
        *sagemaker("deploy.py", "endpoint-config", config, "DescribeEndpointConfig", "CreateEndpointConfig",
                   "AddTags", "DeleteEndpointConfig"),
        *sagemaker("deploy.py", "endpoint", ENDPOINT, "DescribeEndpoint", "CreateEndpoint", "AddTags",
                   "UpdateEndpoint", "UpdateEndpointWeightsAndCapacities", "DeleteEndpoint"),
        Need("deploy.py", "sagemaker:ListModels", "*"),
        Need("deploy.py", "sagemaker:ListEndpointConfigs", "*"),
        *[Need("deploy.py", f"application-autoscaling:{op}", scalable)
          for op in ("RegisterScalableTarget", "DescribeScalableTargets", "PutScalingPolicy", "DescribeScalingPolicies",
                     "DeleteScalingPolicy", "DeregisterScalableTarget")],
        *[Need("deploy.py", f"cloudwatch:{op}", alarm) for op in ("PutMetricAlarm", "DescribeAlarms", "DeleteAlarms")],
        Need("deploy.py", "iam:CreateServiceLinkedRole",
             arn("iam", "role/aws-service-role/sagemaker.application-autoscaling.amazonaws.com/"
                        "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint"),
             {"iam:AWSServiceName": "sagemaker.application-autoscaling.amazonaws.com"}),
        # predict.py --endpoint dog-breeds
        Need("predict.py", "sagemaker:InvokeEndpoint", endpoint),
        # batch_predict.py: the model as deploy.py makes it, the transform job, its answers, summary.csv
        *sagemaker("batch_predict.py", "training-job", job, "DescribeTrainingJob"),
        Need("batch_predict.py", "ecr:DescribeImages", repos["serve"]),
        Need("batch_predict.py", "iam:PassRole", role, passed),
        *sagemaker("batch_predict.py", "model", batch_model, "DescribeModel", "CreateModel", "AddTags"),
        *sagemaker("batch_predict.py", "transform-job", transform["TransformJobName"], "CreateTransformJob",
                   "AddTags", "DescribeTransformJob"),
        Need("batch_predict.py", "s3:ListBucket", bucket, {"s3:prefix": key_of(batch_out) + "/"}),
        Need("batch_predict.py", "s3:GetObject", s3(f"{batch_out}/Affenpinscher_00001.jpg.out")),
        Need("batch_predict.py", "s3:PutObject", s3(f"{batch_out}/summary.csv")),
        *registry_needs(job, model_tar, package_group, version, repos["serve"]),
    ]
    push = [Need("push_images.py", "ecr:GetAuthorizationToken", "*")] + [
        Need("push_images.py", f"ecr:{op}", repo) for repo in repos.values()
        for op in ("CreateRepository", "TagResource", "PutImageScanningConfiguration", "PutLifecyclePolicy",
                   "BatchCheckLayerAvailability", "InitiateLayerUpload", "UploadLayerPart", "CompleteLayerUpload",
                   "PutImage", "BatchGetImage", "GetDownloadUrlForLayer", "DescribeImages",
                   "DescribeImageScanFindings")]
    checkpoints, tensorboard = train["CheckpointConfig"]["S3Uri"], train["TensorBoardOutputConfig"]["S3OutputPath"]
    tuned = f"{tune['HyperParameterTuningJobName']}-001-0123abcd"  # SageMaker's name for a tuning job's jobs
    execution = [Need("SageMaker", "ecr:GetAuthorizationToken", "*")] + [
        Need("SageMaker", f"ecr:{op}", repo) for repo in repos.values()
        for op in ("BatchGetImage", "GetDownloadUrlForLayer", "BatchCheckLayerAvailability")] + [
        *[Need("SageMaker", "s3:ListBucket", bucket, {"s3:prefix": key_of(uri)})
          for uri in (train["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"], WEIGHTS,
                      BATCH_INPUT + "/", model_tar)],
        *[Need("SageMaker", "s3:GetObject", s3(uri))
          for uri in (image, WEIGHTS, f"{BATCH_INPUT}/001.Affenpinscher/Affenpinscher_00023.jpg", model_tar,
                      f"{checkpoints}/last.pt")],
        *[Need("SageMaker", "s3:PutObject", s3(uri))
          for uri in (model_tar, model_tar.replace("model.tar.gz", "output.tar.gz"), f"{checkpoints}/last.pt",
                      f"{tensorboard}/rules.json", f"{train['OutputDataConfig']['S3OutputPath']}/{tuned}/output/"
                      "model.tar.gz", f"{batch_out}/001.Affenpinscher/Affenpinscher_00023.jpg.out",
                      f"{CAPTURE}/{ENDPOINT}/AllTraffic/2026/01/01/12/capture.jsonl")],
        Need("SageMaker", "s3:DeleteObject", s3(f"{checkpoints}/last.pt")),
        *[Need("SageMaker", f"logs:{op}", arn("logs", f"log-group:{name}{stream}"))
          for name in (LOG_GROUP, f"/aws/sagemaker/Endpoints/{ENDPOINT}", "/aws/sagemaker/TransformJobs")
          for op, stream in (("CreateLogGroup", ""), ("DescribeLogStreams", ":*"),
                             ("CreateLogStream", f":log-stream:{job}/algo-1-1700000000"),
                             ("PutLogEvents", f":log-stream:{job}/algo-1-1700000000"))],
        Need("SageMaker", "cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": LOG_GROUP}),
        *[Need("SageMaker (rules-stop)", "sagemaker:StopTrainingJob", sm("training-job", name))
          for name in (job, tuned)],
        # a canary or linear rollout: SageMaker reads deploy.py's --rollback-alarm alarms with the execution role
        Need("SageMaker (rollout)", "cloudwatch:DescribeAlarms", arn("cloudwatch", f"alarm:{ENDPOINT}-5xx")),
    ]
    return {"scripts-policy.json": scripts, "push-images-policy.json": push, "execution-role-policy.json": execution}


@pytest.fixture(scope="module")
def required(tmp_path_factory) -> dict[str, list[Need]]:
    return needs(tmp_path_factory.mktemp("iam-dry-runs"))


def refused(doc: dict, wanted: list[Need]) -> list[str]:
    return [f"{n} -> {verdict}" for n in wanted if (verdict := decide(doc, n.action, n.resource, n.context)) != "Allow"]


# ---- the tests -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["scripts-policy.json", "push-images-policy.json", "execution-role-policy.json"])
def test_policy_allows_what_the_scripts_do_with_their_default_names(name, required):
    missing = refused(policy(name), required[name])
    assert not missing, f"{name} does not allow:\n" + "\n".join(missing)


def test_the_evaluator_scopes_resources_honours_conditions_and_deny():
    doc = {"Statement": [
        {"Effect": "Allow", "Action": "sagemaker:Describe*", "Resource": "arn:aws:sagemaker:*:*:endpoint/dog-?reeds"},
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": "*",
         "Condition": {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}},
        {"Effect": "Allow", "NotAction": ["s3:Delete*", "sagemaker:*", "iam:*"],
         "NotResource": "arn:aws:s3:::secret/*"},
        {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::b/locked/*"},
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "*",
         "Condition": {"StringNotLike": {"aws:PrincipalTag/team": "ml-*"}}}]}
    endpoint = "arn:aws:sagemaker:us-east-1:1:endpoint/dog-breeds"
    assert decide(doc, "SageMaker:describeEndpoint", endpoint) == "Allow"  # actions ignore case, ARNs do not
    assert decide(doc, "sagemaker:DescribeEndpoint", endpoint.replace("dog", "Dog")) == "NotAllowed"
    assert decide(doc, "sagemaker:DescribeEndpoint", endpoint + "-2") == "NotAllowed"  # ? is one character
    assert decide(doc, "sagemaker:DescribeEndpoint", endpoint.replace("breeds", "b.reeds")) == "NotAllowed"
    role, to = "arn:aws:iam::1:role/r", "iam:PassedToService"
    assert decide(doc, "iam:PassRole", role, {to: "sagemaker.amazonaws.com"}) == "Allow"
    assert decide(doc, "iam:PassRole", role, {to: "ec2.amazonaws.com"}) == "NotAllowed"
    assert decide(doc, "iam:PassRole", role) == "NotAllowed"  # the key is missing: fail closed
    assert decide(doc, "s3:PutObject", "arn:aws:s3:::b/open/x") == "Allow"  # NotAction / NotResource
    assert decide(doc, "s3:DeleteObject", "arn:aws:s3:::b/open/x") == "NotAllowed"
    assert decide(doc, "s3:PutObject", "arn:aws:s3:::secret/x") == "NotAllowed"
    assert decide(doc, "s3:PutObject", "arn:aws:s3:::b/locked/x") == "Deny"  # Deny beats the Allow above
    team = "aws:PrincipalTag/team"
    assert decide(doc, "s3:GetObject", "arn:aws:s3:::b/x", {team: "ml-vision"}) == "Allow"
    assert decide(doc, "s3:GetObject", "arn:aws:s3:::b/x", {team: "web"}) == "Deny"
    assert decide(doc, "s3:GetObject", "arn:aws:s3:::b/x") == "Deny"  # a Deny that cannot be judged denies
    with pytest.raises(ValueError, match="NumericLessThan"):
        decide({"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*",
                               "Condition": {"NumericLessThan": {"s3:max-keys": "10"}}}]}, "s3:ListBucket", "*")


def test_policies_use_only_the_condition_operators_evaluated_here():
    for path in sorted(IAM.glob("*.json")):
        for s in as_list(json.loads(path.read_text())["Statement"]):
            assert set(s.get("Condition", {})) <= set(OPERATORS), f"{path.name}: {s.get('Sid')}: {s['Condition']}"


def _statement(doc: dict, sid: str) -> dict:
    return next(s for s in doc["Statement"] if s.get("Sid") == sid)


def _narrow(sid: str, old: str, new: str):
    def change(doc: dict) -> None:
        s = _statement(doc, sid)
        s["Resource"] = [r.replace(old, new) for r in as_list(s["Resource"])]
    return change


def _deny(action: str, resource: str):
    def change(doc: dict) -> None:
        doc["Statement"].append({"Effect": "Deny", "Action": action, "Resource": resource})
    return change


def _condition(sid: str, condition: dict):
    def change(doc: dict) -> None:
        _statement(doc, sid)["Condition"] = condition
    return change


# Broken variants of scripts-policy.json: (what changes, the change, an action the scripts then lose). The old
# test_docs check (action only, resource "*", no Condition, no Deny) passes every one of them.
BROKEN = {
    "training jobs scoped to the tuning prefix": (_narrow("Jobs", "training-job/imgclf-*", "training-job/imgclf-hpo-*"),
                                                  "sagemaker:CreateTrainingJob"),
    "endpoint name misspelt": (_narrow("Serving", "endpoint/dog-breeds", "endpoint/dog-breed"),
                               "sagemaker:InvokeEndpoint"),
    "batch answers without the /*": (_narrow("BatchAnswersAndSummary", "imgclf/batch/*", "imgclf/batch"),
                                     "s3:PutObject"),
    "uploads to another bucket": (_narrow("UploadData", "my-ml-bucket", "other-bucket"), "s3:PutObject"),
    "serving image of another repository": (_narrow("ServingImageDigest", "imgclf-serve", "imgclf-train-cpu"),
                                            "ecr:DescribeImages"),
    "log streams missing (group ARN only)": (_narrow("TrainingLogs", "TrainingJobs:*", "TrainingJobs"),
                                             "logs:GetLogEvents"),
    "role passed to EC2 only": (_condition("PassRoleToSageMakerOnly",
                                           {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}),
                                "iam:PassRole"),
    "role passed only with a tag the request lacks": (_condition("PassRoleToSageMakerOnly",
                                                                 {"StringEquals": {"aws:RequestTag/team": "ml"}}),
                                                      "iam:PassRole"),
    "explicit Deny on deleting endpoints": (_deny("sagemaker:Delete*", "arn:aws:sagemaker:*:*:endpoint/*"),
                                            "sagemaker:DeleteEndpoint"),
    "model package group misspelt": (_narrow("ModelRegistry", "model-package-group/dog-breeds*",
                                             "model-package-group/dog-breed-*"), "sagemaker:CreateModelPackageGroup"),
    "versions of another group": (_narrow("ModelRegistry", "model-package/dog-breeds*/*", "model-package/dogs*/*"),
                                  "sagemaker:UpdateModelPackage"),
    "metrics uploaded into the output archive only": (_narrow("RegistryMetrics", "metrics.json", "output.tar.gz"),
                                                      "s3:PutObject"),
}


@pytest.mark.parametrize("variant", BROKEN)
def test_a_broken_scripts_policy_is_refused(variant, required):
    change, lost = BROKEN[variant]
    doc = copy.deepcopy(policy("scripts-policy.json"))
    change(doc)
    missing = refused(doc, required["scripts-policy.json"])
    assert any(f": {lost} on " in m for m in missing), f"{variant}: {lost} still allowed; refused: {missing}"
    assert not refused(policy("scripts-policy.json"), required["scripts-policy.json"])  # the change, not the policy


def _without(doc: dict, sid: str) -> dict:
    return {**doc, "Statement": [s for s in as_list(doc["Statement"]) if s.get("Sid") != sid]}


def test_the_registry_statements_allow_what_registering_uses_and_nothing_wider(required):
    """ModelRegistry grants exactly the actions that register_model.py and deploy.py --model-package call, on the
    documented group and its versions only, and no other statement grants them; RegistryMetrics lets
    register_model.py write metrics.json beside a job's model, and nothing else there."""
    doc = policy("scripts-policy.json")
    uses = [n for n in required["scripts-policy.json"] if ":model-package" in n.resource]
    registry = _statement(doc, "ModelRegistry")
    assert sorted(as_list(registry["Action"])) == sorted({n.action for n in uses})
    for pattern in as_list(registry["Resource"]):
        assert any(like(pattern, n.resource) for n in uses), f"ModelRegistry: no call needs {pattern}"
    assert refused(_without(doc, "ModelRegistry"), uses) == [f"{n} -> NotAllowed" for n in uses]
    for action in as_list(registry["Action"]):
        for other in (sm("model-package-group", "other-group"), sm("model-package", "other-group/1"),
                      sm("model-package", GROUP)):  # an unversioned package is not a version of the group
            assert decide(doc, action, other) == "NotAllowed", f"{action} on {other}"
    only_here = set(as_list(registry["Action"])) - {"sagemaker:AddTags"}  # AddTags: also jobs and endpoints
    for name in ("scripts-policy.json", "push-images-policy.json", "execution-role-policy.json"):
        for s in as_list(policy(name)["Statement"]):
            if s.get("Sid") != "ModelRegistry":
                granted = [a for a in only_here for pattern in as_list(s.get("Action", []))
                           if like(pattern, a, ignore_case=True)]
                assert not granted and "NotAction" not in s, f"{name}: {s.get('Sid')} also grants {granted}"

    [upload] = [n for n in required["scripts-policy.json"]
                if n.action == "s3:PutObject" and n.resource.endswith("/metrics.json")]
    assert as_list(_statement(doc, "RegistryMetrics")["Action"]) == ["s3:PutObject"]
    assert decide(_without(doc, "RegistryMetrics"), upload.action, upload.resource) == "NotAllowed"
    for neighbour in ("output/model.tar.gz", "output/output.tar.gz", "checkpoints/last.pt"):
        target = upload.resource.replace("output/metrics.json", neighbour)
        assert decide(doc, "s3:PutObject", target) == "NotAllowed", f"s3:PutObject on {target}"
