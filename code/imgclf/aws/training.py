"""Request builders for SageMaker training and hyperparameter tuning jobs, and the default search space.

Hyperparameter names, types and bounds come from imgclf.config.SCHEMA and the metric regexes from
imgclf.config.METRIC_DEFINITIONS: what the scripts send is checked against what the training code accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgclf.config import METRIC_DEFINITIONS, SCHEMA, parse_hyperparameters
from imgclf.errors import HyperparameterError, UserError

PARAMS = {p.name: p for p in SCHEMA}
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CHANNELS = ("training", "train", "valid", "test", "weights")
# Objective -> (metric name printed by the training loop, direction).
OBJECTIVES = {"accuracy": ("valid:accuracy", "Maximize"), "loss": ("valid:loss", "Minimize")}

# The reference project's search space. Shape of a search-space file (JSON), one entry per hyperparameter:
#   {"name": {"type": "continuous" | "integer", "min": x, "max": y, "scaling": "Auto|Linear|Logarithmic"}}
#   {"name": {"type": "categorical", "values": [a, b, ...]}}
DEFAULT_SEARCH_SPACE: dict[str, dict[str, Any]] = {
    "lr": {"type": "continuous", "min": 0.001, "max": 0.1, "scaling": "Logarithmic"},
    "batch-size": {"type": "categorical", "values": [128, 256]},
    "epochs": {"type": "categorical", "values": [5, 7, 10]},
}
SCALINGS = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")


def hp_string(value: Any) -> str:
    """SageMaker wants every hyperparameter value as a string; the training toolkit json-decodes it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def hyperparameter_strings(raw: dict[str, Any]) -> dict[str, str]:
    """Validate `raw` with the training code's schema; return only the given ones, as SageMaker strings."""
    valid = parse_hyperparameters(raw)
    return {name: hp_string(valid[name]) for name in sorted(raw)}


def load_hyperparameters(path: Path) -> dict[str, Any]:
    """A JSON object {name: value} (what tune.py writes); SageMaker-internal keys are dropped."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--hyperparameters {path}: cannot read a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--hyperparameters {path}: expected a JSON object {{name: value}}, got {type(data).__name__}")
    data = data.get("hyperparameters", data)  # tune.py's file nests them next to the job's name and score
    return {k: _unquote(v) for k, v in data.items() if not _internal(k)}


def _internal(key: str) -> bool:
    return key.startswith("sagemaker_") or key.startswith("_tuning_objective_metric")


def _unquote(value: Any) -> Any:
    """Values that SageMaker returns JSON-quoted ('"vgg16"') become plain."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


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
    network_isolation: bool = False
    environment: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        problems = []
        unknown = sorted(set(self.channels) - set(CHANNELS))
        if unknown:
            problems.append(f"unknown channel(s) {', '.join(unknown)}: use {', '.join(CHANNELS)}")
        if "training" not in self.channels and not {"train", "valid"} <= set(self.channels):
            problems.append("no data: give --data s3://... (folder with train/ valid/ test/) or channels train and "
                            "valid")
        for name, uri in [*self.channels.items(), ("output", self.output_path),
                          ("checkpoint", self.checkpoint_uri or "s3://")]:
            if not uri.startswith("s3://"):
                problems.append(f"{name} location {uri!r} is not an s3:// URI")
        if not self.instance_type.startswith("ml."):
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
        if self.instance_count < 1:  # more than 1: distributed data-parallel training (imgclf.distributed)
            problems.append(f"instance count {self.instance_count}: must be 1 or more")
        if problems:
            raise UserError("; ".join(problems))

    def input_data_config(self) -> list[dict]:
        return [{"ChannelName": name, "InputMode": "File",
                 "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                                 "S3DataDistributionType": "FullyReplicated"}}}
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
            request["CheckpointConfig"] = {"S3Uri": self.checkpoint_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
        if self.environment:
            request["Environment"] = dict(self.environment)
        return request


def metric_definitions() -> list[dict[str, str]]:
    return [dict(m) for m in METRIC_DEFINITIONS]


def training_job_request(name: str, spec: JobSpec, hyperparameters: dict[str, Any],
                         tags: list[dict[str, str]] | None = None) -> dict:
    spec.check()
    request = {
        "TrainingJobName": name,
        "HyperParameters": hyperparameter_strings(hyperparameters),
        "AlgorithmSpecification": {"TrainingImage": spec.image, "TrainingInputMode": "File",
                                   "MetricDefinitions": metric_definitions(),
                                   "EnableSageMakerMetricsTimeSeries": True},
        **spec.common(),
    }
    if tags:
        request["Tags"] = tags
    return request


def parse_range(name: str, spec: str) -> dict[str, Any]:
    """A flag's range: MIN:MAX[:log|linear] (continuous for float hyperparameters, integer for int) or a,b,c."""
    param = PARAMS.get(name)
    if param is None:
        raise HyperparameterError(f"--param {name}: unknown hyperparameter; known: {', '.join(PARAMS)}")
    if ":" in spec:
        low, high, *rest = spec.split(":")
        scaling = {"log": "Logarithmic", "linear": "Linear", "auto": "Auto"}.get(rest[0].lower() if rest else "auto")
        if scaling is None or len(rest) > 1:
            raise HyperparameterError(f"--param {name}={spec}: expected MIN:MAX[:log|linear|auto]")
        kind = "integer" if param.type is int else "continuous"
        return {"type": kind, "min": low, "max": high, "scaling": scaling}
    return {"type": "categorical", "values": [v.strip() for v in spec.split(",") if v.strip()]}


def load_search_space(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--search-space {path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UserError(f"--search-space {path}: expected {{name: {{type, min, max | values}}}} (see DEFAULT_SEARCH_"
                        "SPACE in imgclf/aws/training.py)")
    return data


def parameter_ranges(space: dict[str, dict[str, Any]]) -> dict[str, list[dict]]:
    """The search space as SageMaker ParameterRanges; every bound and value is checked with the schema."""
    ranges: dict[str, list[dict]] = {"ContinuousParameterRanges": [], "IntegerParameterRanges": [],
                                     "CategoricalParameterRanges": []}
    problems = []
    for name, r in sorted(space.items()):
        param = PARAMS.get(name)
        kind = str(r.get("type", "")).lower()
        if param is None:
            problems.append(f"{name}: unknown hyperparameter; known: {', '.join(PARAMS)}")
            continue
        try:
            if kind == "categorical":
                values = r.get("values")
                if not isinstance(values, list) or not values:
                    raise HyperparameterError(f"{name}: categorical range needs a non-empty list 'values'")
                strings = [hyperparameter_strings({name: v})[name] for v in values]
                ranges["CategoricalParameterRanges"].append({"Name": name, "Values": strings})
            elif kind in ("continuous", "integer"):
                if kind == "integer" and param.type is not int or kind == "continuous" and param.type is not float:
                    raise HyperparameterError(f"{name} is {param.type.__name__}: use a "
                                              f"{'integer' if param.type is int else 'continuous'} or categorical "
                                              "range")
                low, high = (parse_hyperparameters({name: r.get(k)})[name] for k in ("min", "max"))
                scaling = r.get("scaling", "Auto")
                if low >= high:
                    raise HyperparameterError(f"{name}: min {low} must be below max {high}")
                if scaling not in SCALINGS:
                    raise HyperparameterError(f"{name}: scaling {scaling!r} is not one of {', '.join(SCALINGS)}")
                if scaling == "Logarithmic" and low <= 0:
                    raise HyperparameterError(f"{name}: a logarithmic range needs min > 0")
                key = "IntegerParameterRanges" if kind == "integer" else "ContinuousParameterRanges"
                ranges[key].append({"Name": name, "MinValue": hp_string(low), "MaxValue": hp_string(high),
                                    "ScalingType": scaling})
            else:
                raise HyperparameterError(f"{name}: type {kind!r} is not continuous, integer or categorical")
        except HyperparameterError as e:
            problems.append(str(e))
    if problems:
        raise HyperparameterError("search space: " + "; ".join(problems))
    return {k: v for k, v in ranges.items() if v}


def tuning_job_request(name: str, spec: JobSpec, space: dict[str, dict[str, Any]],
                       static_hyperparameters: dict[str, Any], objective: str = "accuracy",
                       max_jobs: int = 10, max_parallel: int = 2, early_stopping: bool = True,
                       strategy: str = "Bayesian", warm_start_from: list[str] | None = None,
                       warm_start_type: str = "IdenticalDataAndAlgorithm",
                       tags: list[dict[str, str]] | None = None) -> dict:
    spec.check()
    both = sorted(set(space) & set(static_hyperparameters))
    if both:
        raise HyperparameterError(f"{', '.join(both)}: both tuned and static; drop the static value or the range")
    if not 1 <= max_parallel <= max_jobs:
        raise UserError(f"max parallel jobs {max_parallel} must be between 1 and max jobs {max_jobs}")
    metric, direction = OBJECTIVES[objective]
    request: dict[str, Any] = {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {
            "Strategy": strategy,
            "HyperParameterTuningJobObjective": {"Type": direction, "MetricName": metric},
            "ResourceLimits": {"MaxNumberOfTrainingJobs": max_jobs, "MaxParallelTrainingJobs": max_parallel},
            "ParameterRanges": parameter_ranges(space),
            "TrainingJobEarlyStoppingType": "Auto" if early_stopping else "Off",
        },
        "TrainingJobDefinition": {
            "StaticHyperParameters": hyperparameter_strings(static_hyperparameters),
            "AlgorithmSpecification": {"TrainingImage": spec.image, "TrainingInputMode": "File",
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


def best_hyperparameters(tuning_job: dict) -> dict[str, Any]:
    """Static + the best job's tuned hyperparameters of a DescribeHyperParameterTuningJob answer, validated."""
    best = tuning_job.get("BestTrainingJob")
    if not best:
        raise UserError(f"tuning job {tuning_job.get('HyperParameterTuningJobName')} has no best training job "
                        "(no job reported the objective metric; check the jobs' logs)")
    definition = tuning_job.get("TrainingJobDefinition") or {}
    merged = {**definition.get("StaticHyperParameters", {}), **best.get("TunedHyperParameters", {})}
    merged = {k: _unquote(v) for k, v in merged.items() if not _internal(k)}
    return hyperparameter_strings(merged)



def write_best_file(path: Path, tuning_job: str, training_job: str | None, objective: dict,
                    hyperparameters: dict[str, str], **extra: Any) -> None:
    """The best-hyperparameters file of tune.py (cloud and --local), read back by load_hyperparameters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"tuning_job": tuning_job, "training_job": training_job, "objective": objective,
                               "hyperparameters": hyperparameters, **extra}, indent=2, default=str) + "\n")
    tmp.replace(path)
