"""The best-hyperparameters file of tune.py (cloud and --local), which `scripts/train.py --hyperparameters` reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgclf import atomic
from imgclf.errors import UserError


def write_best_file(path: Path, tuning_job: str, training_job: str | None, objective: dict,
                    hyperparameters: dict[str, str], **extra: Any) -> None:
    atomic.write_text(path, json.dumps({"tuning_job": tuning_job, "training_job": training_job, "objective": objective,
                                        "hyperparameters": hyperparameters, **extra}, indent=2, default=str) + "\n")


def load_hyperparameters(path: Path) -> dict[str, Any]:
    """A JSON object {name: value} (what tune.py writes); SageMaker-internal keys are dropped."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--hyperparameters {path}: cannot read a JSON object ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--hyperparameters {path}: expected a JSON object {{name: value}}, got {type(data).__name__}")
    data = data.get("hyperparameters", data)  # tune.py's file nests them next to the job's name and score
    return user_hyperparameters(data)


def user_hyperparameters(values: dict[str, Any]) -> dict[str, Any]:
    """Without SageMaker's own keys (sagemaker_*, _tuning_objective_metric), values JSON-unquoted."""
    return {k: unquote(v) for k, v in values.items() if not is_internal(k)}


def is_internal(key: str) -> bool:
    return key.startswith("sagemaker_") or key.startswith("_tuning_objective_metric")


def unquote(value: Any) -> Any:
    """Values that SageMaker returns JSON-quoted ('"vgg16"') become plain."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
