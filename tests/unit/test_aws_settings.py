"""The settings the AWS scripts hand to imgclf.aws (flag groups, ModelSource, Search), and predict.py's flow over
senders (imgclf.aws.invocations), in-process. The scripts themselves run as subprocesses in tests/integration."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
from imgclf.aws import endpoints, invocations, jobs, scripting, tuning
from imgclf.errors import UserError
from imgclf.search.space import DEFAULT_SEARCH_SPACE


def parsed(*adders, argv: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    for add in adders:
        add(parser)
    return vars(parser.parse_args(argv))


def test_flag_groups_take_their_flags_and_name_the_ones_a_parser_lacks():
    flags = parsed(lambda p: scripting.add_common_args(p, role=True), lambda p: scripting.add_wait_args(p, "job"),
                   argv=["--region", "eu-west-1", "--dry-run", "--timeout", "5", "--no-wait"])
    # No add_local_arg (push_images.py, upload_data.py): Access.local keeps its default.
    assert scripting.Access.from_flags(flags) == scripting.Access(region="eu-west-1", dry_run=True,
                                                                  endpoint_url=flags["endpoint_url"])
    assert scripting.Waiting.from_flags(flags) == scripting.Waiting(no_wait=True, timeout=5.0, poll_interval=15.0)
    with pytest.raises(TypeError, match="Waiting: the parser has no flag for no_wait, timeout, poll_interval"):
        scripting.Waiting.from_flags(parsed(scripting.add_common_args, argv=[]))


def test_verbose_turns_debug_logging_on_when_parsed():
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        assert parsed(scripting.add_common_args, argv=[])["verbose"] is False and root.level == logging.INFO
        assert parsed(scripting.add_common_args, argv=["-v"])["verbose"] is True and root.level == logging.DEBUG
    finally:
        root.setLevel(level)


def test_job_options_channels_and_hyperparameters(tmp_path):
    flags = parsed(jobs.add_job_args, lambda p: scripting.add_common_args(p, role=True),
                   argv=["--data", "s3://b/dogs", "--weights", "s3://b/w.pth", "--spot", "--subnet", "subnet-1",
                         "--security-group", "sg-1", "--role", "R", "--hp", "lr=0.01"])
    options = jobs.JobOptions.from_flags(flags)
    assert (options.spot, options.subnet, options.security_group, options.role) == (True, ["subnet-1"], ["sg-1"], "R")
    assert jobs.s3_channels(options) == {"training": "s3://b/dogs/", "weights": "s3://b/w.pth"}
    with pytest.raises(UserError, match="either --data or --channel"):
        jobs.s3_channels(jobs.JobOptions(data="s3://b/dogs", channel=[("train", "s3://b/t")]))
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"lr": 0.1, "epochs": 3}))
    assert jobs.hyperparameters_from(best, flags["hp"]) == {"lr": "0.01", "epochs": 3}  # --hp over the file
    assert jobs.hyperparameters_from(None) == {}


def test_model_source_environment_and_search_space():
    model = endpoints.ModelSource(workers=2, env=[("A", "1"), ("IMGCLF_TOP_K", "3")])
    assert model.environment() == {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "IMGCLF_TOP_K": "3", "A": "1"}
    space = tuning.Search(param=[("lr", "0.0001:0.01:log")]).space()
    assert space.keys() == DEFAULT_SEARCH_SPACE.keys() and space["lr"] != DEFAULT_SEARCH_SPACE["lr"]


def test_deploy_flags_that_cannot_go_together_are_refused_before_any_call():
    with pytest.raises(UserError, match="--serverless-memory, --no-wait: not in SageMaker's local mode"):
        endpoints.check_deploy_flags("dogs", True, 2048, None, endpoints.Autoscaling(), no_wait=True)
    with pytest.raises(UserError, match="--autoscale-min needs --autoscale-max"):
        endpoints.check_deploy_flags("dogs", False, None, None, endpoints.Autoscaling(min_instances=2), False)
    with pytest.raises(UserError, match="min \\(3\\) <= max \\(2\\)"):
        endpoints.check_deploy_flags("dogs", False, None, None, endpoints.Autoscaling(3, 2), False)


ANSWER = {"predictions": [{"top_k": [{"label": "Affenpinscher", "class_name": "001.Affenpinscher", "index": 0,
                                      "probability": 0.9312}]}]}


def test_predict_prints_each_answer_and_returns_the_exit_status(tmp_path, capsys):
    good, refused, odd = (tmp_path / n for n in ("good.jpg", "refused.png", "odd.webp"))
    for path in (good, refused, odd):
        path.write_bytes(path.name.encode())
    seen = []

    def send(body: bytes, ctype: str, top_k: int | None) -> str:
        seen.append((body, ctype, top_k))
        if body == b"refused.png":
            raise invocations.Refused("HTTP 415: not an image")
        return "not json" if body == b"odd.webp" else json.dumps(ANSWER)

    assert invocations.predict([good, refused, odd], lambda: send, top_k=2) == invocations.EXIT_PREDICTION_FAILED
    assert seen == [(b"good.jpg", "image/jpeg", 2), (b"refused.png", "image/png", 2), (b"odd.webp", "image/webp", 2)]
    out, err = capsys.readouterr()
    row = "  1. Affenpinscher                     93.12%  (class 0: 001.Affenpinscher)"
    assert out.splitlines() == [str(good), row]
    assert f"{refused}: refused: HTTP 415: not an image" in err and f"{odd}: unexpected response" in err


def test_predict_usage_errors_and_an_unreachable_server(tmp_path, capsys):
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"x")

    def never() -> invocations.Send:
        raise AssertionError("no sender for a missing file")

    assert invocations.predict([tmp_path / "missing.jpg"], never) == invocations.EXIT_USAGE
    assert "error: no such image file" in capsys.readouterr().err
    bad_url = invocations.predict([image], lambda: invocations.via_url("ftp://example", 5))
    assert bad_url == invocations.EXIT_USAGE and "give http://HOST:PORT" in capsys.readouterr().err

    def unreachable(body, ctype, top_k):
        raise invocations.Unreachable("cannot reach it")

    assert invocations.predict([image, image], lambda: unreachable) == invocations.EXIT_UNREACHABLE
    assert capsys.readouterr().err.count("cannot reach it") == 1  # it stops at the first


def test_invocations_url_and_error_message():
    assert invocations.invocations_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/invocations"
    assert invocations.invocations_url("http://h:1/other") == "http://h:1/other"
    assert invocations.error_message(b'{"message": "too big"}') == "too big"
    assert invocations.error_message(b"  plain  ") == "plain" and invocations.error_message("") == "(empty response)"


def test_invoke_endpoint_request_names_the_target_model_of_a_multi_model_endpoint():
    import boto3
    from botocore.validate import validate_parameters
    from imgclf.aws import runtime_client

    request = runtime_client._request("breeds-per-site", b"jpeg", "image/jpeg", 3, "site-a/model.tar.gz")
    assert request["TargetModel"] == "site-a/model.tar.gz" and request["CustomAttributes"] == "top_k=3"
    assert "TargetModel" not in runtime_client._request("dogs", b"jpeg", "image/jpeg", None)
    shape = boto3.client("sagemaker-runtime", region_name="us-east-1", aws_access_key_id="x",
                         aws_secret_access_key="x").meta.service_model.operation_model("InvokeEndpoint").input_shape
    validate_parameters(request, shape)


def test_async_and_multi_model_endpoints_refuse_what_sagemaker_refuses():
    spec = endpoints.ServingSpec(name="sites", image="i", model_data="s3://b/sites/", role_arn="r", multi_model=True,
                                 async_output="s3://b/out/")
    with pytest.raises(UserError, match="asynchronous inference hosts one model"):
        spec.check()
    custom = endpoints.ServingSpec(name="a", image="i", model_data="s3://b/m.tar.gz", role_arn="r",
                                   async_output="s3://b/out/", environment={"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"})
    assert custom.model_request()["PrimaryContainer"]["Environment"] == {"SAGEMAKER_MAX_PAYLOAD_IN_MB": "20"}


@pytest.mark.parametrize("env, profile, retries", [
    ({}, "", {"mode": "standard"}),
    ({"AWS_RETRY_MODE": "adaptive"}, "", {"mode": "adaptive"}),
    ({"AWS_MAX_ATTEMPTS": "9"}, "", {"mode": "standard", "total_max_attempts": 9}),
    ({}, "retry_mode = adaptive\n", {"mode": "adaptive"}),
])
def test_retries_are_ours_unless_the_user_chose_theirs(monkeypatch, tmp_path, env, profile, retries):
    """botocore's standard retries by default; a retry mode or attempt count the user set (environment or profile)
    stays theirs, where a Config naming retries would override it."""
    import boto3
    from imgclf.aws.session import client_config

    for var in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "config").write_text("[default]\nregion = us-east-1\n" + profile)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    session = boto3.Session(aws_access_key_id="k", aws_secret_access_key="s")
    assert session.client("sagemaker", config=client_config(session)).meta.config.retries == retries
    invoke = client_config(session, {"max_attempts": 2}, read_timeout=7)  # predict.py's: few attempts
    assert invoke.read_timeout == 7 and invoke.retries == (None if env or profile else {"max_attempts": 2})
