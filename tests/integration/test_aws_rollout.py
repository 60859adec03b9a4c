"""deploy.py's safe rollouts and shadow variants as a subprocess against a moto server: the canary or linear update
with its rollback alarms (a rollback exits 1 naming the alarm), a shadow variant, its promotion, and what is
refused before anything is created.

moto 5.2.5 has no UpdateEndpoint and drops ShadowProductionVariants: this module gives its server both (SageMaker's
behaviour, recorded for the assertions); the requests still pass botocore's validation on their way there. A
rollback is what SageMaker leaves: InService on the old config, the alarm set to ALARM through CloudWatch's API."""

from __future__ import annotations

import pytest
from moto.sagemaker.responses import SageMakerResponse

from tests.aws_helpers import (
    ACCOUNT,
    ROLE,
    client,
    dry_run_requests,
    failed,
    offline_env,
    run_script,
    sagemaker_backend,
)
from tests.integration.test_aws_deploy import MODEL_DATA, UPDATES, _update_endpoint, deploy_until

IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/imgclf-serve@sha256:{'b' * 64}"  # by digest: no ECR lookup
NEW_DATA = MODEL_DATA.replace("job-1", "job-2")
_create_endpoint_config = SageMakerResponse.create_endpoint_config


def _create_endpoint_config_keeping_shadows(self):
    """CreateEndpointConfig that keeps ShadowProductionVariants (moto 5.2.5 drops them), so that
    DescribeEndpointConfig answers them as SageMaker does."""
    result = _create_endpoint_config(self)
    if shadows := self._get_param("ShadowProductionVariants"):
        config = self.sagemaker_backend.endpoint_configs[self._get_param("EndpointConfigName")]
        config.shadow_production_variants = shadows  # moto's describe answers each attribute, camel-cased
    return result


@pytest.fixture(scope="module", autouse=True)
def moto_rollout_support():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SageMakerResponse, "update_endpoint", _update_endpoint, raising=False)
        mp.setattr(SageMakerResponse, "create_endpoint_config", _create_endpoint_config_keeping_shadows)
        yield


def put_alarm(moto_server: str, name: str) -> None:
    client("cloudwatch", moto_server).put_metric_alarm(
        AlarmName=name, Namespace="AWS/SageMaker", MetricName="Invocation5XXErrors", Statistic="Average", Period=60,
        EvaluationPeriods=1, Threshold=1.0, ComparisonOperator="GreaterThanOrEqualToThreshold")


def models(moto_server: str, prefix: str) -> list[str]:
    return [m["ModelName"] for m in client("sagemaker", moto_server).list_models()["Models"]
            if m["ModelName"].startswith(prefix)]


def test_canary_rolled_back_by_an_alarm_exits_1_naming_it_and_linear_goes_through(aws_env, moto_server):
    base = ["--name", "rollout-dogs", "--role", ROLE, "--image", IMAGE, "--poll-interval", "0.1"]
    created = run_script("deploy.py", *base, "--model-data", MODEL_DATA, "--instance-count", "4", env=aws_env)
    assert created.returncode == 0, failed(created)
    for alarm in ("rollout-dogs-5xx", "rollout-dogs-latency", "rollout-dogs-quiet"):
        put_alarm(moto_server, alarm)
    backend, cloudwatch = sagemaker_backend(), client("cloudwatch", moto_server)
    endpoint = backend.endpoints["rollout-dogs"]
    old_config = endpoint.endpoint_config_name

    def alarm_then_roll_back():
        cloudwatch.set_alarm_state(AlarmName="rollout-dogs-5xx", StateValue="ALARM", StateReason="5xx on the canary")
        # one that went off and recovered once the old fleet took the traffic back
        cloudwatch.set_alarm_state(AlarmName="rollout-dogs-latency", StateValue="ALARM", StateReason="slow")
        cloudwatch.set_alarm_state(AlarmName="rollout-dogs-latency", StateValue="OK", StateReason="fine again")
        endpoint.endpoint_config_name, endpoint.endpoint_status = old_config, "InService"

    UPDATES.clear()
    canary = [*base, "--model-data", NEW_DATA, "--instance-count", "4", "--canary", "25", "--canary-wait", "600"]
    alarms = ["--rollback-alarm", "rollout-dogs-5xx", "--rollback-alarm", "rollout-dogs-latency",
              "--rollback-alarm", "rollout-dogs-quiet"]
    rolled_back = deploy_until([*canary, *alarms], aws_env, "rollout-dogs: Updating", alarm_then_roll_back)
    assert rolled_back.returncode == 1, failed(rolled_back)
    assert (f"endpoint rollout-dogs rolled back to {old_config}: rollback alarm rollout-dogs-5xx in ALARM; rollback "
            "alarm rollout-dogs-latency changed state during the rollout") in rolled_back.stderr
    assert "rollout-dogs-quiet changed" not in rolled_back.stderr
    [update] = UPDATES
    assert update["request"]["DeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 25},
                                            "WaitIntervalInSeconds": 600},
            "TerminationWaitInSeconds": 0, "MaximumExecutionTimeoutInSeconds": 4800},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in alarms[1::2]]}}

    # The same model in linear steps, with nothing going off: it ends on the new config, exit 0.
    UPDATES.clear()
    linear = [*base, "--model-data", NEW_DATA, "--instance-count", "4", "--linear", "25", "--linear-wait", "60",
              "--rollback-alarm", "rollout-dogs-quiet"]
    done = deploy_until(linear, aws_env, "rollout-dogs: Updating",
                        lambda: setattr(endpoint, "endpoint_status", "InService"))
    assert done.returncode == 0, failed(done)
    assert endpoint.endpoint_config_name != old_config
    [update] = UPDATES
    assert update["request"]["DeploymentConfig"]["BlueGreenUpdatePolicy"] == {
        "TrafficRoutingConfiguration": {"Type": "LINEAR", "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 25},
                                        "WaitIntervalInSeconds": 60},
        "TerminationWaitInSeconds": 0, "MaximumExecutionTimeoutInSeconds": 4 * 60 + 3600}


def test_rollout_flags_on_a_new_endpoint_or_with_an_unknown_alarm_exit_2_before_anything_is_created(aws_env,
                                                                                                    moto_server):
    base = ["--role", ROLE, "--image", IMAGE, "--model-data", MODEL_DATA, "--poll-interval", "0.1"]
    new = run_script("deploy.py", "--name", "brand-new-dogs", *base, "--canary", "10", env=aws_env)
    assert new.returncode == 2, failed(new)
    assert "endpoint brand-new-dogs does not exist yet" in new.stderr and "deploy without them first" in new.stderr
    assert not models(moto_server, "brand-new-dogs")

    assert run_script("deploy.py", "--name", "alarmed-dogs", *base, env=aws_env).returncode == 0
    before = models(moto_server, "alarmed-dogs")
    unknown = run_script("deploy.py", "--name", "alarmed-dogs", *base[:-3], NEW_DATA, *base[-2:], "--linear", "50",
                         "--rollback-alarm", "no-such-alarm", env=aws_env)
    assert unknown.returncode == 2, failed(unknown)
    assert "CloudWatch alarm no-such-alarm not found in us-east-1: create it first" in unknown.stderr
    assert models(moto_server, "alarmed-dogs") == before


def test_shadow_variant_then_its_promotion(aws_env, moto_server):
    job = run_script("train.py", "--data", "s3://dogs-deploy/data", "--role", ROLE, "--job-name", "shadow-src",
                     "--no-wait", env=aws_env)
    assert job.returncode == 0, failed(job)
    sm = client("sagemaker", moto_server)
    base = ["--name", "shadow-dogs", "--role", ROLE, "--image", IMAGE, "--poll-interval", "0.1"]
    created = run_script("deploy.py", *base, "--model-data", MODEL_DATA, "--instance-type", "ml.c5.xlarge",
                         "--shadow-training-job", "shadow-src", "--shadow-percent", "20", env=aws_env)
    assert created.returncode == 0, failed(created)
    config = sm.describe_endpoint_config(EndpointConfigName=sm.describe_endpoint(
        EndpointName="shadow-dogs")["EndpointConfigName"])
    [production], [shadow] = config["ProductionVariants"], config["ShadowProductionVariants"]
    assert (shadow["VariantName"], shadow["InitialVariantWeight"], shadow["InstanceType"]) == (
        "Shadow", 0.2, "ml.c5.xlarge")
    container = sm.describe_model(ModelName=shadow["ModelName"])["PrimaryContainer"]
    assert container["ModelDataUrl"] == "s3://dogs-deploy/imgclf/output/shadow-src/output/model.tar.gz"
    assert container["Image"] == IMAGE
    assert sm.describe_model(ModelName=production["ModelName"])["PrimaryContainer"]["ModelDataUrl"] == MODEL_DATA

    # Promotion: a config whose production variant runs the shadow's model, and no shadow; an update.
    backend = sagemaker_backend()
    UPDATES.clear()
    promoted = deploy_until(["--name", "shadow-dogs", "--promote-shadow", "--poll-interval", "0.1"], aws_env,
                            "shadow-dogs: Updating",
                            lambda: setattr(backend.endpoints["shadow-dogs"], "endpoint_status", "InService"))
    assert promoted.returncode == 0, failed(promoted)
    assert promoted.stdout.strip() == "shadow-dogs"
    [update] = UPDATES
    assert "DeploymentConfig" not in update["request"]
    config = sm.describe_endpoint_config(EndpointConfigName=update["request"]["EndpointConfigName"])
    assert config["ProductionVariants"] == [{**production, "ModelName": shadow["ModelName"]}]
    assert "ShadowProductionVariants" not in config
    assert sm.describe_endpoint(EndpointName="shadow-dogs")["EndpointConfigName"] == config["EndpointConfigName"]

    again = run_script("deploy.py", "--name", "shadow-dogs", "--promote-shadow", env=aws_env)
    assert again.returncode == 2, failed(again)
    assert "endpoint shadow-dogs has no shadow variant" in again.stderr

    deleted = run_script("deploy.py", "--name", "shadow-dogs", "--delete", env=aws_env)  # both models go
    assert deleted.returncode == 0, failed(deleted)
    assert not models(moto_server, "shadow-dogs")


def test_dry_run_offline_shows_the_rollout_update_and_the_shadow_validated():
    base = ["--name", "dog-breeds", "--model-data", MODEL_DATA, "--role", ROLE, "--dry-run"]
    canary = run_script("deploy.py", *base, "--canary", "10", "--rollback-alarm", "dogs-5xx", env=offline_env())
    assert canary.returncode == 0, failed(canary)
    # Without AWS access the endpoint cannot be looked up: the flags only mean an update, so the update is shown.
    [update] = [r["request"] for r in dry_run_requests(canary.stdout) if r["operation"] == "UpdateEndpoint"]
    assert update["DeploymentConfig"]["AutoRollbackConfiguration"] == {"Alarms": [{"AlarmName": "dogs-5xx"}]}

    shadow = run_script("deploy.py", *base, "--shadow-model-data", NEW_DATA, "--shadow-percent", "5",
                        env=offline_env())
    assert shadow.returncode == 0, failed(shadow)
    requests = dry_run_requests(shadow.stdout)
    assert [r["operation"] for r in requests] == ["CreateModel", "CreateModel", "CreateEndpointConfig",
                                                  "CreateEndpoint"]
    [shadow_variant] = requests[2]["request"]["ShadowProductionVariants"]
    assert shadow_variant["ModelName"] == requests[1]["request"]["ModelName"]
    assert shadow_variant["InitialVariantWeight"] == 0.05

    # The promoted config copies the endpoint's current one, which a dry run without AWS access cannot read.
    promote = run_script("deploy.py", "--name", "dog-breeds", "--promote-shadow", "--linear", "50", "--dry-run",
                         env=offline_env())
    assert promote.returncode == 0, failed(promote)
    [update] = dry_run_requests(promote.stdout)
    assert update["operation"] == "UpdateEndpoint" and "DeploymentConfig" in update["request"]
    assert "showing the update only" in promote.stderr


@pytest.mark.parametrize("args, message", [
    (["--local", "--model-data", "model.tar.gz", "--canary", "10", "--shadow-percent", "5"],
     "--canary, --shadow-percent: not in SageMaker's local mode"),
    (["--promote-shadow", "--model-data", MODEL_DATA, "--dry-run"], "--model-data: --promote-shadow keeps"),
    (["--model-data", MODEL_DATA, "--dry-run", "--serverless-memory", "2048", "--linear", "10"],
     "deployment guardrails are for instance endpoints"),
    (["--model-data", MODEL_DATA, "--dry-run", "--shadow-percent", "5"], "--shadow-percent goes with"),
])
def test_bad_rollout_input_exits_2_in_one_line(args, message):
    result = run_script("deploy.py", "--name", "dog-breeds", "--role", ROLE, *args, env=offline_env())
    assert result.returncode == 2, failed(result)
    [error] = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert message in error and "Traceback" not in result.stderr
