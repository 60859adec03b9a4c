"""docs/sdk.md's AWS blocks, run as written against a moto server: the requests the SageMaker SDK sends with the
project's metric definitions and search space are those the scripts send.

Every boto call the SDK makes is recorded (botocore's client is wrapped: the request still goes to moto, validated
against the service model) and compared with the scripts' own request builders (imgclf.aws.training,
imgclf.aws.transform): a drift between the schema and what the SDK sends fails here. moto stores no training job's
metric definitions (it answers its own), so the requests are read where they leave the SDK, not from moto.

The docs' Python blocks are named (`<!-- sdk-example: NAME -->` above the fence); `example_namespace` runs them in
order in one namespace, as a reader would. tests/images/test_sdk.py runs the local-mode blocks on the built images.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from unittest import mock

import pytest
from imgclf.aws.training import (
    JobSpec,
    metric_definitions,
    sdk_hyperparameter_ranges,
    training_job_request,
    tuning_job_request,
)
from imgclf.aws.transform import TransformSpec, transform_job_request
from imgclf.errors import HyperparameterError
from imgclf.search.space import DEFAULT_SEARCH_SPACE, parameter_ranges, static_hyperparameters

from tests.aws_helpers import REGION, client
from tests.conftest import REPO

DOC = REPO / "docs" / "sdk.md"
EXAMPLE = re.compile(r"<!--\s*sdk-example:\s*([\w-]+)\s*-->")
# The tests that run the blocks, by file: each name a block carries must be run by one of them.
RUNNERS = (REPO / "tests" / "images" / "test_sdk.py", Path(__file__))
# Telemetry off (the SDK would send it from a thread of its own): the SDK's user and admin configuration files.
SDK_CONFIG = "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"


def python_blocks() -> list[tuple[int, str | None, str]]:
    """(line of the opening fence, name or None, code) of every Python block of docs/sdk.md."""
    found, lines, i = [], DOC.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        if fence.group(2).lower() in ("python", "py", "python3"):
            previous = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            name = m.group(1) if (m := EXAMPLE.fullmatch(previous)) else None
            found.append((i + 1, name, "\n".join(lines[i + 1:end])))
        i = end + 1
    return found


def run_example(name: str, namespace: dict) -> dict:
    """Run the block named `name` in `namespace` (tracebacks point at docs/sdk.md's own lines); the namespace."""
    blocks = [(line, code) for line, n, code in python_blocks() if n == name]
    assert len(blocks) == 1, f"docs/sdk.md: {len(blocks)} blocks named {name!r}"
    line, code = blocks[0]
    exec(compile("\n" * line + code, str(DOC), "exec"), namespace)  # the docs' own code
    return namespace


def sdk_environment(home: Path) -> dict[str, str]:
    """HOME (the SDK's ~/.sagemaker/config.yaml) and the SDK's configuration files in `home`, telemetry off."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "sagemaker-config.yaml").write_text(SDK_CONFIG)
    return {"HOME": str(home), "SAGEMAKER_USER_CONFIG_OVERRIDE": str(home / "sagemaker-config.yaml"),
            "SAGEMAKER_ADMIN_CONFIG_OVERRIDE": str(home / "sagemaker-config.yaml")}


# ---- the docs' blocks are the tests' ------------------------------------------------------------------------


def test_every_python_block_of_docs_sdk_md_is_named_and_run_by_a_test():
    blocks = python_blocks()
    assert len(blocks) >= 8, "docs/sdk.md: its Python blocks were not found (fence or marker changed?)"
    unnamed = [line for line, name, _ in blocks if name is None]
    assert not unnamed, f"docs/sdk.md: Python blocks without <!-- sdk-example: NAME --> at lines {unnamed}"
    names = [name for _, name, _ in blocks]
    assert len(names) == len(set(names)), f"docs/sdk.md: a name is used twice: {names}"
    run = set()
    for runner in RUNNERS:  # the literal names passed to run_example in the test files
        for node in ast.walk(ast.parse(runner.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_example" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                run.add(node.args[0].value)
    assert set(names) <= run, f"docs/sdk.md blocks no test runs: {sorted(set(names) - run)}"
    assert run <= set(names), f"tests run blocks docs/sdk.md does not have: {sorted(run - set(names))}"


# ---- the AWS blocks against moto ----------------------------------------------------------------------------


@pytest.fixture
def sent(moto_server, tmp_path):
    """The SDK pointed at the moto server (dummy credentials, its configuration isolated); yields the list of the
    (service, operation, request) it sends, filled as the test runs the blocks."""
    import botocore.client

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
                # The SDK checks the role with iam:SimulatePrincipalPolicy, which moto does not implement.
                "SAGEMAKER_VALIDATE_ROLE": "false", **sdk_environment(tmp_path / "home")})
    calls: list[tuple[str, str, dict]] = []
    make_api_call = botocore.client.BaseClient._make_api_call

    def recording(self, operation, params):
        calls.append((self.meta.service_model.service_name, operation, params))
        return make_api_call(self, operation, params)

    with mock.patch.dict(os.environ, env, clear=True), \
            mock.patch.object(botocore.client.BaseClient, "_make_api_call", recording):
        client("s3", moto_server).create_bucket(Bucket="my-ml-bucket")
        yield calls


def request_of(calls: list[tuple[str, str, dict]], operation: str) -> dict:
    found = [params for _, op, params in calls if op == operation]
    assert len(found) == 1, f"{operation}: sent {len(found)} times; the SDK sent {[op for _, op, _ in calls]}"
    return found[0]


def scripts_job_spec(namespace: dict) -> JobSpec:
    """The JobSpec train.py and tune.py would build for what the docs' blocks ask for."""
    return JobSpec(image=namespace["TRAIN_IMAGE"], role_arn=namespace["ROLE"], output_path=namespace["OUTPUT"],
                   channels={s: f"{namespace['DATA']}/{s}" for s in ("train", "valid", "test")},
                   instance_type="ml.g5.xlarge", volume_gb=50, max_runtime_s=24 * 3600)


def channels_of(input_data_config: list[dict]) -> dict[str, str]:
    return {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in input_data_config}


def test_model_trainer_sends_the_projects_metric_definitions_and_hyperparameters(sent):
    ns = run_example("aws-train", run_example("aws-settings", {}))
    request = request_of(sent, "CreateTrainingJob")
    scripts = training_job_request("job", scripts_job_spec(ns), {"model": "vgg16", "pretrained": True, "epochs": 5})

    algorithm = request["AlgorithmSpecification"]
    assert algorithm["MetricDefinitions"] == scripts["AlgorithmSpecification"]["MetricDefinitions"]
    assert {m["Name"] for m in algorithm["MetricDefinitions"]} >= {"valid:accuracy", "valid:loss", "rules:issues"}
    assert algorithm["TrainingImage"] == ns["TRAIN_IMAGE"] and "ContainerEntrypoint" not in algorithm
    assert request["HyperParameters"] == scripts["HyperParameters"] == {
        "model": "vgg16", "pretrained": "true", "epochs": "5"}
    for key in ("RoleArn", "ResourceConfig", "StoppingCondition"):
        assert request[key] == scripts[key], key
    assert request["OutputDataConfig"]["S3OutputPath"] == scripts["OutputDataConfig"]["S3OutputPath"]
    assert channels_of(request["InputDataConfig"]) == channels_of(scripts["InputDataConfig"])
    assert request["TrainingJobName"].startswith("imgclf-")
    assert ns["training_job"].training_job_name == request["TrainingJobName"]  # moto holds the job


def test_hyperparameter_tuner_sends_tune_py_search_space_objective_and_metrics(sent):
    ns = run_example("aws-train", run_example("aws-settings", {}))
    run_example("aws-tune", ns)
    request = request_of(sent, "CreateHyperParameterTuningJob")
    static = static_hyperparameters(DEFAULT_SEARCH_SPACE, {"model": "vgg16", "pretrained": True})
    scripts = tuning_job_request("hpo", scripts_job_spec(ns), DEFAULT_SEARCH_SPACE, static)

    config, scripts_config = request["HyperParameterTuningJobConfig"], scripts["HyperParameterTuningJobConfig"]
    for key in ("ParameterRanges", "HyperParameterTuningJobObjective", "Strategy", "ResourceLimits",
                "TrainingJobEarlyStoppingType"):
        assert config[key] == scripts_config[key], key
    # The reference project's search: what the default space must stay, in SageMaker's form.
    assert config["ParameterRanges"] == {
        "ContinuousParameterRanges": [{"Name": "lr", "MinValue": "0.001", "MaxValue": "0.1",
                                       "ScalingType": "Logarithmic"}],
        "CategoricalParameterRanges": [{"Name": "batch-size", "Values": ["128", "256"]},
                                       {"Name": "epochs", "Values": ["5", "7", "10"]}]}
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "valid:accuracy"}

    definition, scripts_definition = request["TrainingJobDefinition"], scripts["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == metric_definitions() == \
        scripts_definition["AlgorithmSpecification"]["MetricDefinitions"]
    assert definition["StaticHyperParameters"] == scripts_definition["StaticHyperParameters"] == {
        "model": "vgg16", "pretrained": "true", "head-solver": "sgd"}
    for key in ("RoleArn", "ResourceConfig", "StoppingCondition"):
        assert definition[key] == scripts_definition[key], key
    assert channels_of(definition["InputDataConfig"]) == channels_of(scripts_definition["InputDataConfig"])
    assert ns["tuning_job_name"] == request["HyperParameterTuningJobName"]
    stored = client("sagemaker", os.environ["AWS_ENDPOINT_URL"]).describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=ns["tuning_job_name"])  # what moto received, over HTTP
    assert stored["HyperParameterTuningJobConfig"]["ParameterRanges"] == config["ParameterRanges"]


def test_transformer_sends_batch_predict_py_request_contract(sent):
    ns = run_example("aws-settings", {})
    client("sagemaker", os.environ["AWS_ENDPOINT_URL"]).create_model(
        ModelName="dog-breeds", ExecutionRoleArn=ns["ROLE"],
        PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/imgclf-serve:latest",
                          "ModelDataUrl": f"{ns['OUTPUT']}/job/output/model.tar.gz"})
    run_example("aws-batch", ns)
    request = request_of(sent, "CreateTransformJob")
    scripts = transform_job_request("batch", TransformSpec(model_name="dog-breeds", input_uri="s3://my-ml-bucket/photos",
                                                           output_uri=f"{ns['OUTPUT']}/batch"))
    for key in ("ModelName", "BatchStrategy", "MaxPayloadInMB", "TransformResources"):
        assert request[key] == scripts[key], key
    for key in ("ContentType", "SplitType", "DataSource"):
        assert request["TransformInput"][key] == scripts["TransformInput"][key], key
    assert request["TransformInput"].get("CompressionType", "None") == scripts["TransformInput"]["CompressionType"]
    assert request["TransformOutput"] == scripts["TransformOutput"]


# ---- what the docs' helpers give the SDK ------------------------------------------------------------------


def test_sdk_hyperparameter_ranges_are_the_schemas_and_refuse_what_it_refuses():
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    space = {**DEFAULT_SEARCH_SPACE, "batch-size": {"type": "integer", "min": 16, "max": 256, "scaling": "Linear"}}
    ranges = sdk_hyperparameter_ranges(space)
    assert isinstance(ranges["lr"], ContinuousParameter) and isinstance(ranges["epochs"], CategoricalParameter)
    assert isinstance(ranges["batch-size"], IntegerParameter)
    as_sent = {}
    for name, r in sorted(ranges.items()):
        as_sent.setdefault(f"{r.__name__}ParameterRanges", []).append(r.as_tuning_range(name))
    assert as_sent == parameter_ranges(space)
    with pytest.raises(HyperparameterError, match="lr: min 0.1 must be below max 0.01"):
        sdk_hyperparameter_ranges({"lr": {"type": "continuous", "min": 0.1, "max": 0.01}})
    with pytest.raises(HyperparameterError, match="learning-rate: unknown hyperparameter"):
        sdk_hyperparameter_ranges({"learning-rate": {"type": "continuous", "min": 0.1, "max": 1}})
