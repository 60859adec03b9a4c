"""Debugging rules driven by real training runs engineered to trigger them.

The diverged run goes through the real `train` entrypoint over an /opt/ml tree it keeps (the metric lines, the
failure file, the live TensorBoard folder), the local-mode CLI once; the runs that trigger one rule call the
job's function in this process (tests/conftest.train_in_process). All are resnet18/squeezenet at 64 px on a few
dozen images.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import subprocess
from pathlib import Path

import pytest
import torch
from imgclf import local, sample_data, splits
from imgclf.aws.training import metric_definitions
from imgclf.debugging import rules
from imgclf.errors import RuleStop

from tests.conftest import FAST_HPS, local_train, train_in_process

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py

HEALTHY_OK = {rules.NO_ISSUES, rules.NOT_APPLICABLE}


def run_train_job(tmp: Path, data: Path, hps: dict[str, str]) -> tuple[Path, subprocess.CompletedProcess]:
    """The `train` entrypoint over an /opt/ml tree that stays (local mode keeps only output/data)."""
    base = tmp / "opt_ml"
    local.write_tree(base, hps, splits.split_channels(data))
    proc = subprocess.run([local.venv_bin("train")], env=local.training_env(base, tmp / "checkpoints"),
                          capture_output=True, text=True, timeout=600)
    return base / "output", proc


def statuses(rules_json: Path) -> dict[str, str]:
    return {r["name"]: r["status"] for r in json.loads(rules_json.read_text())["rules"]}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# A learning rate that diverges: SGD at lr=1 turns squeezenet's loss to NaN within three steps (resnet18's
# BatchNorm keeps it finite, if huge, for longer than a test should run).
DEBUG = {"debugging": "true"}  # what these tests are about (train_in_process turns it off by default)
DIVERGING = {**FAST_HPS, "model": "squeezenet1_1", "optimizer": "sgd", "lr": "1", "epochs": "2",
             "rules-config": '{"loss_not_decreasing": {"num_steps": 4}}'}


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, sample_dataset):
    """(/opt/ml/output, process) of a job whose loss is NaN in every epoch: it fails, with its rules and reports."""
    output, proc = run_train_job(tmp_path_factory.mktemp("diverged"), sample_dataset, DIVERGING)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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


def test_a_diverged_job_fails_with_the_reason_and_writes_no_model(diverged):
    """No epoch with a finite validation loss: nothing to serve (NaN probabilities are not even JSON), so the job
    fails before the model directory is written; the rules and the profiler report still say what happened."""
    output, proc = diverged
    failure = (output / "failure").read_text()
    assert failure.startswith("TrainingDiverged: validation loss is not finite in any epoch (epoch 1: nan, "
                              "epoch 2: nan): the model diverged and nothing was exported; lower lr (now 1"), failure
    assert list((output.parent / "model").iterdir()) == []  # no weights, config.json or model.onnx for SageMaker
    assert "epoch 1: validation loss is nan: the model diverged; this epoch cannot be selected" in proc.stdout
    result = json.loads((output / "data" / "rules.json").read_text())
    assert result["job_status"] == "Failed" and result["error"] == failure.strip()
    assert "TrainingDiverged" in (output / "data" / "profiler-report.html").read_text()
    assert not (output / "data" / "metrics.json").exists()  # the history is in the rules and tensors/


def test_collection_modes_intervals_and_files(diverged):
    output, _ = diverged
    # SageMaker uploads output/data (output.tar.gz) and syncs the live TensorBoard folder: nothing else may matter
    assert {p.name for p in output.iterdir()} <= {"data", "tensorboard", "intermediate", "failure"}
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
    """In process (the failure file and exit code of a RuleStop: tests/integration/test_rule_stop.py)."""
    with pytest.raises(RuleStop, match="^rule exploding_tensor stopped the job"):
        train_in_process(tmp_path, sample_dataset, {**DEBUG, **DIVERGING, "epochs": "3",
                                                    "rules-stop": "exploding_tensor"})
    reports = tmp_path / "opt_ml" / "output" / "data"
    result = json.loads((reports / "rules.json").read_text())
    assert result["job_status"] == "Stopped" and result["stopped_by"] == "exploding_tensor"
    assert result["epochs"] == 0 and 0 < result["steps"] < 8  # stopped within the first epoch
    assert "RuleStop" in (reports / "profiler-report.html").read_text()


def test_a_diverging_local_run_exits_non_zero_and_leaves_no_model(tmp_path, sample_dataset):
    """The same through `python -m imgclf.local train`: the reason on stderr and in OUTPUT/failure, the reports
    kept, and no model.tar.gz, model/ or model.onnx to serve by mistake."""
    out = tmp_path / "out"
    hps = {**DIVERGING, "epochs": "1", "rules": "exploding_tensor", "rules-config": ""}
    proc = local_train(sample_dataset, out, hps)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    failure = (out / "failure").read_text()
    assert failure.startswith("TrainingDiverged: validation loss is not finite in any epoch (epoch 1: nan)"), failure
    assert f"training failed (exit {proc.returncode}): {failure.splitlines()[0]}" in proc.stderr
    assert not {"model", "model.tar.gz"} & {p.name for p in out.iterdir()}
    assert not list(out.rglob("model.onnx")) and not list(out.rglob("model.safetensors"))
    result = json.loads((out / "reports" / "rules.json").read_text())
    assert result["job_status"] == "Failed" and result["error"].startswith("TrainingDiverged: ")
    assert {r["name"]: r["status"] for r in result["rules"]} == {"exploding_tensor": rules.ISSUES}


def test_tiny_training_set_trained_long_triggers_overfit_and_overtraining(tmp_path):
    data = sample_data.generate(tmp_path / "tiny", classes=3, per_split={"train": 4, "valid": 8})
    hps = {**DEBUG, **FAST_HPS, "epochs": "8", "batch-size": "12", "lr-scheduler": "none",  # fire at epochs 3, 6
           "rules-config": '{"overtraining": {"patience_validation": 5}}'}  # the default 10 needs 11 epochs
    tree = train_in_process(tmp_path, data, hps)
    found = statuses(tree / "output" / "data" / "rules.json")
    assert found["overfit"] == rules.ISSUES, found
    assert found["overtraining"] == rules.ISSUES, found


def test_badly_scaled_initialisation_triggers_poor_weight_initialization(tmp_path, sample_dataset):
    hps = {**DEBUG, **FAST_HPS, "model": "squeezenet1_1", "init-scale": "0.3", "epochs": "1", "rules":
           "poor_weight_initialization,vanishing_gradient,exploding_tensor"}
    tree = train_in_process(tmp_path, sample_dataset, hps)
    result = {r["name"]: r for r in json.loads((tree / "output" / "data" / "rules.json").read_text())["rules"]}
    poor = result["poor_weight_initialization"]
    assert poor["status"] == rules.ISSUES
    assert poor["finding"]["step"] == 0 and poor["finding"]["evidence"]["variance_ratio"] > 1e3
    assert result["exploding_tensor"]["status"] == rules.NO_ISSUES


def test_frozen_backbone_with_feature_cache_is_judged_during_extraction(tmp_path, sample_dataset, caplog):
    """freeze=head trains the head on cached features (here by the training loop's steps: head-solver=sgd), so no
    training step runs the backbone: poor_weight_initialization judges the backbone on feature extraction's first
    batch instead."""
    caplog.set_level(logging.INFO, "imgclf")
    hps = {**DEBUG, **FAST_HPS, "freeze": "head", "head-solver": "sgd", "epochs": "2", "init-scale": "0.3",
           "rules": "poor_weight_initialization,vanishing_gradient,exploding_tensor"}
    output = train_in_process(tmp_path, sample_dataset, hps) / "output"
    assert "feature cache on" in caplog.text
    extraction = [r for r in jsonl(output / "data" / "tensors" / "layers.jsonl") if r["source"] == "feature_extraction"]
    assert len(extraction) == 1 and extraction[0]["activations"] and not extraction[0]["gradients"]
    result = {r["name"]: r for r in json.loads((output / "data" / "rules.json").read_text())["rules"]}
    poor = result["poor_weight_initialization"]
    assert poor["status"] == rules.ISSUES, poor  # scaled weights, BatchNorm in eval mode: variances vanish
    assert poor["finding"]["evidence"]["variance_ratio"] > 1e3
    assert result["vanishing_gradient"]["status"] == rules.NO_ISSUES  # the head's gradients, every 100 steps


# --- rule configuration and the system rules, on given data ----------------------------------------------------
