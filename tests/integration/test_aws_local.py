"""The scripts' --local path without containers: the requests it builds for the SDK's local clients, and the clear
errors before anything runs. The path itself, on the built images, is in tests/images/test_images.py."""

from __future__ import annotations

import os
import sys

import pytest
from imgclf.aws.jobs import local_output_path
from imgclf.aws.training import JobSpec, training_job_request
from imgclf.errors import UserError

from tests.aws_helpers import failed, offline_env, run_script


def local_spec(**changes) -> JobSpec:
    spec = {"image": "imgclf-train-cpu:latest", "role_arn": "arn:aws:iam::000000000000:role/local-mode",
            "channels": {"training": "file:///data/dogImages"}, "output_path": "file:///work/sagemaker-local",
            "instance_type": "local", "local": True}
    return JobSpec(**{**spec, **changes})


def test_local_training_request_reads_folders_and_writes_where_sagemaker_would():
    request = local_output_path(training_job_request("job-1", local_spec(), {"model": "resnet18"}))
    [channel] = request["InputDataConfig"]
    # The SDK's FileDataSource, with the distribution type it requires.
    assert channel["DataSource"] == {"FileDataSource": {"FileUri": "file:///data/dogImages",
                                                        "FileDataDistributionType": "FullyReplicated"}}
    assert request["OutputDataConfig"] == {"S3OutputPath": "file:///work/sagemaker-local/job-1/output"}
    assert request["ResourceConfig"]["InstanceType"] == "local"
    assert request["AlgorithmSpecification"]["TrainingImage"] == "imgclf-train-cpu:latest"


@pytest.mark.parametrize("changes, message", [
    ({"instance_type": "ml.m5.xlarge"}, "local mode takes local or local_gpu"),
    ({"local": False}, "is not an s3:// URI"),  # file:// is for local mode only
])
def test_local_and_cloud_specs_refuse_each_others_values(changes, message):
    with pytest.raises(UserError, match=message):
        local_spec(**changes).check()


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--attach", "imgclf-x"], "drop --attach / --no-wait"),
    ("batch_predict.py", ["--input", "photos", "--model-data", "m.tar.gz", "--no-wait"], "drop --no-wait"),
])
def test_local_refuses_waiting_options_before_anything_starts(script, args, message):
    result = run_script(script, "--local", *args, env=offline_env())
    assert result.returncode == 2, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_local_without_docker_compose_says_what_to_install(tmp_path):
    env = {**offline_env(), "PATH": os.path.dirname(sys.executable)}  # python, and no docker nor docker-compose
    result = run_script("train.py", "--local", "--data", str(tmp_path), env=env)
    assert result.returncode == 2, failed(result)
    assert "neither `docker-compose` nor `docker compose` is installed" in result.stderr


def test_predict_local_goes_with_an_endpoint(tmp_path):
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"x")
    result = run_script("predict.py", str(image), "--url", "http://127.0.0.1:1", "--local", env=offline_env())
    assert result.returncode == 2 and "--local goes with --endpoint" in result.stderr, failed(result)
