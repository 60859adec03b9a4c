"""train.py's and tune.py's job options in-process: what --local does with them (imgclf.aws.jobs.check_job_options)
and the request fields they become (imgclf.aws.training.JobSpec). The scripts run as subprocesses in
tests/integration/test_aws_job_options.py."""

from __future__ import annotations

import logging

import pytest
from imgclf.aws import jobs
from imgclf.aws.training import JobSpec, hyperband_config
from imgclf.errors import UserError

SPEC = JobSpec(image="img", role_arn="arn:aws:iam::123456789012:role/r", output_path="s3://out/x",
               channels={"train": "s3://dogs/train/", "valid": "s3://dogs/valid/"})


def test_local_mode_reads_fast_file_as_file_with_one_note(caplog):
    with caplog.at_level(logging.INFO):
        options = jobs.check_job_options(jobs.JobOptions(input_mode="FastFile"), local=True)
    assert options.input_mode == "File"
    [note] = [r.getMessage() for r in caplog.records]
    assert note.startswith("--input-mode FastFile: with --local the channels are local folders")
    assert jobs.check_job_options(jobs.JobOptions(input_mode="FastFile"), local=False).input_mode == "FastFile"
    with pytest.raises(UserError, match="--input-mode Pipe"):
        jobs.check_job_options(jobs.JobOptions(input_mode="Pipe"), local=False)


def test_spec_fields_of_the_options():
    spec = JobSpec(**{**SPEC.__dict__, "instance_count": 3, "shard_train": True, "input_mode": "FastFile",
                      "keep_alive_s": 0, "max_retries": 1})
    spec.check()
    common = spec.common()
    assert common["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 0  # 0 is sent: no warm pool, said explicitly
    assert common["RetryStrategy"] == {"MaximumRetryAttempts": 1}
    assert [(c["ChannelName"], c["InputMode"], c["DataSource"]["S3DataSource"]["S3DataDistributionType"])
            for c in common["InputDataConfig"]] == [("train", "FastFile", "ShardedByS3Key"),
                                                    ("valid", "FastFile", "FullyReplicated")]
    local = JobSpec(**{**SPEC.__dict__, "local": True, "instance_type": "local", "keep_alive_s": 10,
                       "input_mode": "FastFile", "channels": {"train": "file:///d/train", "valid": "file:///d/v"}})
    with pytest.raises(UserError, match="input mode FastFile: local mode mounts local folders .*--keep-alive: not in "
                                        "SageMaker's local mode"):
        local.check()


def test_hyperband_max_resource_is_the_static_epochs():
    assert hyperband_config({"lr": {}}, {"epochs": "12"}, None) == {"MaxResource": 12}
    assert hyperband_config({}, {}, 1) == {"MaxResource": 7, "MinResource": 1}  # the training's default epochs
    with pytest.raises(UserError, match="epochs is the resource Hyperband hands out"):
        hyperband_config({"epochs": {"type": "categorical", "values": [5, 10]}}, {}, None)
