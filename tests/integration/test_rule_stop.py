"""rules-stop: the job stops itself through StopTrainingJob (ending Stopped, as Debugger's StopTraining action),
falls back to ending Failed where it cannot, and a stop found during validation behaves like one in training.

The real `train` entrypoint runs as a SageMaker job would (TRAINING_JOB_NAME set) against the moto server.
moto 5.2.5 has no StopTrainingJob: the first test gives its server one that does what SageMaker does (mark the
job Stopping, send the container SIGTERM); the second uses moto as it is, where the call fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import boto3
import pytest
import torch
from imgclf import local, splits
from imgclf.debugging import rules

from tests.conftest import FAST_HPS

# squeezenet at lr=1: the loss is NaN within three steps (see test_rules.DIVERGING)
DIVERGING = {**FAST_HPS, "model": "squeezenet1_1", "optimizer": "sgd", "lr": "1", "epochs": "3",
             "rules": "exploding_tensor,loss_not_decreasing", "rules-stop": "exploding_tensor"}
JOB = "imgclf-rulestop-test"


def start_train(tmp: Path, data: Path, hps: dict[str, str], env: dict[str, str]) -> tuple[Path, subprocess.Popen]:
    base = tmp / "opt_ml"
    local.write_tree(base, hps, splits.split_channels(data))
    proc = subprocess.Popen([local.venv_bin("train")], env=local.training_env(base, tmp / "checkpoints", env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return base / "output", proc


def create_job(aws_env: dict[str, str]) -> None:
    sm = boto3.client("sagemaker", endpoint_url=aws_env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    if JOB in [j["TrainingJobName"] for j in sm.list_training_jobs()["TrainingJobSummaries"]]:
        return
    sm.create_training_job(
        TrainingJobName=JOB, RoleArn="arn:aws:iam::123456789012:role/imgclf-sagemaker",
        AlgorithmSpecification={"TrainingImage": "123456789012.dkr.ecr.us-east-1.amazonaws.com/imgclf-train-cpu:1",
                                "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": "s3://bucket/imgclf/output"},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 10},
        StoppingCondition={"MaxRuntimeInSeconds": 3600})


def test_stop_rule_stops_the_job_through_stop_training_job(tmp_path, sample_dataset, aws_env, monkeypatch):
    from moto.core.responses import ActionResult
    from moto.sagemaker.responses import SageMakerResponse

    create_job(aws_env)
    calls, procs = [], []

    def stop_training_job(self):  # what SageMaker does: the job goes Stopping and its container gets SIGTERM
        name = self._get_param("TrainingJobName")
        self.sagemaker_backend.training_jobs[name].training_job_status = "Stopping"
        calls.append(name)
        os.kill(procs[0].pid, signal.SIGTERM)
        return ActionResult({})

    monkeypatch.setattr(SageMakerResponse, "stop_training_job", stop_training_job, raising=False)
    output, proc = start_train(tmp_path, sample_dataset, DIVERGING, {**aws_env, "TRAINING_JOB_NAME": JOB})
    procs.append(proc)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]  # Stopped, not Failed: no failure file either
    assert calls == [JOB]
    assert f"StopTrainingJob({JOB}) requested" in log
    assert not (output / "failure").exists()
    result = json.loads((output / "data" / "rules.json").read_text())
    assert result["job_status"] == "Stopped" and result["stopped_by"] == "exploding_tensor"
    assert (tmp_path / "checkpoints" / "checkpoint.pt").is_file()  # written before stopping


def test_stop_rule_falls_back_to_failed_and_says_why(tmp_path, sample_dataset, aws_env):
    create_job(aws_env)  # moto itself has no StopTrainingJob: the call fails as it would without the permission
    output, proc = start_train(tmp_path, sample_dataset, DIVERGING, {**aws_env, "TRAINING_JOB_NAME": JOB})
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, log[-3000:]
    assert f"StopTrainingJob({JOB}) failed" in log and "ends Failed instead of Stopped" in log
    assert (output / "failure").read_text().startswith("RuleStop: rule exploding_tensor stopped the job")


def test_stop_found_during_validation_stops_at_the_epoch_end_with_a_checkpoint(tmp_path, sample_dataset):
    hps = {**DIVERGING, "rules": "loss_not_decreasing", "rules-stop": "loss_not_decreasing",
           "rules-config": '{"loss_not_decreasing": {"mode": "EVAL", "num_steps": 2}}'}
    env = {k: v for k, v in os.environ.items() if k != "TRAINING_JOB_NAME"}
    output, proc = start_train(tmp_path, sample_dataset, hps, env)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, log[-3000:]
    assert "no TRAINING_JOB_NAME" in log  # outside SageMaker: Failed, with the reason in the log
    result = json.loads((output / "data" / "rules.json").read_text())
    assert result["job_status"] == "Stopped" and result["stopped_by"] == "loss_not_decreasing"
    assert result["epochs"] == 1  # the epoch whose validation found it is complete and recorded
    by_name = {r["name"]: r for r in result["rules"]}
    assert by_name["loss_not_decreasing"]["status"] == rules.ISSUES
    saved = torch.load(tmp_path / "checkpoints" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1 and saved["state"]["batches_done"] == 0  # resumes at epoch 2
    assert (output / "failure").read_text().startswith("RuleStop: rule loss_not_decreasing stopped the job")


@pytest.fixture(autouse=True)
def _no_job_name(monkeypatch):
    monkeypatch.delenv("TRAINING_JOB_NAME", raising=False)


def test_execution_role_lets_the_job_stop_itself():
    from tests.integration.test_docs import allows, policy

    arn = f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{JOB}"
    assert allows(policy("execution-role-policy.json"), "sagemaker:StopTrainingJob", arn)
