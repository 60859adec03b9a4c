"""deploy.py's safe-rollout and shadow-variant requests (imgclf.aws.endpoints): what each flag becomes, and what is
refused before anything is sent. The requests themselves go through botocore's model and a moto server in
tests/integration/test_aws_rollout.py."""

from __future__ import annotations

import pytest
from imgclf.aws.endpoints import SHADOW_VARIANT, Rollout, ServingSpec, update_endpoint_request
from imgclf.errors import UserError


def test_canary_with_alarms_is_a_blue_green_policy_with_auto_rollback():
    config = Rollout(canary=25, canary_wait=600, rollback_alarm=("dogs-5xx", "dogs-latency")).deployment_config()
    assert config == {
        "BlueGreenUpdatePolicy": {
            "TrafficRoutingConfiguration": {"Type": "CANARY", "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 25},
                                            "WaitIntervalInSeconds": 600},
            # two bakes (the canary, then the whole new fleet) and an hour to start the new fleet
            "TerminationWaitInSeconds": 0, "MaximumExecutionTimeoutInSeconds": 2 * 600 + 3600},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "dogs-5xx"}, {"AlarmName": "dogs-latency"}]}}
    request = update_endpoint_request("dogs", "dogs-12345678", keep_instance_count=True, deployment=config)
    assert request["DeploymentConfig"] is config and request["RetainAllVariantProperties"] is True


def test_linear_steps_bake_each_and_the_default_wait_applies():
    config = Rollout(linear=30).deployment_config()
    routing = config["BlueGreenUpdatePolicy"]["TrafficRoutingConfiguration"]
    assert routing == {"Type": "LINEAR", "LinearStepSize": {"Type": "CAPACITY_PERCENT", "Value": 30},
                       "WaitIntervalInSeconds": 300}
    assert config["BlueGreenUpdatePolicy"]["MaximumExecutionTimeoutInSeconds"] == 4 * 300 + 3600  # 30+30+30+10
    assert "AutoRollbackConfiguration" not in config
    assert Rollout().deployment_config() is None
    assert "DeploymentConfig" not in update_endpoint_request("dogs", "dogs-12345678")


@pytest.mark.parametrize("rollout, message", [
    (Rollout(canary=51), "--canary 51: must be 1-50"),
    (Rollout(canary=0), "--canary 0: must be 1-50"),
    (Rollout(linear=5), "--linear 5: must be 10-50"),
    (Rollout(canary=10, linear=10), "--canary and --linear: choose one"),
    (Rollout(canary=10, canary_wait=3601), "--canary-wait 3601: must be 0-3600 seconds"),
    (Rollout(linear_wait=60), "--linear-wait goes with --linear PERCENT"),
    (Rollout(rollback_alarm=("dogs-5xx",)), "add --canary PERCENT or --linear PERCENT"),
    (Rollout(canary=10, rollback_alarm=tuple(f"a{i}" for i in range(11))), "SageMaker takes at most 10"),
    (Rollout(canary=10, rollback_alarm=(" ",)), "not a CloudWatch alarm name"),
    (Rollout(linear=10, linear_wait=3600), "exceed SageMaker's limit of 28800 s"),
])
def test_bad_rollout_flags_name_what_is_wrong(rollout, message):
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        rollout.deployment_config()


def spec(**kwargs) -> ServingSpec:
    return ServingSpec(name="dogs", image="img@sha256:" + "a" * 64, model_data="s3://b/v1/model.tar.gz",
                       role_arn="arn:aws:iam::123456789012:role/r", **kwargs)


def test_shadow_variant_runs_its_own_model_on_the_same_instances_with_its_share_as_weight():
    served = spec(instance_type="ml.c5.xlarge", instance_count=2, shadow_model_data="s3://b/v2/model.tar.gz",
                  shadow_percent=20, suffix="20260101-120000")
    served.check()
    production, shadow = served.model_request(), served.shadow_model_request()
    assert shadow["PrimaryContainer"] == {**production["PrimaryContainer"], "ModelDataUrl": "s3://b/v2/model.tar.gz"}
    assert shadow["ModelName"] != production["ModelName"]  # hashed even under --timestamp-names
    config = served.endpoint_config_request(production["ModelName"], shadow["ModelName"])
    [variant], [shadow_variant] = config["ProductionVariants"], config["ShadowProductionVariants"]
    assert shadow_variant == {**variant, "VariantName": SHADOW_VARIANT, "ModelName": shadow["ModelName"],
                              "InitialVariantWeight": 0.2}
    assert variant["InitialVariantWeight"] == 1.0
    # Without a shadow, the config (and so its name) is what it always was.
    assert "ShadowProductionVariants" not in spec().endpoint_config_request("m")


@pytest.mark.parametrize("kwargs, message", [
    ({"shadow_model_data": "s3://b/v2/model.zip"}, "expected s3://.../model.tar.gz"),
    ({"shadow_model_data": "s3://b/v2/model.tar.gz", "shadow_percent": 0}, "--shadow-percent 0: must be 1-100"),
    ({"shadow_model_data": "s3://b/v2/model.tar.gz", "serverless_memory_mb": 2048}, "on serverless endpoints"),
    ({"shadow_model_data": "s3://b/v2/model.tar.gz", "async_output": "s3://b/out/"}, "on asynchronous endpoints"),
])
def test_bad_shadow_flags_name_what_is_wrong(kwargs, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        spec(**kwargs).check()
