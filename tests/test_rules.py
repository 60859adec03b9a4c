"""Debugging rules driven by real training runs (the real `train` entrypoint) engineered to trigger them.

Runs that check the /opt/ml tree itself (everything under output/data, the live TensorBoard folder) keep their
own; the others use the local-mode CLI. All runs are resnet18/squeezenet at 64 px on a few dozen images.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from imgclf import local, sample_data
from imgclf.aws.training import metric_definitions
from imgclf.debugging import rules
from imgclf.errors import HyperparameterError

from tests.conftest import FAST_HPS, local_train

HEALTHY_OK = {rules.NO_ISSUES, rules.NOT_APPLICABLE}


def run_train_job(tmp: Path, data: Path, hps: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess]:
    """The `train` entrypoint over an /opt/ml tree that stays (local mode keeps only output/data)."""
    base = tmp / "opt_ml"
    local.write_tree(base, hps, local.split_channels(data))
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(base), "SAGEMAKER_TRAINING_MODULE": local.TRAINING_MODULE,
           "IMGCLF_CHECKPOINT_DIR": str(tmp / "checkpoints"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([local.venv_bin("train")], env=env, capture_output=True, text=True, timeout=600)
    return base / "output", proc


def statuses(rules_json: Path) -> dict[str, str]:
    return {r["name"]: r["status"] for r in json.loads(rules_json.read_text())["rules"]}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# A learning rate that diverges: SGD at lr=1 turns squeezenet's loss to NaN within three steps (resnet18's
# BatchNorm keeps it finite, if huge, for longer than a test should run).
DIVERGING = {**FAST_HPS, "model": "squeezenet1_1", "optimizer": "sgd", "lr": "1", "epochs": "2",
             "rules-config": '{"loss_not_decreasing": {"num_steps": 4}}'}


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, sample_dataset):
    output, proc = run_train_job(tmp_path_factory.mktemp("diverged"), sample_dataset, DIVERGING)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return output, proc


def test_healthy_run_triggers_no_rule(trained):
    out, proc = trained
    found = statuses(out / "reports" / "rules.json")
    assert set(found) == set(rules.RULES)
    assert all(s in HEALTHY_OK for s in found.values()), found
    if not torch.cuda.is_available():
        assert found["low_gpu_utilization"] == found["cpu_bottleneck"] == rules.NOT_APPLICABLE
    assert json.loads((out / "reports" / "rules.json").read_text())["job_status"] == "Completed"


def test_diverging_lr_triggers_exploding_tensor_and_loss_not_decreasing(diverged):
    output, proc = diverged
    result = json.loads((output / "data" / "rules.json").read_text())
    by_name = {r["name"]: r for r in result["rules"]}
    assert by_name["exploding_tensor"]["status"] == rules.ISSUES
    assert by_name["loss_not_decreasing"]["status"] == rules.ISSUES
    assert by_name["loss_not_decreasing"]["parameters"]["num_steps"] == 4  # inline JSON rules-config applied
    assert "nan" in by_name["exploding_tensor"]["finding"]["message"].lower()
    assert "rule exploding_tensor: IssuesFound" in proc.stdout  # a log line when the rule fires
    # the metric lines SageMaker reads: rules:issues and rule:<name>, after each epoch and at the end
    regexes = {d["Name"]: d["Regex"] for d in metric_definitions(rules=True)}
    assert re.findall(regexes["rule:exploding_tensor"], proc.stdout) == ["1"] * 3  # NaN from epoch 1 on
    for r in result["rules"]:
        values = re.findall(regexes[f"rule:{r['name']}"], proc.stdout)
        assert len(values) == 3 and values[-1] == str(int(r["status"] == rules.ISSUES)), (r["name"], values)
    issues = re.findall(regexes["rules:issues"], proc.stdout)
    assert len(issues) == 3 and int(issues[-1]) == sum(r["status"] == rules.ISSUES for r in result["rules"]) >= 2
    live = json.loads((output / "tensorboard" / "rules.json").read_text())  # the live copy, synced while running
    assert live == result


def test_collection_modes_intervals_and_files(diverged):
    output, _ = diverged
    # SageMaker uploads output/data (output.tar.gz) and syncs the live TensorBoard folder: nothing else may matter
    assert {p.name for p in output.iterdir()} <= {"data", "tensorboard", "intermediate", "success"}
    data = output / "data"
    scalars = jsonl(data / "tensors" / "scalars.jsonl")
    train_steps = [r["step"] for r in scalars if r["mode"] == "TRAIN" and r["name"] == "loss"]
    eval_steps = [r["step"] for r in scalars if r["mode"] == "EVAL" and r["name"] == "loss"]
    steps = len(jsonl(data / "profiler" / "steps.jsonl"))  # every training step is timed
    assert steps == 2 * 8  # 2 epochs of 120 images in batches of 16
    assert train_steps == list(range(0, steps, 10))  # collect-train-interval=10
    assert eval_steps == list(range(2 * 3))  # every step of both validations (40 images, batches of 16)
    assert {r["name"] for r in scalars if r["mode"] == "TRAIN"} == {"loss", "lr"}
    layers = jsonl(data / "tensors" / "layers.jsonl")
    assert [r["step"] for r in layers] == [0]  # collect-stats-interval=100
    assert "features.0.weight" in layers[0]["weights"] and "classifier.1.weight" in layers[0]["gradients"]
    assert len(layers[0]["activations"]) == 26  # the input of each of squeezenet1_1's ReLU modules
    assert all(a["var"] > 0 for a in layers[0]["activations"].values())
    timings = jsonl(data / "profiler" / "steps.jsonl")[0]
    assert all(timings[k] >= 0 for k in ("data", "forward", "backward", "optimizer"))
    assert timings["total"] >= timings["forward"] + timings["backward"]
    assert len(jsonl(data / "profiler" / "system.jsonl")) >= 2
    live_events = sorted(p.name for p in (output / "tensorboard").glob("events.out.tfevents.*"))
    assert live_events and live_events == sorted(p.name for p in (data / "tensorboard").iterdir())
    traces = list((data / "profiler").glob("*.pt.trace.json.gz"))
    assert len(traces) == 1
    events = json.loads(gzip.decompress(traces[0].read_bytes()))["traceEvents"]
    assert any(e.get("name", "").startswith("aten::conv") for e in events)
    top = json.loads((data / "profiler" / "top_operators.json").read_text())
    assert top["steps"] == [5, 6, 7] and top["top_operators"]  # profiler-start-step=5, to the end of epoch 1


def test_tensorboard_reads_the_event_files(diverged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = diverged
    acc = EventAccumulator(str(output / "data" / "tensorboard")).Reload()  # the copy SageMaker uploads
    tags = acc.Tags()["scalars"]
    assert {"loss/train", "loss/eval", "lr/train", "epoch/valid_loss", "weights/features.0.weight"} <= set(tags)


def test_stop_rule_ends_the_job_with_a_clear_failure(tmp_path, sample_dataset):
    out = tmp_path / "out"
    proc = local_train(sample_dataset, out, {**DIVERGING, "epochs": "3", "rules-stop": "exploding_tensor"})
    assert proc.returncode != 0
    failure = (out / "failure").read_text()
    assert failure.startswith("RuleStop: rule exploding_tensor stopped the job"), failure
    result = json.loads((out / "reports" / "rules.json").read_text())
    assert result["job_status"] == "Stopped" and result["stopped_by"] == "exploding_tensor"
    assert result["epochs"] == 0 and 0 < result["steps"] < 8  # stopped within the first epoch
    assert "RuleStop" in (out / "reports" / "profiler-report.html").read_text()


def test_tiny_training_set_trained_long_triggers_overfit_and_overtraining(tmp_path):
    data = sample_data.generate(tmp_path / "tiny", classes=3, per_split={"train": 4, "valid": 8})
    out = tmp_path / "out"
    hps = {**FAST_HPS, "epochs": "8", "batch-size": "12", "lr-scheduler": "none",  # fire at epochs 3 and 6
           "rules-config": '{"overtraining": {"patience_validation": 5}}'}  # the default 10 needs 11 epochs
    proc = local_train(data, out, hps)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = statuses(out / "reports" / "rules.json")
    assert found["overfit"] == rules.ISSUES, found
    assert found["overtraining"] == rules.ISSUES, found


def test_badly_scaled_initialisation_triggers_poor_weight_initialization(tmp_path, sample_dataset):
    out = tmp_path / "out"
    hps = {**FAST_HPS, "model": "squeezenet1_1", "init-scale": "0.3", "epochs": "1", "rules":
           "poor_weight_initialization,vanishing_gradient,exploding_tensor"}
    proc = local_train(sample_dataset, out, hps)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = {r["name"]: r for r in json.loads((out / "reports" / "rules.json").read_text())["rules"]}
    poor = result["poor_weight_initialization"]
    assert poor["status"] == rules.ISSUES
    assert poor["finding"]["step"] == 0 and poor["finding"]["evidence"]["variance_ratio"] > 1e3
    assert result["exploding_tensor"]["status"] == rules.NO_ISSUES


def test_frozen_backbone_with_feature_cache_is_judged_during_extraction(tmp_path, sample_dataset):
    """freeze=head (the default) trains the head on cached features, so no training step runs the backbone:
    poor_weight_initialization judges the backbone on feature extraction's first batch instead."""
    hps = {**FAST_HPS, "freeze": "head", "epochs": "2", "init-scale": "0.3",
           "rules": "poor_weight_initialization,vanishing_gradient,exploding_tensor"}
    output, proc = run_train_job(tmp_path, sample_dataset, hps)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "feature cache on" in proc.stdout
    extraction = [r for r in jsonl(output / "data" / "tensors" / "layers.jsonl") if r["source"] == "feature_extraction"]
    assert len(extraction) == 1 and extraction[0]["activations"] and not extraction[0]["gradients"]
    result = {r["name"]: r for r in json.loads((output / "data" / "rules.json").read_text())["rules"]}
    poor = result["poor_weight_initialization"]
    assert poor["status"] == rules.ISSUES, poor  # scaled weights, BatchNorm in eval mode: variances vanish
    assert poor["finding"]["evidence"]["variance_ratio"] > 1e3
    assert result["vanishing_gradient"]["status"] == rules.NO_ISSUES  # the head's gradients, every 100 steps


# --- rule configuration and the system rules, on given data ----------------------------------------------------

def test_configure_selects_rules_and_parameters(tmp_path):
    path = tmp_path / "Config" / "Rules.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"overfit": {"ratio_threshold": 2, "stop": True}}))
    rs = rules.configure("overfit,exploding_tensor", str(path), "exploding_tensor")
    got = {r.rule.name: r.rule for r in rs.results}
    assert set(got) == {"overfit", "exploding_tensor"}
    assert got["overfit"].ratio_threshold == 2.0 and got["overfit"].stop and got["exploding_tensor"].stop
    assert rules.configure("none").results == []
    assert len(rules.configure("all").results) == len(rules.RULES)


@pytest.mark.parametrize(("names", "config", "stop", "message"), [
    ("overfit,typo_rule", "", "", "unknown rule(s) typo_rule"),
    ("all", '{"overfit": {"ratio": 1}}', "", "rule overfit has no parameter 'ratio'"),
    ("all", '{"overfit": {"patience": "2"}}', "", "overfit.patience='2' must be a int"),
    ("all", '{"overfit": ', "", "not valid JSON"),
    ("all", "/no/such/rules.json", "", "no such file"),
    ("overfit", "", "exploding_tensor", "which rules='overfit' does not enable"),
])
def test_configure_rejects_bad_configuration(names, config, stop, message):
    with pytest.raises(HyperparameterError, match=None) as e:
        rules.configure(names, config, stop)
    assert message in str(e.value)


def _samples(gpu: list[float], cpu: float = 50.0) -> list[dict]:
    return [{"t": i / 2, "cpu": cpu, "iowait": 0.0, "gpu": [g]} for i, g in enumerate(gpu)]


def test_low_gpu_utilization_underused_fluctuating_and_busy():
    rule = rules.LowGpuUtilization(patience=0, window=100)
    assert rule.system(_samples([30.0] * 100), [], True).evidence["p95"] == 30.0
    assert "fluctuates" in rule.system(_samples([95.0, 0.0] * 50), [], True).message
    assert rule.system(_samples([90.0] * 100), [], True) is None
    assert rule.system([], [], False) == rules.NOT_APPLICABLE


def test_cpu_bottleneck_and_dataloader_wait():
    rule = rules.CpuBottleneck(patience=0)
    assert rule.system(_samples([2.0] * 60 + [90.0] * 40, cpu=99.0), [], True).evidence["share"] == 60.0
    assert rule.system(_samples([2.0] * 40 + [90.0] * 60, cpu=99.0), [], True) is None
    wait = rules.DataloaderWait(patience=2)
    steps = [{"step": i, "data": 0.6, "forward": 0.2, "backward": 0.2, "optimizer": 0.0, "total": 1.0}
             for i in range(10)]
    assert wait.system([], steps, False).evidence["share"] == pytest.approx(60.0)
    assert wait.system([], [{**s, "data": 0.1} for s in steps], False) is None
