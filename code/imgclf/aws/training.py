"""Request builders for SageMaker training and hyperparameter tuning jobs.

Hyperparameter names, types and bounds come from imgclf.config.SCHEMA, the metric regexes from
imgclf.config.METRIC_DEFINITIONS and the search space and objectives from imgclf.search.space: what the
scripts send is checked against what the training code accepts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imgclf.aws.images import LOCAL_INSTANCE_TYPES
from imgclf.config import (
    CHECKPOINT_DIR,
    METRIC_DEFINITIONS,
    TENSORBOARD_DIR,
    default,
    hyperparameter_strings,
    parse_value,
    rule_metric_definitions,
)
from imgclf.debugging.rules import RULES
from imgclf.errors import UserError
from imgclf.search.results import user_hyperparameters
from imgclf.search.space import OBJECTIVES, check_disjoint, parameter_ranges

CHANNELS = ("training", "train", "valid", "test", "weights")
INPUT_MODES = ("File", "FastFile", "Pipe")
PIPE_REFUSED = ("--input-mode Pipe: Pipe streams each channel as one FIFO of records, and the job reads an ImageFolder "
                "(class folders of image files); use File (copied before training) or FastFile (read from S3 on "
                "demand)")
SHARDED_CHANNEL = "train"  # the one channel --shard-by-s3-key splits between the instances
MAX_KEEP_ALIVE_S = 3600  # warm pools: SageMaker's documented maximum (the API model allows more)
MAX_RETRIES = 30  # RetryStrategy.MaximumRetryAttempts: 1-30
# Tuning: ResourceLimits.MaxRuntimeInSeconds, and Hyperband's largest MaxResource (epochs).
TUNING_RUNTIME_S = (120, 15_768_000)
HYPERBAND_MAX_RESOURCE = 20_000


@dataclass
class JobSpec:
    """What a training job and a tuning job's training-job definition share."""

    image: str
    role_arn: str
    channels: dict[str, str]  # channel name -> S3 URI
    output_path: str
    instance_type: str = "ml.m5.xlarge"
    instance_count: int = 1
    volume_gb: int = 50
    max_runtime_s: int = 24 * 3600
    spot: bool = False
    max_wait_s: int | None = None
    checkpoint_uri: str | None = None
    tensorboard_uri: str | None = None  # live sync of /opt/ml/output/tensorboard: events, rules.json, report
    network_isolation: bool = False
    environment: dict[str, str] = field(default_factory=dict)
    subnets: list[str] = field(default_factory=list)  # VPC: the job's instances run in these subnets
    security_groups: list[str] = field(default_factory=list)
    output_kms_key: str | None = None  # encrypts model.tar.gz, output.tar.gz (and checkpoints) in S3
    volume_kms_key: str | None = None  # encrypts the instances' storage volumes
    encrypt_inter_container: bool = False  # distributed training: encrypt traffic between the instances
    input_mode: str = "File"  # TrainingInputMode and each channel's InputMode: File or FastFile
    shard_train: bool = False  # the train channel ShardedByS3Key: each instance gets its own part of the files
    keep_alive_s: int | None = None  # warm pool: ResourceConfig.KeepAlivePeriodInSeconds
    max_retries: int | None = None  # RetryStrategy.MaximumRetryAttempts
    local: bool = False  # SageMaker's local mode: file:// locations, instance type local or local_gpu

    def check(self) -> None:
        problems = []
        unknown = sorted(set(self.channels) - set(CHANNELS))
        if unknown:
            problems.append(f"unknown channel(s) {', '.join(unknown)}: use {', '.join(CHANNELS)}")
        if "training" not in self.channels and not {"train", "valid"} <= set(self.channels):
            problems.append("no data: give --data s3://... (folder with train/ valid/ test/) or channels train and "
                            "valid")
        schemes = ("s3://", "file://") if self.local else ("s3://",)
        for name, uri in [*self.channels.items(), ("output", self.output_path),
                          ("checkpoint", self.checkpoint_uri or "s3://"),
                          ("tensorboard", self.tensorboard_uri or "s3://")]:
            if not uri.startswith(schemes):
                problems.append(f"{name} location {uri!r} is not an s3:// URI")
        if self.local:
            if self.instance_type not in LOCAL_INSTANCE_TYPES:
                problems.append(f"instance type {self.instance_type!r}: local mode takes "
                                + " or ".join(LOCAL_INSTANCE_TYPES))
        elif not self.instance_type.startswith("ml."):
            problems.append(f"instance type {self.instance_type!r}: SageMaker types start with ml. (ml.m5.xlarge)")
        if self.spot:
            wait = self.max_wait_s or self.max_runtime_s
            if wait < self.max_runtime_s:
                problems.append(f"max wait {wait} s is shorter than max runtime {self.max_runtime_s} s: spot jobs "
                                "need max wait >= max runtime")
        elif self.max_wait_s:
            problems.append("max wait applies to managed spot training only: add --spot or drop --max-wait")
        if not 1 <= self.volume_gb <= 16384:
            problems.append(f"volume size {self.volume_gb} GB: must be 1-16384")
        if self.instance_count < 1:  # more than 1: distributed data-parallel training (imgclf.training.distributed)
            problems.append(f"instance count {self.instance_count}: must be 1 or more")
        if bool(self.subnets) != bool(self.security_groups):
            problems.append("a VPC needs both --subnet and --security-group (each may repeat)")
        problems += [f"--subnet {s!r}: expected subnet-<hex>" for s in self.subnets if not s.startswith("subnet-")]
        problems += [f"--security-group {g!r}: expected sg-<hex>" for g in self.security_groups
                     if not g.startswith("sg-")]
        problems += self._check_options()
        if problems:
            raise UserError("; ".join(problems))

    def _check_options(self) -> list[str]:
        """Input mode, sharding, warm pool and retries."""
        problems = []
        if self.input_mode == "Pipe":
            problems.append(PIPE_REFUSED)
        elif self.input_mode not in INPUT_MODES:
            problems.append(f"input mode {self.input_mode!r}: use File or FastFile")
        elif self.local and self.input_mode != "File":
            problems.append(f"input mode {self.input_mode}: local mode mounts local folders (File)")
        if self.shard_train:
            if self.instance_count < 2:
                problems.append(f"--shard-by-s3-key splits the train channel between the instances: it needs "
                                f"--instance-count 2 or more (got {self.instance_count})")
            if SHARDED_CHANNEL not in self.channels:
                problems.append("--shard-by-s3-key splits the train channel only (every instance needs the whole "
                                "validation and test splits): give --channel train=S3URI --channel valid=S3URI "
                                "[--channel test=S3URI] instead of --data")
        if self.keep_alive_s is not None:
            if not 0 <= self.keep_alive_s <= MAX_KEEP_ALIVE_S:
                problems.append(f"--keep-alive {self.keep_alive_s}: warm pools keep instances 0-{MAX_KEEP_ALIVE_S} s")
            if self.spot:
                problems.append("--keep-alive with --spot: SageMaker's warm pools do not take managed spot training; "
                                "drop one")
        if self.max_retries is not None and not 1 <= self.max_retries <= MAX_RETRIES:
            problems.append(f"--max-retries {self.max_retries}: SageMaker retries a job 1-{MAX_RETRIES} times")
        if self.local:
            problems += [f"{flag}: not in SageMaker's local mode" for flag, given in (
                ("--shard-by-s3-key", self.shard_train), ("--keep-alive", self.keep_alive_s is not None),
                ("--max-retries", self.max_retries is not None)) if given]
        return problems

    def input_data_config(self) -> list[dict]:
        return [{"ChannelName": name, "InputMode": self.input_mode,
                 "DataSource": _data_source(uri, self.shard_train and name == SHARDED_CHANNEL)}
                for name, uri in sorted(self.channels.items())]

    def common(self) -> dict:
        """The fields CreateTrainingJob and a tuning job's TrainingJobDefinition share."""
        request: dict[str, Any] = {
            "RoleArn": self.role_arn,
            "InputDataConfig": self.input_data_config(),
            "OutputDataConfig": {"S3OutputPath": self.output_path},
            "ResourceConfig": {"InstanceType": self.instance_type, "InstanceCount": self.instance_count,
                               "VolumeSizeInGB": self.volume_gb},
            "StoppingCondition": {"MaxRuntimeInSeconds": self.max_runtime_s},
            "EnableManagedSpotTraining": self.spot,
            "EnableNetworkIsolation": self.network_isolation,
        }
        if self.spot:
            request["StoppingCondition"]["MaxWaitTimeInSeconds"] = self.max_wait_s or self.max_runtime_s
        if self.checkpoint_uri:
            request["CheckpointConfig"] = {"S3Uri": self.checkpoint_uri, "LocalPath": CHECKPOINT_DIR}
        if self.environment:
            request["Environment"] = dict(self.environment)
        if self.subnets:
            request["VpcConfig"] = {"Subnets": list(self.subnets), "SecurityGroupIds": list(self.security_groups)}
        if self.output_kms_key:
            request["OutputDataConfig"]["KmsKeyId"] = self.output_kms_key
        if self.volume_kms_key:
            request["ResourceConfig"]["VolumeKmsKeyId"] = self.volume_kms_key
        if self.encrypt_inter_container:
            request["EnableInterContainerTrafficEncryption"] = True
        if self.keep_alive_s is not None:
            request["ResourceConfig"]["KeepAlivePeriodInSeconds"] = self.keep_alive_s
        if self.max_retries is not None:
            request["RetryStrategy"] = {"MaximumRetryAttempts": self.max_retries}
        return request


def _data_source(uri: str, sharded: bool = False) -> dict:
    """S3, or for the SDK's local mode a local folder (its FileDataSource, which requires the distribution type).
    `sharded`: each instance gets its own part of the objects (the training job reads inputdataconfig.json's
    S3DistributionType and splits its sampler accordingly: imgclf.training.sampling)."""
    if uri.startswith("file://"):
        return {"FileDataSource": {"FileUri": uri, "FileDataDistributionType": "FullyReplicated"}}
    return {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                             "S3DataDistributionType": "ShardedByS3Key" if sharded else "FullyReplicated"}}


def metric_definitions(rules: bool = False) -> list[dict[str, str]]:
    """The training metrics; with `rules`, also the rule metrics (rules:issues, rule:<name>) for alarms."""
    return [dict(m) for m in (*METRIC_DEFINITIONS, *(rule_metric_definitions(RULES) if rules else ()))]


def sdk_metric_definitions(rules: bool = False) -> list:
    """metric_definitions() as the SageMaker SDK's MetricDefinition shapes, for `ModelTrainer(...)
    .with_metric_definitions(...)` (docs/sdk.md). HyperparameterTuner takes metric_definitions() as they are."""
    from sagemaker.core.shapes import MetricDefinition

    return [MetricDefinition(name=m["Name"], regex=m["Regex"]) for m in metric_definitions(rules)]


def sdk_hyperparameter_ranges(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A search space (imgclf.search.space.DEFAULT_SEARCH_SPACE, or a --search-space file's) as the SageMaker SDK's
    parameter ranges, for `HyperparameterTuner(hyperparameter_ranges=...)` (docs/sdk.md): the ParameterRanges
    that tune.py sends, checked with the schema by parameter_ranges()."""
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter

    ranges = parameter_ranges(space)
    sdk: dict[str, Any] = {}
    # The bounds stay the schema's strings (hp_string): the SDK sends them unchanged, as tune.py does.
    for r in ranges.get("ContinuousParameterRanges", []):
        sdk[r["Name"]] = ContinuousParameter(r["MinValue"], r["MaxValue"], r["ScalingType"])
    for r in ranges.get("IntegerParameterRanges", []):
        sdk[r["Name"]] = IntegerParameter(r["MinValue"], r["MaxValue"], r["ScalingType"])
    for r in ranges.get("CategoricalParameterRanges", []):
        sdk[r["Name"]] = CategoricalParameter(r["Values"])
    return sdk


def training_job_request(name: str, spec: JobSpec, hyperparameters: dict[str, Any],
                         tags: list[dict[str, str]] | None = None) -> dict:
    spec.check()
    request = {
        "TrainingJobName": name,
        "HyperParameters": hyperparameter_strings(hyperparameters),
        "AlgorithmSpecification": {"TrainingImage": spec.image, "TrainingInputMode": spec.input_mode,
                                   "MetricDefinitions": metric_definitions(rules=True),
                                   "EnableSageMakerMetricsTimeSeries": True},
        **spec.common(),
    }
    if spec.tensorboard_uri:  # a training job only: tuning jobs' definitions have no TensorBoardOutputConfig
        request["TensorBoardOutputConfig"] = {"S3OutputPath": spec.tensorboard_uri, "LocalPath": TENSORBOARD_DIR}
    if tags:
        request["Tags"] = tags
    return request


def tuning_job_request(name: str, spec: JobSpec, space: dict[str, dict[str, Any]],
                       static_hyperparameters: dict[str, Any], objective: str = "accuracy",
                       max_jobs: int = 10, max_parallel: int = 2, early_stopping: bool = True,
                       strategy: str = "Bayesian", warm_start_from: list[str] | None = None,
                       warm_start_type: str = "IdenticalDataAndAlgorithm",
                       tags: list[dict[str, str]] | None = None, hyperband_min_epochs: int | None = None,
                       target_objective: float | None = None, max_runtime_s: int | None = None,
                       random_seed: int | None = None) -> dict:
    """CreateHyperParameterTuningJob. Hyperband: see hyperband_config. Completion criteria: `target_objective` (the
    objective's value at which SageMaker stops the tuning job) and `max_runtime_s` (the whole tuning job's limit)."""
    spec.check()
    check_disjoint(space, static_hyperparameters)
    if max_jobs < 1:
        raise UserError(f"--max-jobs {max_jobs}: give at least 1 training job")
    if not 1 <= max_parallel <= max_jobs:
        raise UserError(f"--max-parallel {max_parallel}: must be from 1 to --max-jobs ({max_jobs})")
    metric, direction = OBJECTIVES[objective]
    config: dict[str, Any] = {
        "Strategy": strategy,
        "HyperParameterTuningJobObjective": {"Type": direction, "MetricName": metric},
        "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel},
        "ParameterRanges": parameter_ranges(space),
        "TrainingJobEarlyStoppingType": "Auto" if early_stopping else "Off",
    }
    if strategy == "Hyperband":
        config["StrategyConfig"] = {"HyperbandStrategyConfig": hyperband_config(space, static_hyperparameters,
                                                                                hyperband_min_epochs)}
        config["TrainingJobEarlyStoppingType"] = "Off"  # SageMaker requires it: Hyperband stops jobs itself
    elif hyperband_min_epochs is not None:
        raise UserError("--hyperband-min-epochs is for --strategy Hyperband")
    if target_objective is not None:
        check_target(objective, target_objective)
        config["TuningJobCompletionCriteria"] = {"TargetObjectiveMetricValue": target_objective}
    if max_runtime_s is not None:
        low, high = TUNING_RUNTIME_S
        if not low <= max_runtime_s <= high:
            raise UserError(f"--max-tuning-runtime {max_runtime_s}: SageMaker takes {low}-{high} seconds")
        config["ResourceLimits"]["MaxRuntimeInSeconds"] = max_runtime_s
    if random_seed is not None:
        if random_seed < 0:
            raise UserError(f"--random-seed {random_seed}: must be 0 or more")
        config["RandomSeed"] = random_seed
    request: dict[str, Any] = {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": config,
        "TrainingJobDefinition": {
            "StaticHyperParameters": hyperparameter_strings(static_hyperparameters),
            "AlgorithmSpecification": {"TrainingImage": spec.image, "TrainingInputMode": spec.input_mode,
                                       "MetricDefinitions": metric_definitions()},
            **spec.common(),
        },
    }
    if warm_start_from:
        request["WarmStartConfig"] = {
            "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": p} for p in warm_start_from],
            "WarmStartType": warm_start_type}
    if tags:
        request["Tags"] = tags
    return request


HYPERBAND_EPOCHS_TUNED = (
    "--strategy Hyperband: epochs is the resource Hyperband hands out (HyperbandStrategyConfig.MaxResource, which "
    "SageMaker takes from the static epochs), so it cannot be tuned: drop the epochs range (--param or "
    "--search-space) and give --hp epochs=N, the most epochs a training job may run")


def hyperband_config(space: dict[str, Any], static: dict[str, Any], min_epochs: int | None) -> dict[str, int]:
    """HyperbandStrategyConfig. Hyperband's resource is epochs, counted by the objective values a job prints (one
    `epoch=N ... valid_accuracy=...` line per epoch): SageMaker stops a job when Hyperband gives up on it, and at
    MaxResource. MaxResource is the static epochs (what SageMaker infers when it is missing, sent explicitly here),
    so epochs must be static; MinResource (optional) is the fewest epochs before a job may be stopped."""
    if "epochs" in space:
        raise UserError(HYPERBAND_EPOCHS_TUNED)
    epochs = int(parse_value("epochs", static.get("epochs", default("epochs"))))
    if epochs > HYPERBAND_MAX_RESOURCE:
        raise UserError(f"epochs={epochs}: Hyperband allows at most {HYPERBAND_MAX_RESOURCE}")
    config = {"MaxResource": epochs}
    if min_epochs is not None:
        if not 1 <= min_epochs <= epochs:
            raise UserError(f"--hyperband-min-epochs {min_epochs}: must be between 1 and epochs={epochs} "
                            "(MaxResource)")
        config["MinResource"] = min_epochs
    return config


def check_target(objective: str, value: float) -> None:
    """A target objective value the metric can reach: accuracy is a fraction (0.85, not 85), a loss is >= 0."""
    metric, _ = OBJECTIVES[objective]
    if objective == "accuracy" and not 0 < value <= 1:
        raise UserError(f"--target-objective {value:g}: {metric} is a fraction between 0 and 1 (e.g. 0.85)")
    if objective == "loss" and value < 0:
        raise UserError(f"--target-objective {value:g}: {metric} is 0 or more")


def best_hyperparameters(tuning_job: dict) -> dict[str, Any]:
    """Static + the best job's tuned hyperparameters of a DescribeHyperParameterTuningJob answer, validated."""
    best = tuning_job.get("BestTrainingJob")
    if not best:
        raise UserError(f"tuning job {tuning_job.get('HyperParameterTuningJobName')} has no best training job "
                        "(no job reported the objective metric; check the jobs' logs)")
    definition = tuning_job.get("TrainingJobDefinition") or {}
    merged = {**definition.get("StaticHyperParameters", {}), **best.get("TunedHyperParameters", {})}
    return hyperparameter_strings(user_hyperparameters(merged))



MAX_WARM_START_PARENTS = 5  # SageMaker's limit (HyperParameterTuningJobWarmStartConfig)
MAX_STATIC_CHANGES = 10  # tunable -> static plus changed static values, counted against the parents
RANGE_KINDS = ("ContinuousParameterRanges", "IntegerParameterRanges", "CategoricalParameterRanges")


def _hyperparameter_kinds(config: dict, definition: dict) -> dict[str, str]:
    """name -> Continuous / Integer / Categorical / static, as a tuning job request or description has them."""
    kinds = {k: "static" for k in definition.get("StaticHyperParameters", {})
             if not k.startswith(("_", "sagemaker_"))}  # what SageMaker adds itself
    for key in RANGE_KINDS:
        kinds.update({r["Name"]: key.removesuffix("ParameterRanges")
                      for r in config.get("ParameterRanges", {}).get(key, [])})
    return kinds


def check_warm_start(request: dict, parents: dict[str, dict]) -> None:
    """SageMaker's warm start rules, checked before sending: `parents` maps each parent's name to its
    DescribeHyperParameterTuningJob answer. Raises UserError naming every broken rule."""
    config, definition = request["HyperParameterTuningJobConfig"], request["TrainingJobDefinition"]
    objective = config["HyperParameterTuningJobObjective"]
    kinds = _hyperparameter_kinds(config, definition)
    static = definition.get("StaticHyperParameters", {})
    problems = []
    for name, parent in parents.items():
        status = parent["HyperParameterTuningJobStatus"]
        if status not in ("Completed", "Stopped", "Failed"):
            problems.append(f"parent {name} is {status}: warm start needs parents that have ended")
        p_objective = parent["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
        if (p_objective["MetricName"], p_objective["Type"]) != (objective["MetricName"], objective["Type"]):
            problems.append(f"parent {name} {p_objective['Type'].lower()}s {p_objective['MetricName']}, this job "
                            f"{objective['Type'].lower()}s {objective['MetricName']}: warm start needs the same "
                            "objective (--objective)")
        p_definition = parent.get("TrainingJobDefinition") or {}
        p_kinds = _hyperparameter_kinds(parent["HyperParameterTuningJobConfig"], p_definition)
        if set(p_kinds) != set(kinds):
            missing, extra = sorted(set(p_kinds) - set(kinds)), sorted(set(kinds) - set(p_kinds))
            problems.append(f"parent {name} has other hyperparameters (static and tuned together): "
                            + "; ".join(filter(None, [f"add {', '.join(missing)} (--hp or --param)" if missing else "",
                                                      f"drop {', '.join(extra)}" if extra else ""])))
        changed_kind = sorted(k for k in set(p_kinds) & set(kinds)
                              if "static" not in (p_kinds[k], kinds[k]) and p_kinds[k] != kinds[k])
        if changed_kind:
            problems.append(f"parent {name} tunes {', '.join(f'{k} as {p_kinds[k]}' for k in changed_kind)}: a "
                            "warm start keeps each range's type")
        p_static = p_definition.get("StaticHyperParameters", {})
        changes = [k for k in static if k in p_kinds and (p_kinds[k] != "static" or p_static.get(k) != static[k])]
        if len(changes) > MAX_STATIC_CHANGES:
            problems.append(f"{len(changes)} static hyperparameters differ from parent {name} "
                            f"({', '.join(sorted(changes))}): SageMaker allows {MAX_STATIC_CHANGES}")
        if request.get("WarmStartConfig", {}).get("WarmStartType") == "IdenticalDataAndAlgorithm":
            image = definition["AlgorithmSpecification"]["TrainingImage"]
            p_image = p_definition.get("AlgorithmSpecification", {}).get("TrainingImage")
            if p_image and p_image != image:
                problems.append(f"parent {name} trained with {p_image}, this job with {image}: "
                                "IdenticalDataAndAlgorithm needs the same image (or --warm-start-type "
                                "TransferLearning)")
    if problems:
        raise UserError("warm start: " + "; ".join(problems))
