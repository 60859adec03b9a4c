"""The training capability through the real `train` entrypoint (toolkit + SAGEMAKER_TRAINING_MODULE)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from imgclf import artifacts, config, models, preprocessing
from safetensors.torch import load_file

from tests.conftest import FAST_HPS, TINY_HPS, local_train, random_resnet18_weights, train_in_process

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py


def test_trained_artifacts(trained):
    out, result = trained
    model_dir = out / "model"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architecture"] == "resnet18"
    assert cfg["class_names"] == sorted(cfg["class_names"]) and len(cfg["class_names"]) == 5
    assert cfg["image_size"] == 64 and cfg["resize_size"] == preprocessing.resize_size(64)
    state = load_file(str(model_dir / "model.safetensors"))
    assert state["fc.weight"].shape == (5, 512)
    model, _ = artifacts.load_model(model_dir)  # rebuilt from config.json alone
    assert not model.training

    import tarfile

    with tarfile.open(out / "model.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["config.json", "model.int8.onnx", "model.onnx", "model.safetensors"]

    metrics = json.loads((out / "reports" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5]
    assert metrics["test_accuracy"] >= 0.6, metrics  # 5 classes: chance is 0.2
    assert set(metrics["per_class_accuracy"]) == {"split", *cfg["class_names"]}
    best = min(metrics["history"], key=lambda h: (-h["valid_accuracy"], h["valid_loss"]))  # select-by=accuracy
    assert metrics["best_epoch"] == best["epoch"]
    assert metrics["selected_by"] == "highest validation accuracy, ties broken by the lower validation loss"
    confusion = (out / "reports" / "confusion_matrix_test.csv").read_text().splitlines()
    assert len(confusion) == 6 and sum(int(v) for row in confusion[1:] for v in row.split(",")[1:]) == 40


def test_metric_lines_match_the_exported_definitions(trained):
    _, result = trained
    found = {d["Name"]: re.findall(d["Regex"], result.stdout) for d in config.METRIC_DEFINITIONS}
    # five epochs, then the selected epoch's line again (the value a tuning job ranks by)
    assert len(found["valid:accuracy"]) == 6 and len(found["train:loss"]) == 5
    assert len(found["test:accuracy"]) == 1
    assert all(0.0 <= float(v) <= 1.0 for v in found["valid:accuracy"])
    assert re.search(r"^epoch=1 train_loss=\S+ train_accuracy=\S+ valid_loss=\S+ valid_accuracy=\S+$",
                     result.stdout, re.M)


def test_the_last_metric_lines_are_the_selected_epochs(tmp_path, sample_dataset, capsys, caplog):
    """A tuning job ranks by the last value of its objective in the log: it must be the epoch whose weights were
    saved (the best by validation accuracy, then loss), not the last epoch's. Adam at a constant lr 0.05 and patience
    1 stop the tiny model's run one epoch after its best, before its 6th."""
    caplog.set_level(logging.INFO, "imgclf")
    hps = {**TINY_HPS, "lr": "0.05", "lr-scheduler": "none", "epochs": "6", "early-stopping-patience": "1",
           "image-size": "32", "log-interval": "2"}  # progress lines between the metric lines must not count
    tree = train_in_process(tmp_path, sample_dataset, hps)
    stdout = capsys.readouterr().out  # the metric lines: what the `train` entrypoint prints
    metrics = json.loads((tree / "output" / "data" / "metrics.json").read_text())
    assert metrics["best_epoch"] < metrics["epochs_run"], "the run must end after its best epoch for this test"
    best = metrics["history"][metrics["best_epoch"] - 1]
    for name in ("valid:loss", "valid:accuracy"):
        regex = next(d["Regex"] for d in config.METRIC_DEFINITIONS if d["Name"] == name)
        last = float(re.findall(regex, stdout)[-1])
        assert last == pytest.approx(best[name.replace(":", "_")], abs=1e-6), name  # printed with 6 decimals
    progress = re.findall(r"^.*epoch 1/6: step 2/\d+ \(\d+%\), .* s/step, about .* left; loss .*$", caplog.text, re.M)
    assert progress, caplog.text[-3000:]
    # best_epoch=, not epoch=: the local search's pruner takes `epoch=N` lines as steps.
    assert [line for line in stdout.splitlines() if "valid_accuracy=" in line][-1].startswith(
        f"best_epoch={metrics['best_epoch']} ")


def test_bad_hyperparameter_fails_the_job_clearly(tmp_path, sample_dataset):
    """Local mode refuses them before anything runs; the job itself (what SageMaker runs) fails with them."""
    out = tmp_path / "out"
    result = local_train(sample_dataset, out, {**FAST_HPS, "epochs": "zero", "colour": "red"})
    assert result.returncode == 2 and not out.exists(), result.stderr[-2000:]
    assert "error: unknown hyperparameter(s) colour; known: lr, batch-size" in result.stderr
    assert "epochs='zero': expected int" in result.stderr and "Traceback" not in result.stderr
    from imgclf.errors import HyperparameterError

    with pytest.raises(HyperparameterError, match=r"^unknown hyperparameter\(s\) colour; known: lr, batch-size"):
        train_in_process(tmp_path / "job", sample_dataset, {**FAST_HPS, "epochs": "zero", "colour": "red"})


def test_pretrained_weights_from_channel_and_torch_home(tmp_path, sample_dataset, caplog, monkeypatch):
    caplog.set_level(logging.INFO, "imgclf")
    weights = random_resnet18_weights(tmp_path / "resnet18-random.pth")
    hps = {**FAST_HPS, "pretrained": "true", "freeze": "head", "epochs": "1", "image-size": "32"}
    tree = train_in_process(tmp_path / "a", sample_dataset, hps, weights=weights)
    assert re.search(r"pretrained resnet18 weights loaded from \S+/input/data/weights/resnet18-random.pth",
                     caplog.text)
    # frozen backbone: every backbone tensor is still the file's
    trained = load_file(str(tree / "model" / "model.safetensors"))
    original = torch.load(weights, weights_only=True)
    assert torch.equal(trained["layer1.0.conv1.weight"], original["layer1.0.conv1.weight"])
    assert not torch.equal(trained["fc.bias"][:5], torch.zeros(5))

    home = tmp_path / "torch_home"
    cache = models.torch_home_weights("resnet18").relative_to(Path(torch.hub.get_dir()).parent)
    (home / cache).parent.mkdir(parents=True)
    shutil.copy(weights, home / cache)
    monkeypatch.setenv("TORCH_HOME", str(home))
    train_in_process(tmp_path / "b", sample_dataset, hps)
    assert f"loaded from {home / cache}" in caplog.text


def test_training_channel_layout(tmp_path, sample_dataset, capsys):
    """One `training` channel holding train/valid/test, as the reference project uploaded dogImages."""
    tree = train_in_process(tmp_path, None, {**TINY_HPS, "epochs": "1", "image-size": "32"},
                            channels={"training": sample_dataset})
    assert (tree / "model" / "model.safetensors").exists()
    assert "test_accuracy=" in capsys.readouterr().out


def _start(data_dir: Path, out: Path, hps: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "imgclf.local", "train", "--data", str(data_dir), "--output", str(out)]
    for k, v in hps.items():
        cmd += ["--hp", f"{k}={v}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    return "".join(seen)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted_run(tmp_path, sample_dataset):
    """Resumed from a SIGTERM mid-epoch, the run ends with the same epochs as an uninterrupted one: weights, optimizer,
    the per-step schedule (here in its warmup) and the accumulation groups (the stop waits for a group's end)."""
    out = tmp_path / "out"
    hps = {**TINY_HPS, "warmup-epochs": "1.5", "accumulate-steps": "2", "model-ema": "true", "model-ema-decay": "0.9"}
    proc = _start(sample_dataset, out, hps)
    before = _wait_for(proc, "epoch=1 ")
    assert "epoch=1 " in before
    proc.send_signal(signal.SIGTERM)  # forwarded by local mode to `train`, as SageMaker signals a spot stop
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "TrainingInterrupted: stopped by SIGTERM in epoch" in (out / "failure").read_text()
    assert (out / "checkpoints" / "checkpoint.pt").exists()
    assert "epoch=4" not in rest

    result = local_train(sample_dataset, out, hps)  # same command again: resumes
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resuming from checkpoint" in result.stdout
    assert "epoch=1 " not in result.stdout
    assert not (out / "failure").exists()
    resumed = json.loads((out / "reports" / "metrics.json").read_text())
    uninterrupted = train_in_process(tmp_path / "uninterrupted", sample_dataset, hps)  # same numbers in-process
    reference = json.loads((uninterrupted / "output" / "data" / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    for got, want in zip(resumed["history"], reference["history"], strict=True):
        for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (key, got, want)
    assert resumed["test_accuracy"] == pytest.approx(reference["test_accuracy"])


def test_killed_run_resumes_from_the_last_epoch(tmp_path, sample_dataset, capsys):
    out = tmp_path / "out"
    hps = {**TINY_HPS, "epochs": "3", "debugging": "true"}  # the live rules and report
    proc = _start(sample_dataset, out, hps)
    _wait_for(proc, "epoch=1 ")
    checkpoint = out / "checkpoints" / "checkpoint.pt"
    deadline = time.monotonic() + 120  # written (atomically) right after the metrics line
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)])  # kill `train` outright: no chance to save
    proc.kill()
    proc.wait(timeout=60)
    ckpt = torch.load(checkpoint, weights_only=True)
    done = ckpt["state"]["epoch"]
    assert done >= 1
    # killed mid-job: the live folder (what SageMaker syncs while a job runs) already has the rules and report
    live = json.loads((out / "tensorboard" / "rules.json").read_text())
    assert live["job_status"] == "InProgress" and live["epochs"] >= 1 and live["rules"]
    assert "Job InProgress" in (out / "tensorboard" / "profiler-report.html").read_text()
    tree = train_in_process(out, sample_dataset, hps)  # resumes from out/checkpoints, as local mode's rerun does
    epochs = [int(m) for m in re.findall(r"^epoch=(\d+) ", capsys.readouterr().out, re.M)]
    assert epochs == list(range(done + 1, 4))
    metrics = json.loads((tree / "output" / "data" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]


def test_a_checkpoint_of_other_values_or_other_images_is_refused_not_continued(tmp_path, sample_dataset):
    """A checkpoint resumes only the run that wrote it: another lr, or other training images, is another run (it
    would continue with the checkpoint's optimizer and stop at its epoch); values that only change how the data is
    read or reported may change. The same run again finishes at once from its checkpoint."""
    from imgclf.errors import CheckpointError

    hps = {**TINY_HPS, "epochs": "1", "image-size": "32"}
    train_in_process(tmp_path / "first", sample_dataset, hps)

    def again(name: str, data: Path, hps: dict) -> Path:  # another run over the first one's checkpoints
        shutil.copytree(tmp_path / "first" / "checkpoints", tmp_path / name / "checkpoints")
        return train_in_process(tmp_path / name, data, hps)

    with pytest.raises(CheckpointError, match=r"\(lr=0.001 then, 0.05 now\).*another --output"):
        again("lr", sample_dataset, {**hps, "lr": "0.05"})
    other = tmp_path / "other_data"
    shutil.copytree(sample_dataset, other)
    next((other / "train").rglob("*.jpg")).unlink()
    with pytest.raises(CheckpointError, match="the train/valid images changed"):
        again("data", other, hps)
    tree = again("same", sample_dataset, {**hps, "num-workers": "1", "log-interval": "3"})
    assert (tree / "model" / "model.safetensors").exists()


def test_ctrl_c_checkpoints_and_fails_like_a_stop(tmp_path, sample_dataset):
    """Ctrl-C in a terminal signals the whole process group: the job checkpoints and fails with the reason, as on
    SIGTERM (it used to end with exit 0, no failure and no checkpoint)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "imgclf.local", "train", "--data", str(sample_dataset), "--output", str(out)]
    for key, value in {**TINY_HPS, "epochs": "20", "image-size": "32"}.items():
        cmd += ["--hp", f"{key}={value}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert "epoch=1 " in _wait_for(proc, "epoch=1 ")
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "TrainingInterrupted: stopped by SIGINT in epoch" in (out / "failure").read_text()
    assert torch.load(out / "checkpoints" / "checkpoint.pt", weights_only=True)["state"]["epoch"] < 20


def test_a_last_batch_of_one_image_sits_the_epoch_out(tmp_path, sample_dataset, caplog):
    """At small image sizes a ResNet's last feature map is 1x1, and BatchNorm cannot train on one value per
    channel: a last batch of one image used to fail the job after a whole epoch."""
    caplog.set_level(logging.INFO, "imgclf")
    images = sum(1 for p in (sample_dataset / "train").rglob("*") if p.is_file())
    hps = {**TINY_HPS, "epochs": "1", "image-size": "32", "batch-size": str(images - 1)}
    tree = train_in_process(tmp_path, sample_dataset, hps)
    assert (tree / "model" / "model.safetensors").exists()
    assert "the last batch of one image is left out of each epoch" in caplog.text


def test_a_stop_before_training_starts_says_so(tmp_path, sample_dataset):
    """A stop while the data is checked or the model is built (before the loop's checkpointing handler) fails with
    that reason and a failure file; it used to kill the job with no reason."""
    out = tmp_path / "out"
    proc = _start(sample_dataset, out, {**TINY_HPS, "model": "resnet50"})  # built in about half a second
    _wait_for(proc, "test: ")  # the data is checked; the model (torchvision's import, building it) comes next
    proc.send_signal(signal.SIGTERM)  # forwarded by local mode to `train`
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert (out / "failure").read_text().startswith("TrainingInterrupted: stopped by SIGTERM before training started")
