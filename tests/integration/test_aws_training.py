"""scripts/train.py and scripts/tune.py as subprocesses against a moto server (and offline dry runs)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import pytest
from imgclf.config import METRIC_DEFINITIONS, rule_metric_definitions
from imgclf.debugging.rules import RULES
from imgclf.search.space import DEFAULT_SEARCH_SPACE

from tests.aws_helpers import (
    ACCOUNT,
    ROLE,
    SCRIPTS,
    client,
    dry_run_requests,
    failed,
    offline_env,
    output_tarball,
    run_script,
    sagemaker_backend,
)

DATA = "s3://dogs-train/dogImages"
METRICS = [dict(m) for m in METRIC_DEFINITIONS]
RULE_METRICS = [dict(m) for m in rule_metric_definitions(RULES)]  # training jobs only: for alarms on rule results


def test_training_dry_run_offline_has_spot_checkpoints_metrics_and_string_hyperparameters():
    result = run_script(
        "train.py", "--dry-run", "--data", DATA, "--weights", "s3://dogs-train/weights/vgg16.pth",
        "--role", ROLE, "--instance-type", "ml.g5.xlarge", "--spot", "--max-runtime", "7200", "--max-wait", "10800",
        "--hp", "model=resnet50", "--hp", "lr=0.01", "--hp", "pretrained=yes", "--hp", "batch-size=64",
        "--job-name", "dry-job", "--tag", "project=dogs", "--network-isolation", "--volume-size", "100",
        env=offline_env())
    assert result.returncode == 0, failed(result)
    [sent] = dry_run_requests(result.stdout)
    assert sent["operation"] == "CreateTrainingJob"
    r = sent["request"]
    assert r["HyperParameters"] == {"model": "resnet50", "lr": "0.01", "pretrained": "true", "batch-size": "64"}
    assert r["AlgorithmSpecification"]["MetricDefinitions"] == METRICS + RULE_METRICS
    assert r["TensorBoardOutputConfig"] == {"S3OutputPath": "s3://dogs-train/imgclf/output/dry-job/tensorboard",
                                            "LocalPath": "/opt/ml/output/tensorboard"}
    assert r["AlgorithmSpecification"]["TrainingImage"] == (
        "000000000000.dkr.ecr.us-east-1.amazonaws.com/imgclf-train-gpu:latest")
    assert r["EnableManagedSpotTraining"] is True and r["EnableNetworkIsolation"] is True
    assert r["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 10800}
    assert r["CheckpointConfig"] == {"S3Uri": "s3://dogs-train/imgclf/output/dry-job/checkpoints",
                                     "LocalPath": "/opt/ml/checkpoints"}
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in r["InputDataConfig"]}
    assert channels == {"training": DATA + "/", "weights": "s3://dogs-train/weights/vgg16.pth"}
    assert r["ResourceConfig"] == {"InstanceType": "ml.g5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100}
    assert r["Tags"] == [{"Key": "project", "Value": "dogs"}]


def test_instance_count_sets_the_hosts_of_a_distributed_job():
    result = run_script("train.py", "--dry-run", "--data", DATA, "--role", ROLE, "--instance-type", "ml.g5.12xlarge",
                        "--instance-count", "2", "--hp", "processes-per-host=4", env=offline_env())
    assert result.returncode == 0, failed(result)
    [sent] = dry_run_requests(result.stdout)
    assert sent["request"]["ResourceConfig"]["InstanceCount"] == 2
    assert sent["request"]["HyperParameters"]["processes-per-host"] == "4"


@pytest.mark.parametrize("args, message", [
    (["--hp", "lr=fast"], "hyperparameter lr='fast'"),
    (["--hp", "optimiser=adam"], "unknown hyperparameter(s) optimiser"),
    (["--spot", "--max-runtime", "7200", "--max-wait", "3600"], "spot jobs need max wait >= max runtime"),
    (["--max-wait", "3600"], "max wait applies to managed spot training only"),
    (["--hp", "freeze"], "expected KEY=VALUE"),
    (["--instance-count", "0"], "instance count 0: must be 1 or more"),
])
def test_bad_training_input_exits_2_with_the_reason(args, message):
    result = run_script("train.py", "--dry-run", "--data", DATA, "--role", ROLE, *args, env=offline_env())
    assert result.returncode == 2, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "{" not in result.stdout


def test_training_job_on_moto_uses_account_role_and_cpu_image(aws_env, moto_server):
    result = run_script("train.py", "--data", DATA, "--role", "imgclf-sagemaker", "--instance-type", "ml.m5.xlarge",
                        "--spot", "--hp", "model=efficientnet_v2_s", "--hp", "freeze=head-then-all", "--no-wait",
                        env=aws_env)
    assert result.returncode == 0, failed(result)
    name = result.stdout.strip()
    assert name.startswith("imgclf-efficientnet-v2-s-")
    job = client("sagemaker", moto_server).describe_training_job(TrainingJobName=name)
    assert job["RoleArn"] == ROLE
    assert job["AlgorithmSpecification"]["TrainingImage"] == (
        f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/imgclf-train-cpu:latest")
    assert job["HyperParameters"] == {"model": "efficientnet_v2_s", "freeze": "head-then-all"}
    assert job["EnableManagedSpotTraining"] is True
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://dogs-train/imgclf/output/{name}/checkpoints"
    assert job["StoppingCondition"]["MaxWaitTimeInSeconds"] >= job["StoppingCondition"]["MaxRuntimeInSeconds"]


def test_missing_role_and_credentials_are_clear(aws_env):
    env = {k: v for k, v in aws_env.items() if k != "SAGEMAKER_ROLE"}
    no_role = run_script("train.py", "--data", DATA, "--no-wait", env=env)
    assert no_role.returncode == 3, failed(no_role)
    assert "no SageMaker execution role: pass --role" in no_role.stderr
    no_credentials = run_script("train.py", "--data", DATA, "--role", ROLE, "--region", "us-east-1",
                                env=offline_env())
    assert no_credentials.returncode == 3, failed(no_credentials)
    assert "no AWS credentials" in no_credentials.stderr


def _create_job(aws_env, name: str) -> None:
    result = run_script("train.py", "--data", DATA, "--role", ROLE, "--job-name", name, "--no-wait", env=aws_env)
    assert result.returncode == 0, failed(result)


def test_attach_to_a_failed_job_prints_the_failure_reason(aws_env):
    _create_job(aws_env, "job-that-fails")
    job = sagemaker_backend().training_jobs["job-that-fails"]
    job.training_job_status = "Failed"
    job.failure_reason = "ClientError: hyperparameter lr=-1: must be between 1e-07 and 10.0"
    result = run_script("train.py", "--attach", "job-that-fails", "--poll-interval", "0.1", env=aws_env)
    assert result.returncode == 1, failed(result)
    assert "training job job-that-fails Failed: ClientError: hyperparameter lr=-1" in result.stderr


@pytest.mark.parametrize("status", ["Failed", "Stopped"])
def test_a_failed_or_stopped_job_still_gets_its_reports(aws_env, moto_server, tmp_path, status):
    name = f"job-{status.lower()}-with-reports"
    _create_job(aws_env, name)
    job = sagemaker_backend().training_jobs[name]
    job.training_job_status = status
    job.failure_reason = "AlgorithmError: loss is nan at epoch 3"
    job.model_artifacts = {}  # a job that ends early may have no model artifact: the output path still says where
    s3 = client("s3", moto_server)
    s3.create_bucket(Bucket="dogs-train")
    s3.put_object(Bucket="dogs-train", Key=f"imgclf/output/{name}/output/output.tar.gz",
                  Body=output_tarball({"rules.json": json.dumps({"LossNotDecreasing": "IssuesFound"}).encode()}))
    result = run_script("train.py", "--attach", name, "--poll-interval", "0.1", "--no-logs", "--reports-dir",
                        str(tmp_path / "reports"), env=aws_env)
    assert result.returncode == 1, failed(result)
    assert f"training job {name} {status}" in result.stderr
    assert json.loads((tmp_path / "reports" / "rules.json").read_text()) == {"LossNotDecreasing": "IssuesFound"}


def test_vpc_kms_and_inter_container_encryption(aws_env):
    security = ["--subnet", "subnet-0a1b", "--subnet", "subnet-2c3d", "--security-group", "sg-0e4f", "--kms-key",
                "alias/imgclf-output", "--volume-kms-key", "alias/imgclf-volume", "--encrypt-inter-container"]
    for script, definition in (("train.py", lambda r: r), ("tune.py", lambda r: r["TrainingJobDefinition"])):
        result = run_script(script, "--dry-run", "--data", DATA, "--role", ROLE, *security, env=offline_env())
        assert result.returncode == 0, failed(result)
        [sent] = dry_run_requests(result.stdout)  # validated against the service model
        r = definition(sent["request"])
        assert r["VpcConfig"] == {"Subnets": ["subnet-0a1b", "subnet-2c3d"], "SecurityGroupIds": ["sg-0e4f"]}
        assert r["OutputDataConfig"]["KmsKeyId"] == "alias/imgclf-output"
        assert r["ResourceConfig"]["VolumeKmsKeyId"] == "alias/imgclf-volume"
        assert r["EnableInterContainerTrafficEncryption"] is True
    half = run_script("train.py", "--dry-run", "--data", DATA, "--role", ROLE, "--subnet", "subnet-0a1b",
                      env=offline_env())
    assert half.returncode == 2 and "a VPC needs both --subnet and --security-group" in half.stderr, failed(half)


def test_attach_streams_logs_then_downloads_reports(aws_env, moto_server, tmp_path):
    name = "job-that-completes"
    _create_job(aws_env, name)
    job = sagemaker_backend().training_jobs[name]
    job.training_job_status, job.secondary_status = "InProgress", "Training"
    logs = client("logs", moto_server)
    logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=f"{name}/algo-1-1700000000")
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=f"{name}/algo-1-1700000000",
                        logEvents=[{"timestamp": now + i, "message": f"epoch {i + 1}: valid_accuracy=0.{i + 5};"}
                                   for i in range(3)])
    report = io.BytesIO()
    with tarfile.open(fileobj=report, mode="w:gz") as tar:
        body = json.dumps({"test_accuracy": 0.83}).encode()
        info = tarfile.TarInfo("metrics.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    s3 = client("s3", moto_server)
    s3.create_bucket(Bucket="dogs-train")
    s3.put_object(Bucket="dogs-train", Key=f"imgclf/output/{name}/output/output.tar.gz", Body=report.getvalue())

    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "train.py"), "--attach", name, "--poll-interval", "0.2",
                             "--reports-dir", str(tmp_path / "reports")], env=aws_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stderr:  # the script reports the running job: now let it complete
        seen.append(line)
        if "InProgress / Training" in line:
            job.training_job_status, job.secondary_status = "Completed", "Completed"
            break
    stdout, stderr = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, "".join(seen) + stderr)
    assert result.returncode == 0, failed(result)
    assert [line for line in result.stderr.splitlines() if line.startswith("epoch")] == [
        "epoch 1: valid_accuracy=0.5;", "epoch 2: valid_accuracy=0.6;", "epoch 3: valid_accuracy=0.7;"]
    # stdout is the result alone, so that MODEL=$(python scripts/train.py ...) works.
    assert result.stdout == f"s3://dogs-train/imgclf/output/{name}/output/model.tar.gz\n"
    assert "Completed / Completed" in result.stderr
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text()) == {"test_accuracy": 0.83}


def test_wait_timeout_exits_4_and_the_job_carries_on(aws_env):
    _create_job(aws_env, "job-that-runs-long")
    sagemaker_backend().training_jobs["job-that-runs-long"].training_job_status = "InProgress"
    result = run_script("train.py", "--attach", "job-that-runs-long", "--poll-interval", "0.2", "--timeout", "1",
                        "--no-logs", env=aws_env)
    assert result.returncode == 4, failed(result)
    assert "still InProgress after 1 s" in result.stderr


def _ranges(config: dict) -> dict:
    r = config["ParameterRanges"]
    return {**{c["Name"]: (c["MinValue"], c["MaxValue"], c["ScalingType"]) for c in r.get("ContinuousParameterRanges",
                                                                                       [])},
            **{c["Name"]: (c["MinValue"], c["MaxValue"], c["ScalingType"]) for c in r.get("IntegerParameterRanges",
                                                                                       [])},
            **{c["Name"]: c["Values"] for c in r.get("CategoricalParameterRanges", [])}}


def test_tuning_job_with_the_reference_search_space(aws_env, moto_server):
    result = run_script("tune.py", "--data", DATA, "--role", ROLE, "--hp", "model=vgg16", "--hp", "freeze=head",
                        "--max-jobs", "6", "--max-parallel", "3", "--no-wait", env=aws_env)
    assert result.returncode == 0, failed(result)
    name = result.stdout.strip()
    assert len(name) <= 32
    job = client("sagemaker", moto_server).describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    config = job["HyperParameterTuningJobConfig"]
    assert _ranges(config) == {"lr": ("0.001", "0.1", "Logarithmic"), "batch-size": ["128", "256"],
                               "epochs": ["5", "7", "10"]}
    assert set(DEFAULT_SEARCH_SPACE) == {"lr", "batch-size", "epochs"}
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "valid:accuracy"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 3}
    definition = job["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == METRICS
    # the default space tunes the loop (lr, batch-size, epochs): the head is trained by it, not fitted
    assert definition["StaticHyperParameters"] == {"model": "vgg16", "freeze": "head", "head-solver": "sgd"}
    assert "WarmStartConfig" not in job


def test_tuning_overrides_warm_start_and_best_hyperparameters_for_train(aws_env, moto_server, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"type": "continuous", "min": 0.0001, "max": 0.01, "scaling": "Logarithmic"},
                                 "freeze": {"type": "categorical", "values": ["head", "none"]}}))
    parent = run_script("tune.py", "--data", DATA, "--role", ROLE, "--search-space", str(space), "--param",
                        "epochs=2:8", "--objective", "loss", "--job-name", "imgclf-hpo-previous", "--hp",
                        "model=resnet50", "--no-wait", env=aws_env)
    assert parent.returncode == 0, failed(parent)
    result = run_script("tune.py", "--data", DATA, "--role", ROLE, "--search-space", str(space),
                        "--param", "epochs=3:12", "--objective", "loss", "--no-early-stopping",
                        "--warm-start", "imgclf-hpo-previous", "--job-name", "hpo-override", "--spot",
                        "--hp", "model=resnet50", "--no-wait", env=aws_env)
    assert result.returncode == 0, failed(result)
    job = client("sagemaker", moto_server).describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName="hpo-override")
    config = job["HyperParameterTuningJobConfig"]
    assert _ranges(config) == {"lr": ("0.0001", "0.01", "Logarithmic"), "freeze": ["head", "none"],
                               "epochs": ("3", "12", "Auto")}
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Minimize", "MetricName": "valid:loss"}
    assert config["TrainingJobEarlyStoppingType"] == "Off"
    assert job["WarmStartConfig"] == {"ParentHyperParameterTuningJobs": [
        {"HyperParameterTuningJobName": "imgclf-hpo-previous"}], "WarmStartType": "IdenticalDataAndAlgorithm"}
    assert job["TrainingJobDefinition"]["EnableManagedSpotTraining"] is True
    assert "CheckpointConfig" not in job["TrainingJobDefinition"]  # parallel jobs must not share one

    # moto finishes tuning jobs at once with a placeholder best job: put a real one there.
    sagemaker_backend().hyper_parameter_tuning_jobs["hpo-override"].best_training_job = {
        "TrainingJobName": "hpo-override-004-abc", "TrainingJobStatus": "Completed",
        "TunedHyperParameters": {"lr": "0.00231", "freeze": '"none"', "epochs": "9"},
        "FinalHyperParameterTuningJobObjectiveMetric": {"Type": "Minimize", "MetricName": "valid:loss",
                                                        "Value": 0.41}}
    best = tmp_path / "best.json"
    attached = run_script("tune.py", "--attach", "hpo-override", "--best-out", str(best), "--poll-interval", "0.1",
                          env=aws_env)
    assert attached.returncode == 0, failed(attached)
    assert "best training job: hpo-override-004-abc valid:loss=0.41" in attached.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "space.json"]  # atomic: no temporary file
    written = json.loads(best.read_text())
    assert written["hyperparameters"] == {"model": "resnet50", "lr": "0.00231", "freeze": "none", "epochs": "9",
                                          "head-solver": "sgd"}  # static: the search tuned the loop's lr

    train = run_script("train.py", "--dry-run", "--data", DATA, "--role", ROLE, "--hyperparameters", str(best),
                       "--hp", "epochs=12", env=offline_env())
    assert train.returncode == 0, failed(train)
    [sent] = dry_run_requests(train.stdout)
    assert sent["request"]["HyperParameters"] == {"model": "resnet50", "lr": "0.00231", "freeze": "none",
                                                  "epochs": "12", "head-solver": "sgd"}


def test_warm_start_rules_are_checked_before_sending(aws_env, moto_server):
    sm = client("sagemaker", moto_server)
    parent = run_script("tune.py", "--data", DATA, "--role", ROLE, "--hp", "model=resnet50", "--job-name",
                        "ws-parent", "--no-wait", env=aws_env)
    assert parent.returncode == 0, failed(parent)
    base = ["tune.py", "--data", DATA, "--role", ROLE, "--job-name", "ws-child", "--no-wait"]

    def refused(*args: str, code: int = 2) -> str:
        result = run_script(*base, *args, env=aws_env)
        assert result.returncode == code, failed(result)
        names = [j["HyperParameterTuningJobName"] for j in sm.list_hyper_parameter_tuning_jobs()[
            "HyperParameterTuningJobSummaries"]]
        assert "ws-child" not in names, "a refused warm start was sent"
        return result.stderr

    too_many = refused("--hp", "model=resnet50", *[a for i in range(6) for a in ("--warm-start", f"ws-{i}")])
    assert "SageMaker takes at most 5 parents" in too_many
    objective = refused("--hp", "model=resnet50", "--warm-start", "ws-parent", "--objective", "loss")
    assert ("parent ws-parent maximizes valid:accuracy, this job minimizes valid:loss: warm start needs the same "
            "objective") in objective
    names = refused("--hp", "model=resnet50", "--hp", "freeze=head", "--warm-start", "ws-parent")
    assert "parent ws-parent has other hyperparameters (static and tuned together): drop freeze" in names
    kinds = refused("--hp", "model=resnet50", "--param", "epochs=3:12", "--warm-start", "ws-parent")
    assert "parent ws-parent tunes epochs as Categorical: a warm start keeps each range's type" in kinds
    missing = refused("--hp", "model=resnet50", "--warm-start", "ws-nowhere", code=3)
    assert "warm start parent ws-nowhere: no such tuning job" in missing

    # The same names, kinds and objective with a narrower range: accepted.
    ok = run_script(*base, "--hp", "model=resnet50", "--param", "lr=0.0001:0.01:log", "--warm-start", "ws-parent",
                    env=aws_env)
    assert ok.returncode == 0, failed(ok)


@pytest.mark.parametrize("args, message", [
    (["--param", "lr=0.1:0.001"], "min 0.1 must be below max 0.001"),
    (["--param", "weight-decay=0:0.1:log"], "a logarithmic range needs min > 0"),
    (["--param", "batch-size=1.5:4"], "hyperparameter batch-size='1.5': expected int"),
    (["--param", "freeze=head,sideways"], "choose one of auto, head, none, head-then-all"),
    (["--hp", "lr=0.01"], "lr: both tuned and static"),
    (["--max-jobs", "2", "--max-parallel", "3"], "--max-parallel 3: must be from 1 to --max-jobs (2)"),
    (["--checkpoint-s3", "s3://x/y"], "--checkpoint-s3 is for train.py"),
])
def test_bad_tuning_input_exits_2(args, message):
    result = run_script("tune.py", "--dry-run", "--data", DATA, "--role", ROLE, *args, env=offline_env())
    assert result.returncode == 2, failed(result)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_tuning_dry_run_is_validated_by_botocore():
    result = run_script("tune.py", "--dry-run", "--data", DATA, "--role", ROLE, "--strategy", "Random",
                        env=offline_env())
    assert result.returncode == 0, failed(result)
    [sent] = dry_run_requests(result.stdout)
    assert sent["operation"] == "CreateHyperParameterTuningJob"
    assert sent["request"]["HyperParameterTuningJobConfig"]["Strategy"] == "Random"


@pytest.mark.parametrize("instance_type, image", [
    ("ml.g4dn.xlarge", "imgclf-train-gpu"), ("ml.p5.48xlarge", "imgclf-train-gpu"),
    ("ml.p6-b200.48xlarge", "imgclf-train-gpu"), ("ml.m5.xlarge", "imgclf-train-cpu"),
    ("ml.c6i.4xlarge", "imgclf-train-cpu")])
def test_the_image_follows_the_gpu_family_table(instance_type, image):
    result = run_script("train.py", "--dry-run", "--data", DATA, "--role", ROLE, "--instance-type", instance_type,
                        env=offline_env())
    assert result.returncode == 0, failed(result)
    [sent] = dry_run_requests(result.stdout)
    assert f"/{image}:" in sent["request"]["AlgorithmSpecification"]["TrainingImage"]


@pytest.mark.parametrize("instance_type, reason", [
    ("ml.p3.2xlarge", "V100"), ("ml.g4ad.xlarge", "AMD"), ("ml.trn1.2xlarge", "Trainium"),
    ("ml.g9x.xlarge", "not in imgclf.instances.GPU_FAMILIES")])
def test_families_no_image_can_serve_are_refused_before_sending(instance_type, reason):
    result = run_script("train.py", "--dry-run", "--data", DATA, "--role", ROLE, "--instance-type", instance_type,
                        env=offline_env())
    assert result.returncode == 2, failed(result)
    assert instance_type in result.stderr and reason in result.stderr and "Traceback" not in result.stderr
    assert "{" not in result.stdout  # nothing was (dry-)sent
