"""scripts/deploy.py as a subprocess against a moto server: create, no-op, update, autoscaling, delete."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from imgclf.aws.images import image_tag_default
from moto.core.responses import ActionResult
from moto.sagemaker.responses import SageMakerResponse

from tests.aws_helpers import (
    ACCOUNT,
    REGION,
    ROLE,
    SCRIPTS,
    client,
    dry_run_requests,
    failed,
    offline_env,
    put_ecr_image,
    run_script,
    sagemaker_backend,
)

MODEL_DATA = "s3://dogs-deploy/imgclf/output/job-1/output/model.tar.gz"
SERVE_REPOSITORY = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/imgclf-serve"
# What each UpdateEndpoint asked for, and whether autoscaling was registered while SageMaker received it.
UPDATES: list[dict] = []


def _scaling_registered(endpoint: str) -> bool:
    from moto.applicationautoscaling.models import applicationautoscaling_backends

    targets = applicationautoscaling_backends[ACCOUNT][REGION].targets.get("sagemaker:variant:DesiredInstanceCount", {})
    return f"endpoint/{endpoint}/variant/AllTraffic" in targets


def _update_endpoint(self) -> ActionResult:
    """UpdateEndpoint, which moto 5.2.5 lacks: switch the config and start "Updating", as SageMaker does."""
    backend = self.sagemaker_backend
    endpoint = backend.endpoints[self._get_param("EndpointName")]
    UPDATES.append({"request": dict(self._get_params()),
                    "scaling_registered": _scaling_registered(self._get_param("EndpointName"))})
    config = backend.describe_endpoint_config(self._get_param("EndpointConfigName"))
    endpoint.endpoint_config_name = config["EndpointConfigName"]
    endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
    endpoint.endpoint_status = "Updating"
    return ActionResult({"EndpointArn": endpoint.arn})


@pytest.fixture(scope="module", autouse=True)
def moto_update_endpoint():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SageMakerResponse, "update_endpoint", _update_endpoint, raising=False)
        yield


@pytest.fixture(scope="module", autouse=True)
def serve_image(moto_server) -> str:
    """The serving image as `make push` leaves it: tagged with this checkout's git sha and latest. Its digest."""
    return put_ecr_image(moto_server, "imgclf-serve", [image_tag_default(), "latest"], layer="serve-v1")


def deploy_until(args: list[str], env: dict, text: str, then) -> subprocess.CompletedProcess:
    """Run deploy.py; when a stderr line contains `text`, call `then()` (e.g. finish the update)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "deploy.py"), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            then()
            break
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(seen) + stderr)


def test_create_keep_update_autoscale_delete(aws_env, moto_server, serve_image):
    sm = client("sagemaker", moto_server)
    base = ["--name", "dog-breeds", "--model-data", MODEL_DATA, "--role", "imgclf-sagemaker", "--workers", "2",
            "--top-k", "3", "--poll-interval", "0.1"]

    created = run_script("deploy.py", *base, env=aws_env)
    assert created.returncode == 0, failed(created)
    assert created.stdout.strip() == "dog-breeds"
    endpoint = sm.describe_endpoint(EndpointName="dog-breeds")
    assert endpoint["EndpointStatus"] == "InService"
    first_config = endpoint["EndpointConfigName"]
    config = sm.describe_endpoint_config(EndpointConfigName=first_config)
    [variant] = config["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.m5.large", 1)
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["Image"] == f"{SERVE_REPOSITORY}@{serve_image}"  # by digest
    assert model["PrimaryContainer"]["ModelDataUrl"] == MODEL_DATA
    assert model["PrimaryContainer"]["Environment"] == {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "IMGCLF_TOP_K": "3"}
    assert model["ExecutionRoleArn"] == ROLE

    # The same inputs give the same names: nothing is created or updated.
    again = run_script("deploy.py", *base, env=aws_env)
    assert again.returncode == 0, failed(again)
    assert "nothing to update" in again.stderr
    assert sm.describe_endpoint(EndpointName="dog-breeds")["EndpointConfigName"] == first_config

    # A changed fleet: a new config, UpdateEndpoint, wait for InService, then autoscaling.
    backend = sagemaker_backend()
    updated = deploy_until(
        [*base, "--instance-count", "2", "--instance-type", "ml.c5.xlarge", "--autoscale-min", "2",
         "--autoscale-max", "5", "--autoscale-target", "250"], aws_env, "dog-breeds: Updating",
        lambda: setattr(backend.endpoints["dog-breeds"], "endpoint_status", "InService"))
    assert updated.returncode == 0, failed(updated)
    endpoint = sm.describe_endpoint(EndpointName="dog-breeds")
    assert endpoint["EndpointConfigName"] not in (first_config,)
    [variant] = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])["ProductionVariants"]
    assert (variant["InstanceType"], variant["InitialInstanceCount"]) == ("ml.c5.xlarge", 2)
    scaling = client("application-autoscaling", moto_server)
    [target] = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (
        "endpoint/dog-breeds/variant/AllTraffic", 2, 5)
    [policy] = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 250.0
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == (
        "SageMakerVariantInvocationsPerInstance")

    # A new artifact on the same instance type: updated in place, its autoscaling kept as it was (only an
    # instance-type change lifts and restores it: see test_instance_type_change_lifts_autoscaling_...).
    new_data = MODEL_DATA.replace("job-1", "job-2")
    redeployed = deploy_until(
        [*base[:3], new_data, *base[4:], "--instance-count", "2", "--instance-type", "ml.c5.xlarge"], aws_env,
        "dog-breeds: Updating", lambda: setattr(backend.endpoints["dog-breeds"], "endpoint_status", "InService"))
    assert redeployed.returncode == 0, failed(redeployed)
    [target] = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 5)

    deleted = run_script("deploy.py", "--name", "dog-breeds", "--delete", env=aws_env)
    assert deleted.returncode == 0, failed(deleted)
    # (other tests share the moto server: only this endpoint's resources count, dog-breeds-<hash>)
    ours = re.compile(r"dog-breeds(-[0-9a-f]{8})?").fullmatch
    assert not [e for e in sm.list_endpoints()["Endpoints"] if ours(e["EndpointName"])]
    assert not [c for c in sm.list_endpoint_configs()["EndpointConfigs"] if ours(c["EndpointConfigName"])]
    assert not [m for m in sm.list_models()["Models"] if ours(m["ModelName"])]
    assert not [t for t in scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
                if t["ResourceId"].startswith("endpoint/dog-breeds/")]

    missing = run_script("deploy.py", "--name", "dog-breeds", "--delete", env=aws_env)
    assert missing.returncode == 3, failed(missing)
    assert "endpoint dog-breeds not found" in missing.stderr


def test_failed_update_that_rolls_back_exits_1(aws_env, moto_server):
    base = ["--name", "rollback-test", "--model-data", MODEL_DATA, "--role", ROLE, "--poll-interval", "0.1"]
    assert run_script("deploy.py", *base, env=aws_env).returncode == 0
    backend = sagemaker_backend()
    old_config = backend.endpoints["rollback-test"].endpoint_config_name

    def roll_back():
        endpoint = backend.endpoints["rollback-test"]
        endpoint.endpoint_config_name, endpoint.endpoint_status = old_config, "InService"
        endpoint.failure_reason = "The primary container for production variant AllTraffic did not pass the ping"

    result = deploy_until([*base, "--top-k", "7"], aws_env, "rollback-test: Updating", roll_back)
    assert result.returncode == 1, failed(result)
    assert f"rolled back to {old_config}: The primary container" in result.stderr


def test_deploy_from_a_training_job_and_serverless(aws_env, moto_server):
    job = run_script("train.py", "--data", "s3://dogs-deploy/data", "--role", ROLE, "--job-name", "deploy-src",
                     "--no-wait", env=aws_env)
    assert job.returncode == 0, failed(job)
    result = run_script("deploy.py", "--name", "serverless-dogs", "--training-job", "deploy-src", "--role", ROLE,
                        "--serverless-memory", "4096", "--serverless-concurrency", "10", "--poll-interval", "0.1",
                        env=aws_env)
    assert result.returncode == 0, failed(result)
    sm = client("sagemaker", moto_server)
    config = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="serverless-dogs")["EndpointConfigName"])
    [variant] = config["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 10}
    assert not config.get("DataCaptureConfig")  # moto answers {} when there is none
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["ModelDataUrl"] == "s3://dogs-deploy/imgclf/output/deploy-src/output/model.tar.gz"


def test_dry_run_offline_prints_validated_requests_and_names_are_deterministic():
    args = ["--name", "dog-breeds", "--model-data", MODEL_DATA, "--role", ROLE, "--dry-run", "--autoscale-max", "3"]
    first = run_script("deploy.py", *args, env=offline_env())
    assert first.returncode == 0, failed(first)
    requests = dry_run_requests(first.stdout)
    assert [r["operation"] for r in requests] == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint",
                                                  "RegisterScalableTarget", "PutScalingPolicy"]
    model_name = requests[0]["request"]["ModelName"]
    assert model_name.startswith("dog-breeds-") and len(model_name) == len("dog-breeds-") + 8
    assert requests[1]["request"]["ProductionVariants"][0]["ModelName"] == model_name
    assert [r["request"] for r in dry_run_requests(run_script("deploy.py", *args, env=offline_env()).stdout)] == [
        r["request"] for r in requests]
    changed = dry_run_requests(run_script("deploy.py", *args, "--top-k", "2", env=offline_env()).stdout)
    assert changed[0]["request"]["ModelName"] != model_name

    delete = run_script("deploy.py", "--name", "dog-breeds", "--delete", "--dry-run", env=offline_env())
    assert delete.returncode == 0, failed(delete)
    assert [r["operation"] for r in dry_run_requests(delete.stdout)] == ["DeleteEndpoint"]


@pytest.mark.parametrize("args, message", [
    (["--model-data", "s3://b/model.zip"], "expected s3://.../model.tar.gz"),
    (["--model-data", MODEL_DATA, "--serverless-memory", "1000"], "serverless memory 1000 MB"),
    (["--model-data", MODEL_DATA, "--serverless-memory", "2048", "--autoscale-max", "3"], "serverless endpoints"),
    (["--model-data", MODEL_DATA, "--autoscale-min", "3", "--autoscale-max", "2"], "min (3) <= max (2)"),
    (["--model-data", MODEL_DATA, "--serverless-memory", "2048", "--data-capture", "s3://b/capture"],
     "data capture is not available on serverless endpoints"),
    ([], "no model: pass --model-data"),
])
def test_bad_deploy_input_exits_2(args, message):
    result = run_script("deploy.py", "--name", "dog-breeds", "--role", ROLE, "--dry-run", *args, env=offline_env())
    assert result.returncode == 2, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr


def autoscaled_endpoint(name: str, aws_env: dict, *extra: str) -> list[str]:
    """An InService endpoint on 2 ml.c5.xlarge, autoscaled 2-5 at 250; returns the base flags."""
    base = ["--name", name, "--model-data", MODEL_DATA, "--role", ROLE, "--poll-interval", "0.1",
            "--instance-type", "ml.c5.xlarge", "--instance-count", "2", *extra]
    created = run_script("deploy.py", *base, "--autoscale-min", "2", "--autoscale-max", "5", "--autoscale-target",
                         "250", env=aws_env)
    assert created.returncode == 0, failed(created)
    assert _scaling_registered(name)
    return base


def scaling_of(moto_server: str, name: str) -> tuple[int, int, float] | None:
    scaling = client("application-autoscaling", moto_server)
    resource = f"endpoint/{name}/variant/AllTraffic"
    targets = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])["ScalableTargets"]
    policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]
    if not targets or not policies:
        return None
    return (targets[0]["MinCapacity"], targets[0]["MaxCapacity"],
            policies[0]["TargetTrackingScalingPolicyConfiguration"]["TargetValue"])


def test_new_model_on_an_autoscaled_endpoint_keeps_autoscaling_and_the_instance_count(aws_env, moto_server):
    base = autoscaled_endpoint("keep-scaling", aws_env)
    backend = sagemaker_backend()
    UPDATES.clear()
    new_model = [*base[:3], MODEL_DATA.replace("job-1", "job-9"), *base[4:]]
    result = deploy_until(new_model, aws_env, "keep-scaling: Updating",
                          lambda: setattr(backend.endpoints["keep-scaling"], "endpoint_status", "InService"))
    assert result.returncode == 0, failed(result)
    [update] = UPDATES
    # SageMaker allows a new model under autoscaling: it stays registered, and the variant keeps the instance count
    # autoscaling chose (RetainAllVariantProperties) while the new config's data capture settings apply.
    assert update["scaling_registered"], "autoscaling was lifted for a model-only update"
    assert update["request"]["RetainAllVariantProperties"] is True
    assert update["request"]["ExcludeRetainedVariantProperties"] == [{"VariantPropertyType": "DataCaptureConfig"}]
    assert scaling_of(moto_server, "keep-scaling") == (2, 5, 250.0)


def test_instance_type_change_lifts_autoscaling_and_restores_it_on_timeout_and_rollback(aws_env, moto_server):
    base = autoscaled_endpoint("lift-scaling", aws_env)
    backend = sagemaker_backend()
    bigger = [*base, "--instance-type", "ml.c5.2xlarge"]

    # --no-wait cannot register autoscaling after the update: refused before anything changes.
    models = len(client("sagemaker", moto_server).list_models()["Models"])
    refused = run_script("deploy.py", *bigger, "--no-wait", env=aws_env)
    assert refused.returncode == 2, failed(refused)
    assert "drop --no-wait" in refused.stderr
    assert len(client("sagemaker", moto_server).list_models()["Models"]) == models
    assert scaling_of(moto_server, "lift-scaling") == (2, 5, 250.0)

    # The update outlasts --timeout: exit 4, and autoscaling is registered again all the same.
    UPDATES.clear()
    timed_out = run_script("deploy.py", *bigger, "--timeout", "0.5", env=aws_env)
    assert timed_out.returncode == 4, failed(timed_out)
    [update] = UPDATES
    assert not update["scaling_registered"], "SageMaker refuses an instance type change under autoscaling"
    assert scaling_of(moto_server, "lift-scaling") == (2, 5, 250.0)

    # The update rolls back: exit 1, autoscaling registered again.
    endpoint = backend.endpoints["lift-scaling"]
    endpoint.endpoint_status = "InService"  # the update above finished after all
    old_config = endpoint.endpoint_config_name
    UPDATES.clear()

    def roll_back():
        endpoint.endpoint_config_name, endpoint.endpoint_status = old_config, "InService"

    rolled_back = deploy_until([*base, "--instance-type", "ml.m5.xlarge"], aws_env, "lift-scaling: Updating",
                               roll_back)
    assert rolled_back.returncode == 1, failed(rolled_back)
    assert not UPDATES[0]["scaling_registered"]
    assert scaling_of(moto_server, "lift-scaling") == (2, 5, 250.0)


def test_new_endpoint_with_autoscaling_and_no_wait_is_refused_before_anything_is_created(aws_env, moto_server):
    result = run_script("deploy.py", "--name", "nowait-scaling", "--model-data", MODEL_DATA, "--role", ROLE,
                        "--autoscale-max", "3", "--no-wait", env=aws_env)
    assert result.returncode == 2, failed(result)
    assert "can only be registered once the endpoint is InService" in result.stderr
    sm = client("sagemaker", moto_server)
    assert not [m for m in sm.list_models()["Models"] if m["ModelName"].startswith("nowait-scaling")]


def test_instance_endpoint_cannot_become_serverless_nor_back(aws_env, moto_server):
    sm = client("sagemaker", moto_server)
    base = ["--model-data", MODEL_DATA, "--role", ROLE, "--poll-interval", "0.1"]
    assert run_script("deploy.py", "--name", "kind-instances", *base, env=aws_env).returncode == 0
    assert run_script("deploy.py", "--name", "kind-serverless", *base, "--serverless-memory", "2048",
                      env=aws_env).returncode == 0
    before = len(sm.list_models()["Models"]), len(sm.list_endpoint_configs()["EndpointConfigs"])
    to_serverless = run_script("deploy.py", "--name", "kind-instances", *base, "--serverless-memory", "2048",
                               env=aws_env)
    assert to_serverless.returncode == 2, failed(to_serverless)
    assert "is a instance endpoint and SageMaker cannot update it to a serverless one" in to_serverless.stderr
    to_instances = run_script("deploy.py", "--name", "kind-serverless", *base, env=aws_env)
    assert to_instances.returncode == 2, failed(to_instances)
    assert "is a serverless endpoint and SageMaker cannot update it to a instance one" in to_instances.stderr
    assert (len(sm.list_models()["Models"]), len(sm.list_endpoint_configs()["EndpointConfigs"])) == before


def test_a_new_push_of_the_same_tag_deploys_the_new_image(aws_env, moto_server, serve_image):
    sm = client("sagemaker", moto_server)
    base = ["--name", "by-digest", "--model-data", MODEL_DATA, "--role", ROLE, "--poll-interval", "0.1",
            "--image-tag", "latest"]
    assert run_script("deploy.py", *base, env=aws_env).returncode == 0
    first = sm.describe_endpoint(EndpointName="by-digest")["EndpointConfigName"]
    [variant] = sm.describe_endpoint_config(EndpointConfigName=first)["ProductionVariants"]
    assert sm.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]["Image"] == (
        f"{SERVE_REPOSITORY}@{serve_image}")

    new_digest = put_ecr_image(moto_server, "imgclf-serve", ["latest"], layer="serve-v2")  # `make push` again
    assert new_digest != serve_image
    backend = sagemaker_backend()
    result = deploy_until(base, aws_env, "by-digest: Updating",
                          lambda: setattr(backend.endpoints["by-digest"], "endpoint_status", "InService"))
    assert result.returncode == 0, failed(result)
    assert "nothing to update" not in result.stderr
    [variant] = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="by-digest")["EndpointConfigName"])["ProductionVariants"]
    assert sm.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]["Image"] == (
        f"{SERVE_REPOSITORY}@{new_digest}")

    missing = run_script("deploy.py", *base[:-1], "never-pushed", env=aws_env)
    assert missing.returncode == 3, failed(missing)
    assert "imgclf-serve:never-pushed not found (ImageNotFoundException): push it with `make push`" in missing.stderr


def test_models_and_configs_are_tagged_encrypted_and_isolated(aws_env, moto_server):
    sm = client("sagemaker", moto_server)
    result = run_script("deploy.py", "--name", "secure-dogs", "--model-data", MODEL_DATA, "--role", ROLE,
                        "--poll-interval", "0.1", "--tag", "project=dogs", "--kms-key", "alias/imgclf",
                        "--network-isolation", env=aws_env)
    assert result.returncode == 0, failed(result)
    endpoint = sm.describe_endpoint(EndpointName="secure-dogs")
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    assert config["KmsKeyId"] == "alias/imgclf"
    model = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    for arn in (endpoint["EndpointArn"], config["EndpointConfigArn"], model["ModelArn"]):
        assert {"Key": "project", "Value": "dogs"} in sm.list_tags(ResourceArn=arn)["Tags"], arn
    # moto keeps no EnableNetworkIsolation: the request, validated against the service model, carries it.
    dry = run_script("deploy.py", "--name", "secure-dogs", "--model-data", MODEL_DATA, "--role", ROLE, "--dry-run",
                     "--network-isolation", env=offline_env())
    [create_model] = [r["request"] for r in dry_run_requests(dry.stdout) if r["operation"] == "CreateModel"]
    assert create_model["EnableNetworkIsolation"] is True


def test_multi_model_endpoint(aws_env, moto_server):
    """--multi-model: one container in Mode MultiModel over an S3 prefix, the serving image told to be one."""
    result = run_script("deploy.py", "--name", "breeds-per-site", "--multi-model", "s3://dogs-deploy/sites/",
                        "--role", ROLE, "--poll-interval", "0.1", env=aws_env)
    assert result.returncode == 0, failed(result)
    sm = client("sagemaker", moto_server)
    config = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="breeds-per-site")["EndpointConfigName"])
    container = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])["PrimaryContainer"]
    assert container["ModelDataUrl"] == "s3://dogs-deploy/sites/"
    assert container["Environment"]["SAGEMAKER_MULTI_MODEL"] == "true"
    dry = run_script("deploy.py", "--name", "breeds-per-site", "--multi-model", "s3://dogs-deploy/sites/", "--role",
                     ROLE, "--dry-run", env=offline_env())
    [create_model] = [r["request"] for r in dry_run_requests(dry.stdout) if r["operation"] == "CreateModel"]
    assert create_model["PrimaryContainer"]["Mode"] == "MultiModel"


@pytest.mark.parametrize("args, message", [
    (["--multi-model", "s3://b/sites"], "ending in /"),
    (["--multi-model", "s3://b/sites/", "--serverless-memory", "2048"], "serverless endpoints cannot host"),
    (["--multi-model", "s3://b/sites/", "--instance-type", "ml.g5.xlarge"], "only with its Triton container"),
    (["--multi-model", "s3://b/sites/", "--local"], "local mode hosts no multi-model endpoints"),
])
def test_bad_multi_model_input_exits_2(args, message):
    dry_run = () if "--local" in args else ("--dry-run",)
    result = run_script("deploy.py", "--name", "sites", "--role", ROLE, *dry_run, *args, env=offline_env())
    assert result.returncode == 2, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_async_endpoint_scales_to_zero_and_deletes_its_alarm(aws_env, moto_server):
    """--async-output: AsyncInferenceConfig; --autoscale-min 0: target tracking on the backlog per instance, and the
    step policy with its HasBacklogWithoutCapacity alarm that scales out from zero; --delete removes them."""
    result = run_script("deploy.py", "--name", "dogs-async", "--model-data", MODEL_DATA, "--role", ROLE,
                        "--async-output", "s3://dogs-deploy/async/out/", "--async-failure", "s3://dogs-deploy/async/err/",
                        "--async-max-concurrency", "4", "--autoscale-min", "0", "--autoscale-max", "2",
                        "--poll-interval", "0.1", env=aws_env)
    assert result.returncode == 0, failed(result)
    sm, scaling = client("sagemaker", moto_server), client("application-autoscaling", moto_server)
    config = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="dogs-async")["EndpointConfigName"])
    assert config["AsyncInferenceConfig"] == {
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4},
        "OutputConfig": {"S3OutputPath": "s3://dogs-deploy/async/out/", "S3FailurePath": "s3://dogs-deploy/async/err/"}}
    model = sm.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_MAX_PAYLOAD_IN_MB"] == "100"  # large photos queue
    resource = "endpoint/dogs-async/variant/AllTraffic"

    def targets() -> list[dict]:
        found = scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])
        return found["ScalableTargets"]
    [target] = targets()
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 2)
    policies = {p["PolicyName"]: p for p in scaling.describe_scaling_policies(
        ServiceNamespace="sagemaker", ResourceId=resource)["ScalingPolicies"]}
    tracking = policies["dogs-async-invocations-per-instance"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 5.0
    assert tracking["CustomizedMetricSpecification"]["MetricName"] == "ApproximateBacklogSizePerInstance"
    step = policies["dogs-async-backlog-without-capacity"]
    [alarm] = client("cloudwatch", moto_server).describe_alarms(
        AlarmNames=["dogs-async-backlog-without-capacity"])["MetricAlarms"]
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity" and alarm["AlarmActions"] == [step["PolicyARN"]]

    deleted = run_script("deploy.py", "--name", "dogs-async", "--delete", env=aws_env)
    assert deleted.returncode == 0, failed(deleted)
    assert not client("cloudwatch", moto_server).describe_alarms(
        AlarmNames=["dogs-async-backlog-without-capacity"])["MetricAlarms"]
    assert not targets()


def test_async_dry_run_prints_every_request_validated():
    dry = run_script("deploy.py", "--name", "dogs-async", "--model-data", MODEL_DATA, "--role", ROLE, "--dry-run",
                     "--async-output", "s3://b/out/", "--autoscale-min", "0", "--autoscale-max", "2", env=offline_env())
    assert dry.returncode == 0, failed(dry)
    assert [(r["service"], r["operation"]) for r in dry_run_requests(dry.stdout)] == [
        ("sagemaker", "CreateModel"), ("sagemaker", "CreateEndpointConfig"), ("sagemaker", "CreateEndpoint"),
        ("application-autoscaling", "RegisterScalableTarget"), ("application-autoscaling", "PutScalingPolicy"),
        ("application-autoscaling", "PutScalingPolicy"), ("cloudwatch", "PutMetricAlarm")]


@pytest.mark.parametrize("args, message", [
    (["--async-output", "b/out/"], "--async-output 'b/out/' is not an s3:// URI"),
    (["--async-failure", "s3://b/err/"], "go with --async-output"),
    (["--autoscale-min", "0", "--autoscale-max", "2"], "0 only for asynchronous endpoints"),
    (["--async-output", "s3://b/out/", "--serverless-memory", "2048"], "asynchronous inference runs on instances"),
    (["--async-output", "s3://b/out/", "--async-max-concurrency", "0"], "must be 1-1000"),
])
def test_bad_async_input_exits_2(args, message):
    result = run_script("deploy.py", "--name", "dogs-async", "--model-data", MODEL_DATA, "--role", ROLE, "--dry-run",
                        *args, env=offline_env())
    assert result.returncode == 2, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_gpu_instance_gets_the_gpu_serving_image_on_hosts_with_its_driver():
    """ml.g5 picks the serve-gpu image and the InferenceAmiVersion whose R580 driver its CUDA 13.0 needs (the
    default hosts' R470 cannot run it); --inference-ami-version and --image are the user's choice."""
    args = ["--name", "dog-breeds", "--model-data", MODEL_DATA, "--role", ROLE, "--dry-run",
            "--instance-type", "ml.g5.xlarge"]

    def requests_of(*extra: str) -> tuple[dict, dict]:
        dry = run_script("deploy.py", *args, *extra, env=offline_env())
        assert dry.returncode == 0, failed(dry)
        by_operation = {r["operation"]: r["request"] for r in dry_run_requests(dry.stdout)}
        return by_operation["CreateModel"], by_operation["CreateEndpointConfig"]["ProductionVariants"][0]

    model, variant = requests_of()
    assert model["PrimaryContainer"]["Image"].rsplit("/", 1)[1].startswith("imgclf-serve-gpu:")
    assert variant["InferenceAmiVersion"] == "al2023-ami-sagemaker-inference-gpu-4-1"
    assert variant["InstanceType"] == "ml.g5.xlarge"
    image = f"{SERVE_REPOSITORY}-cu12@sha256:{'a' * 64}"
    model, variant = requests_of("--image", image, "--env", "IMGCLF_SERVE_DEVICE=cuda",
                                 "--inference-ami-version", "al2-ami-sagemaker-inference-gpu-3-1")
    assert model["PrimaryContainer"]["Image"] == image
    assert model["PrimaryContainer"]["Environment"] == {"IMGCLF_SERVE_DEVICE": "cuda"}
    assert variant["InferenceAmiVersion"] == "al2-ami-sagemaker-inference-gpu-3-1"
    cpu_model, cpu_variant = requests_of("--instance-type", "ml.c5.xlarge")  # the last --instance-type wins
    assert cpu_model["PrimaryContainer"]["Image"].rsplit("/", 1)[1].startswith("imgclf-serve:")
    assert "InferenceAmiVersion" not in cpu_variant
