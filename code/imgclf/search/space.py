"""The search space and the objectives of hyperparameter tuning: what the SageMaker tuning job (imgclf.aws.training,
scripts/tune.py) and the local Optuna search (imgclf.search.local_search) both read.

Every bound and value is checked with the training code's own schema (imgclf.config.SCHEMA).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from imgclf.config import METRIC_DEFINITIONS, SCHEMA, hp_string, hyperparameter_strings, parse_value
from imgclf.errors import HyperparameterError, UserError

log = logging.getLogger(__name__)
PARAMS = {p.name: p for p in SCHEMA}
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
RANGE_KEYS = ("ContinuousParameterRanges", "IntegerParameterRanges", "CategoricalParameterRanges")


def objective_regex(objective: str) -> tuple[str, str, str]:
    """(metric name, direction, regex of the metric line) of an objective."""
    metric, direction = OBJECTIVES[objective]
    return metric, direction, next(d["Regex"] for d in METRIC_DEFINITIONS if d["Name"] == metric)


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
                        "SPACE in imgclf/search/space.py)")
    return data


# What only the training loop's steps use: a head fitted by head-solver=lbfgs ignores them.
LOOP_HYPERPARAMETERS = ("lr", "batch-size", "epochs", "optimizer", "momentum", "weight-decay", "label-smoothing",
                        "lr-scheduler", "warmup-epochs", "accumulate-steps", "backbone-lr-factor")


def static_hyperparameters(space: dict[str, Any], static: dict[str, Any]) -> dict[str, Any]:
    """The static hyperparameters a search sends: `static`, plus head-solver=sgd when the search tunes what only
    the training loop uses (the default space: lr, batch-size, epochs) and nobody chose the solver. Otherwise a
    frozen backbone's head would be fitted (head-solver=auto) and every trial would train the same model."""
    tuned = sorted(set(space) & set(LOOP_HYPERPARAMETERS))
    if not tuned or "head-solver" in space or "head-solver" in static:
        return static
    log.info("head-solver=sgd for every trial: the search tunes %s, which a fitted head would ignore",
             ", ".join(tuned))
    return {**static, "head-solver": "sgd"}


def check_disjoint(space: dict[str, Any], static: dict[str, Any]) -> None:
    both = sorted(set(space) & set(static))
    if both:
        raise HyperparameterError(f"{', '.join(both)}: both tuned and static; drop the static value or the range")


def _numeric_range(name: str, kind: str, r: dict[str, Any]) -> tuple[str, dict]:
    param = PARAMS[name]
    if kind == "integer" and param.type is not int or kind == "continuous" and param.type is not float:
        raise HyperparameterError(f"{name} is {param.type.__name__}: use a "
                                  f"{'integer' if param.type is int else 'continuous'} or categorical range")
    low, high = (parse_value(name, r.get(k)) for k in ("min", "max"))
    scaling = r.get("scaling", "Auto")
    if low >= high:
        raise HyperparameterError(f"{name}: min {low} must be below max {high}")
    if scaling not in SCALINGS:
        raise HyperparameterError(f"{name}: scaling {scaling!r} is not one of {', '.join(SCALINGS)}")
    if scaling == "Logarithmic" and low <= 0:
        raise HyperparameterError(f"{name}: a logarithmic range needs min > 0")
    key = "IntegerParameterRanges" if kind == "integer" else "ContinuousParameterRanges"
    return key, {"Name": name, "MinValue": hp_string(low), "MaxValue": hp_string(high), "ScalingType": scaling}


def _one_range(name: str, r: dict[str, Any]) -> tuple[str, dict]:
    kind = str(r.get("type", "")).lower()
    if kind == "categorical":
        values = r.get("values")
        if not isinstance(values, list) or not values:
            raise HyperparameterError(f"{name}: categorical range needs a non-empty list 'values'")
        strings = [hyperparameter_strings({name: v})[name] for v in values]
        return "CategoricalParameterRanges", {"Name": name, "Values": strings}
    if kind in ("continuous", "integer"):
        return _numeric_range(name, kind, r)
    raise HyperparameterError(f"{name}: type {kind!r} is not continuous, integer or categorical")


def parameter_ranges(space: dict[str, dict[str, Any]]) -> dict[str, list[dict]]:
    """The search space as SageMaker ParameterRanges; every bound and value is checked with the schema."""
    ranges: dict[str, list[dict]] = {key: [] for key in RANGE_KEYS}
    problems = []
    for name, r in sorted(space.items()):
        if name not in PARAMS:
            problems.append(f"{name}: unknown hyperparameter; known: {', '.join(PARAMS)}")
            continue
        try:
            key, entry = _one_range(name, r)
            ranges[key].append(entry)
        except HyperparameterError as e:
            problems.append(str(e))
    if problems:
        raise HyperparameterError("search space: " + "; ".join(problems))
    return {k: v for k, v in ranges.items() if v}
