"""train.py and tune.py job options: input mode, per-host shards, warm pools, retries, Hyperband, completion criteria
and the tuning seed. Every request is validated offline against botocore's model (--dry-run), and sent to the moto
server where moto keeps the fields; refusals exit 2 with one line before anything is sent."""

from __future__ import annotations

import json

import pytest

from tests.aws_helpers import ROLE, client, dry_run_requests, failed, offline_env, run_script

DATA = "s3://dogs-train/dogImages"
CHANNELS = ["--channel", f"train={DATA}/train/", "--channel", f"valid={DATA}/valid/", "--channel",
            f"test={DATA}/test/"]
SHARDED = [*CHANNELS, "--instance-count", "4", "--shard-by-s3-key", "--input-mode", "FastFile", "--keep-alive",
           "900", "--max-retries", "3"]


def _one_request(result) -> dict:
    assert result.returncode == 0, failed(result)
    [sent] = dry_run_requests(result.stdout)  # validated against botocore's service model
    return sent["request"]


def _refused(result, message: str, only_line: bool = False) -> None:
    """Exit 2, the reason on one line (with `only_line`, the only line: nothing else started), nothing (dry-)sent.
    An offline dry run warns first that it has no AWS access."""
    assert result.returncode == 2, failed(result)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr
    assert not only_line or lines == errors, result.stderr
    assert "{" not in result.stdout


def _distribution(request: dict) -> dict[str, tuple[str, str]]:
    return {c["ChannelName"]: (c["InputMode"], c["DataSource"]["S3DataSource"]["S3DataDistributionType"])
            for c in request["InputDataConfig"]}


def test_fast_file_shards_warm_pool_and_retries_in_a_training_job_request():
    r = _one_request(run_script("train.py", "--dry-run", "--role", ROLE, *SHARDED, env=offline_env()))
    assert r["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    # only train is split between the instances: every instance evaluates on the whole valid and test splits
    assert _distribution(r) == {"train": ("FastFile", "ShardedByS3Key"), "valid": ("FastFile", "FullyReplicated"),
                                "test": ("FastFile", "FullyReplicated")}
    assert r["ResourceConfig"]["InstanceCount"] == 4 and r["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 900
    assert r["RetryStrategy"] == {"MaximumRetryAttempts": 3}
    default = _one_request(run_script("train.py", "--dry-run", "--role", ROLE, "--data", DATA, env=offline_env()))
    assert default["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert _distribution(default) == {"training": ("File", "FullyReplicated")}
    assert "KeepAlivePeriodInSeconds" not in default["ResourceConfig"] and "RetryStrategy" not in default


def test_training_job_options_round_trip_through_moto(aws_env, moto_server):
    result = run_script("train.py", "--role", ROLE, *SHARDED, "--job-name", "sharded-warm", "--no-wait", env=aws_env)
    assert result.returncode == 0, failed(result)
    job = client("sagemaker", moto_server).describe_training_job(TrainingJobName="sharded-warm")
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    assert _distribution(job) == {"train": ("FastFile", "ShardedByS3Key"), "valid": ("FastFile", "FullyReplicated"),
                                  "test": ("FastFile", "FullyReplicated")}
    assert job["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 900 and job["ResourceConfig"]["InstanceCount"] == 4
    # moto 5.2.5 does not keep a training job's RetryStrategy: the dry run above validated it


@pytest.mark.parametrize("script", ["train.py", "tune.py"])
@pytest.mark.parametrize("args, message", [
    (["--data", DATA, "--input-mode", "Pipe"], "--input-mode Pipe: Pipe streams each channel as one FIFO of records, "
                                               "and the job reads an ImageFolder"),
    ([*CHANNELS, "--shard-by-s3-key"], "--shard-by-s3-key splits the train channel between the instances: it needs "
                                       "--instance-count 2 or more (got 1)"),
    (["--data", DATA, "--instance-count", "2", "--shard-by-s3-key"], "--shard-by-s3-key splits the train channel "
                                                                     "only (every instance needs the whole validation"),
    (["--data", DATA, "--keep-alive", "3601"], "--keep-alive 3601: warm pools keep instances 0-3600 s"),
    (["--data", DATA, "--keep-alive", "600", "--spot"], "warm pools do not take managed spot training"),
    (["--data", DATA, "--max-retries", "31"], "--max-retries 31: SageMaker retries a job 1-30 times"),
    (["--data", DATA, "--max-retries", "0"], "--max-retries 0: SageMaker retries a job 1-30 times"),
])
def test_job_options_sagemaker_would_refuse_exit_2(script, args, message):
    _refused(run_script(script, "--dry-run", "--role", ROLE, *args, env=offline_env()), message)


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--keep-alive", "60", "--max-retries", "2"],
     "--keep-alive, --max-retries: not in local mode (local containers are not kept warm; a failed local job is not "
     "retried)"),
    ("train.py", ["--shard-by-s3-key", "--instance-count", "2"],
     "--shard-by-s3-key: not in local mode (every local container mounts the whole folder)"),
    ("train.py", ["--spot", "--checkpoint-s3", "s3://b/ck"],
     "--spot, --checkpoint-s3: not in local mode (local containers run on this machine, not on spot capacity; "
     "SageMaker's local mode ignores CheckpointConfig: a rerun would start over)"),
    ("train.py", ["--input-mode", "Pipe"], "--input-mode Pipe"),
    ("tune.py", ["--keep-alive", "60"], "--keep-alive: not in local mode"),
    ("tune.py", ["--strategy", "Hyperband"],
     "--strategy Hyperband is a SageMaker tuning job's: the local search (Optuna) samples with Bayesian (TPE) or "
     "Random, and its --pruner halving"),
    ("tune.py", ["--random-seed", "7"], "--random-seed is a tuning job's; the local search's sampler takes --seed N"),
    ("tune.py", ["--max-tuning-runtime", "3600"], "the local search takes --timeout SECONDS"),
    ("tune.py", ["--target-objective", "0.9"], "--target-objective: SageMaker tuning job option(s), not used by "
                                               "--local"),
])
def test_local_refuses_what_local_mode_cannot_do_before_anything_starts(tmp_path, script, args, message):
    # No Docker, no data: the refusal comes first.
    _refused(run_script(script, "--local", "--data", str(tmp_path), *args, env=offline_env()), message, only_line=True)


def test_the_local_searchs_seed_points_a_tuning_job_to_random_seed():
    seed = run_script("tune.py", "--dry-run", "--role", ROLE, "--data", DATA, "--seed", "3", env=offline_env())
    _refused(seed, "--seed is the local search's; a tuning job takes --random-seed N")


def _tuning(*args: str) -> dict:
    return _one_request(run_script("tune.py", "--dry-run", "--role", ROLE, "--data", DATA, *args, env=offline_env()))


def test_hyperband_takes_epochs_from_the_static_hyperparameters():
    r = _tuning("--strategy", "Hyperband", "--hyperband-min-epochs", "2", "--target-objective", "0.9",
                "--max-tuning-runtime", "21600", "--random-seed", "7", "--input-mode", "FastFile",
                "--keep-alive", "300", "--max-retries", "2")
    config, definition = r["HyperParameterTuningJobConfig"], r["TrainingJobDefinition"]
    assert config["Strategy"] == "Hyperband"
    # the default space's epochs range {5, 7, 10} gives way to its largest value: Hyperband hands out epochs
    assert config["StrategyConfig"] == {"HyperbandStrategyConfig": {"MaxResource": 10, "MinResource": 2}}
    assert definition["StaticHyperParameters"] == {"epochs": "10", "head-solver": "sgd"}
    assert "epochs" not in json.dumps(config["ParameterRanges"])
    assert config["TrainingJobEarlyStoppingType"] == "Off"  # SageMaker requires Off with Hyperband
    assert config["TuningJobCompletionCriteria"] == {"TargetObjectiveMetricValue": 0.9}
    assert config["ResourceLimits"]["MaxRuntimeInSeconds"] == 21600 and config["RandomSeed"] == 7
    assert definition["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    assert definition["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 300
    assert definition["RetryStrategy"] == {"MaximumRetryAttempts": 2}
    # --hp epochs sets MaxResource; a search space without epochs takes the training's default epochs
    assert _tuning("--strategy", "Hyperband", "--hp", "epochs=25")["HyperParameterTuningJobConfig"][
        "StrategyConfig"]["HyperbandStrategyConfig"] == {"MaxResource": 25}
    assert _tuning("--strategy", "Hyperband", "--param", "lr=0.001:0.01")["TrainingJobDefinition"][
        "StaticHyperParameters"]["epochs"] == "10"
    # other strategies keep SageMaker's early stopping, and no StrategyConfig
    bayes = _tuning("--random-seed", "0")["HyperParameterTuningJobConfig"]
    assert "StrategyConfig" not in bayes and bayes["TrainingJobEarlyStoppingType"] == "Auto"
    assert bayes["RandomSeed"] == 0


def test_tuning_job_options_round_trip_through_moto(aws_env, moto_server):
    result = run_script("tune.py", "--data", DATA, "--role", ROLE, "--strategy", "Hyperband", "--hp", "epochs=12",
                        "--hyperband-min-epochs", "3", "--target-objective", "0.25", "--objective", "loss",
                        "--max-tuning-runtime", "7200", "--random-seed", "42", "--max-retries", "4",
                        "--keep-alive", "120", "--job-name", "hpo-hyperband", "--no-wait", env=aws_env)
    assert result.returncode == 0, failed(result)
    job = client("sagemaker", moto_server).describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName="hpo-hyperband")
    config, definition = job["HyperParameterTuningJobConfig"], job["TrainingJobDefinition"]
    assert config["Strategy"] == "Hyperband"
    assert config["StrategyConfig"] == {"HyperbandStrategyConfig": {"MinResource": 3, "MaxResource": 12}}
    assert config["TuningJobCompletionCriteria"] == {"TargetObjectiveMetricValue": 0.25}
    assert config["ResourceLimits"]["MaxRuntimeInSeconds"] == 7200 and config["RandomSeed"] == 42
    assert config["TrainingJobEarlyStoppingType"] == "Off"
    assert definition["StaticHyperParameters"]["epochs"] == "12"
    assert definition["RetryStrategy"] == {"MaximumRetryAttempts": 4}
    assert definition["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 120


@pytest.mark.parametrize("args, message", [
    (["--strategy", "Hyperband", "--param", "epochs=3:9"], "--strategy Hyperband: epochs is the resource Hyperband "
                                                           "hands out (HyperbandStrategyConfig.MaxResource"),
    (["--strategy", "Hyperband", "--hyperband-min-epochs", "11"], "--hyperband-min-epochs 11: must be between 1 and "
                                                                  "epochs=10 (MaxResource)"),
    (["--hyperband-min-epochs", "2"], "--hyperband-min-epochs is for --strategy Hyperband"),
    (["--target-objective", "85"], "--target-objective 85: valid:accuracy is a fraction between 0 and 1"),
    (["--objective", "loss", "--target-objective", "-1"], "--target-objective -1: valid:loss is 0 or more"),
    (["--max-tuning-runtime", "60"], "--max-tuning-runtime 60: SageMaker takes 120-15768000 seconds"),
    (["--random-seed", "-1"], "--random-seed -1: must be 0 or more"),
])
def test_tuning_options_sagemaker_would_refuse_exit_2(args, message):
    _refused(run_script("tune.py", "--dry-run", "--role", ROLE, "--data", DATA, *args, env=offline_env()), message)


def test_hyperband_refuses_an_epochs_range_from_a_search_space_file(tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"type": "continuous", "min": 0.001, "max": 0.1},
                                 "epochs": {"type": "integer", "min": 2, "max": 20}}))
    _refused(run_script("tune.py", "--dry-run", "--role", ROLE, "--data", DATA, "--strategy", "Hyperband",
                        "--search-space", str(space), env=offline_env()),
             "so it cannot be tuned: drop the epochs range (--param or --search-space) and give --hp epochs=N")
