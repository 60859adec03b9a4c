"""The typed hyperparameters (config.Hyperparameters) against the schema; the narrow settings components take."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from imgclf import config
from imgclf.debugging.debugger import DebugSettings
from imgclf.errors import HyperparameterError
from imgclf.training.accel import SpeedSettings
from imgclf.training.job import LoaderSettings


def test_one_typed_field_per_schema_entry_in_its_order():
    hints = typing.get_type_hints(config.Hyperparameters)
    fields = [f.name for f in dataclasses.fields(config.Hyperparameters)]
    assert fields == [config.attribute_name(p.name) for p in config.SCHEMA]
    for p in config.SCHEMA:
        hint = hints[config.attribute_name(p.name)]
        if p.choices:
            assert p.type is str and typing.get_origin(hint) is typing.Literal, p.name
            resolved = typing.get_args(hint)  # an auto (true, false) that parse_hyperparameters resolves is no value
            assert p.choices in (resolved, ("auto", *resolved), ("auto", "true", "false", *resolved)), p.name
        else:
            assert hint is p.type, p.name


def test_parsed_values_have_the_schema_types_and_stay_put():
    hp = config.parse_hyperparameters({"lr": "0.01", "batch-size": 256.0, "export-int8": "yes", "pretrained": 0,
                                       "freeze": "HEAD-then-all", "rules-config": {"overfit": {"stop": True}}})
    assert (hp.lr, hp.batch_size, hp.export_int8, hp.pretrained, hp.freeze) == (0.01, 256, True, False, "head-then-all")
    assert type(hp.batch_size) is int and hp.rules_config == '{"overfit": {"stop": true}}'
    assert hp.augment == "flip"  # auto: flip unless freeze=head
    assert config.parse_hyperparameters({}).augment == "none"
    assert [config.parse_hyperparameters({"augment": a}).augment for a in ("true", "false", "TrivialAugment")] == \
        ["flip", "none", "trivialaugment"]


@pytest.mark.parametrize("given, freeze, augment", [
    ({}, "head", "none"),  # pretrained by default: a head on its features, which are then cached
    ({"pretrained": "false"}, "none", "flip"),  # random weights: every layer trains
    ({"pretrained": "false", "freeze": "head"}, "head", "none"),  # said so: kept (the job log warns)
    ({"pretrained": "true", "freeze": "none"}, "none", "flip"),
])
def test_freeze_auto_follows_pretrained(given, freeze, augment, caplog):
    from imgclf.training.job import freeze_plan

    hp = config.parse_hyperparameters(given)
    assert (hp.freeze, hp.augment) == (freeze, augment)
    plan = freeze_plan(hp)
    assert plan.startswith(f"freeze={freeze}: ") and ("pretrained" in plan) == hp.pretrained
    warned = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warned) == (freeze == "head" and not hp.pretrained)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.lr = 1.0  # type: ignore[misc]


def test_to_dict_gives_the_schema_names_and_parses_back():
    hp = config.parse_hyperparameters({"model": "resnet18", "augment": "true", "epochs": "3"})
    values = hp.to_dict()
    assert list(values) == [p.name for p in config.SCHEMA]
    assert values["batch-size"] == 32 and values["augment"] == "flip" and values["model"] == "resnet18"
    assert config.parse_hyperparameters(values) == hp
    defaults = {p.name: p.default for p in config.SCHEMA}
    assert config.parse_hyperparameters({}).to_dict() == {**defaults, "freeze": "head", "augment": "none"}


def test_the_strings_sagemaker_gets_are_unchanged():
    """The external contract: hyphenated names, SageMaker's strings, only the names given."""
    assert config.hyperparameter_strings({"export-int8": True, "lr": 0.01, "augment": "auto", "batch-size": "64"}) == \
        {"augment": "none", "batch-size": "64", "export-int8": "true", "lr": "0.01"}
    assert config.parse_value("batch-size", "64") == 64 and config.parse_value("freeze", "None") == "none"
    with pytest.raises(HyperparameterError, match="batch-size='big': expected int"):
        config.parse_value("batch-size", "big")


def test_components_take_their_own_settings():
    hp = config.parse_hyperparameters({"debugging": "false", "rules": "overfit", "collect-train-interval": 3,
                                       "profiler-steps": 0, "init-scale": 2.0, "num-workers": 0, "prefetch-factor": 2,
                                       "amp": "off", "compile": "on", "model": "resnet18"})
    debug = DebugSettings.from_hyperparameters(hp)
    assert (debug.debugging, debug.rules, debug.collect_train_interval, debug.profiler_steps, debug.init_scale) == \
        (False, "overfit", 3, 0, 2.0)
    assert debug.model == "resnet18" and debug.hyperparameters == hp.to_dict()  # what the report shows
    assert LoaderSettings.from_hyperparameters(hp) == LoaderSettings(num_workers=0, prefetch_factor=2)
    assert SpeedSettings.from_hyperparameters(hp) == SpeedSettings(amp="off", channels_last="auto", compile="on")


def test_loader_workers(monkeypatch):
    """-1: the CPUs this process may use / the host's training processes, less one each (no cap)."""
    for cpus, processes, workers in [(16, 4, 3), (16, 1, 15), (96, 8, 11), (192, 8, 23), (2, 1, 1), (1, 1, 1)]:
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert LoaderSettings(num_workers=-1, prefetch_factor=4).workers() == workers, (cpus, processes)
    assert LoaderSettings(num_workers=3, prefetch_factor=4).workers() == 3


def test_the_rules_help_names_every_rule_of_the_catalogue():
    from imgclf.debugging import rules

    help_text = next(p.help for p in config.SCHEMA if p.name == "rules")
    listed = help_text[help_text.index("(") + 1:help_text.rindex(")")].split(", ")
    assert listed == list(rules.RULES)
    assert len(rules.configure(",".join(listed)).results) == len(rules.RULES)
    gpu_rules = {name for name, cls in rules.RULES.items() if issubclass(cls, rules.GpuSampleRule)}
    assert gpu_rules < set(rules.PROFILER_RULES) < set(rules.RULES)  # the report's profiler section: not overfit...
    assert "overfit" not in rules.PROFILER_RULES and "dataloader_wait" in rules.PROFILER_RULES
