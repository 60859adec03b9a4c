"""Distributed data-parallel training (torchrun + DDP on gloo) through the real `train` entrypoint, on CPU."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from imgclf import models, splits
from imgclf.errors import HyperparameterError
from imgclf.training import distributed
from imgclf.training.sampling import EpochSampler
from safetensors.torch import load_file

from tests.conftest import TINY_HPS, local_train
from tests.hosts import run_hosts

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py

# 3 epochs: a SIGTERM sent after epoch 1's line lands inside the run. The tiny model at 32 px keeps each epoch
# short: what these test is the processes, not the model.
HPS = {**TINY_HPS, "epochs": "3", "image-size": "32"}
DDP_HPS = {**HPS, "processes-per-host": "2"}
RANK_LINE = re.compile(r"rank (\d+)/(\d+) epoch (\d+): (\d+) samples, digest (\w+)")


def _failed(result) -> str:
    return (result.stdout or "")[-4000:] + (result.stderr or "")[-3000:]


def _rank_lines(log: str) -> dict[tuple[int, int], tuple[int, str]]:
    """{(epoch, rank): (samples, digest)} from the per-rank epoch lines; world size 2 everywhere."""
    found = {}
    for rank, world, epoch, count, digest in RANK_LINE.findall(log):
        assert world == "2"
        assert (int(epoch), int(rank)) not in found, "one line per rank per epoch"
        found[int(epoch), int(rank)] = (int(count), digest)
    return found


def _history(metrics_json: Path) -> list[dict]:
    return json.loads(metrics_json.read_text())["history"]


def _same_history(got: list[dict], want: list[dict]) -> None:
    assert [h["epoch"] for h in got] == [h["epoch"] for h in want]
    for g, w in zip(got, want, strict=True):
        for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "lr"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), (key, g, w)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, sample_dataset) -> tuple[Path, subprocess.CompletedProcess]:
    """Two processes on this host: `python -m imgclf.local train --hp processes-per-host=2`."""
    out = tmp_path_factory.mktemp("ddp")
    result = local_train(sample_dataset, out, DDP_HPS)
    assert result.returncode == 0, _failed(result)
    return out, result


def test_two_processes_train_on_different_shards_and_write_once(ddp_run, sample_dataset):
    out, result = ddp_run
    assert "distributed training: 1 host(s) x 2 process(es) = world size 2" in result.stdout
    ranks = _rank_lines(result.stdout)
    train_size = sum(1 for _ in (sample_dataset / "train").rglob("*.jpg"))
    assert sorted(ranks) == [(e, r) for e in (1, 2, 3) for r in (0, 1)]
    for epoch in (1, 2, 3):
        (count0, digest0), (count1, digest1) = ranks[epoch, 0], ranks[epoch, 1]
        assert digest0 != digest1 and count0 == count1 == -(-train_size // 2)
        shards = []
        for rank, digest in ((0, digest0), (1, digest1)):  # the logged shards are the sampler's, and cover all
            sampler = EpochSampler(train_size, int(HPS.get("seed", 42)), rank=rank, world_size=2)
            sampler.set_epoch(epoch - 1)
            shards.append([index for index, _seed in sampler])
            assert distributed.sample_digest(shards[-1]) == digest
        assert set(shards[0]) | set(shards[1]) == set(range(train_size))
    # rank 0 alone prints the metric lines, once per epoch, and writes reports and the model
    assert re.findall(r"^epoch=(\d+) ", result.stdout, re.M) == ["1", "2", "3"]
    assert result.stdout.count("test_accuracy=") == 1
    assert [h["epoch"] for h in _history(out / "reports" / "metrics.json")] == [1, 2, 3]
    assert result.stdout.count("model written to") == 1
    # evaluation shards are reduced: every test image counted exactly once
    confusion = (out / "reports" / "confusion_matrix_test.csv").read_text().splitlines()
    assert sum(int(v) for row in confusion[1:] for v in row.split(",")[1:]) == 40
    # the model has the single-process model's tensors (no DDP "module." prefix) and the classes in order
    single, _ = models.build_model(DDP_HPS["model"], num_classes=5)
    ddp_state = load_file(str(out / "model" / "model.safetensors"))
    assert {k: v.shape for k, v in ddp_state.items()} == {k: v.shape for k, v in single.state_dict().items()}
    assert json.loads((out / "model" / "config.json").read_text())["class_names"] == sorted(
        p.name for p in (sample_dataset / "train").iterdir())


def test_two_simulated_hosts(tmp_path, sample_dataset, ddp_run):
    """Two `train` processes with their own /opt/ml trees, as SageMaker runs a 2-instance job (1 CPU process each)."""
    bases, logs = run_hosts(tmp_path, HPS, {host: splits.split_channels(sample_dataset)
                                            for host in ("algo-1", "algo-2")})
    for host in bases:
        assert (bases[host] / "output" / "success").exists()
    assert "2 host(s) x 1 process(es) = world size 2; this host algo-2 is node 1" in logs["algo-2"]
    first, second = _rank_lines(logs["algo-1"]), _rank_lines(logs["algo-2"])
    assert sorted(first) == [(e, 0) for e in (1, 2, 3)] and sorted(second) == [(e, 1) for e in (1, 2, 3)]
    assert all(first[e, 0][1] != second[e, 1][1] for e in (1, 2, 3))
    # only algo-1 (rank 0) writes the model, reports, checkpoints and metric lines
    assert sorted(p.name for p in (bases["algo-1"] / "model").iterdir()) == ["config.json", "model.onnx",
                                                                         "model.safetensors"]
    assert list((bases["algo-2"] / "model").iterdir()) == []
    assert list((bases["algo-2"] / "output" / "data").iterdir()) == []
    assert (tmp_path / "ckpt-algo-1" / "checkpoint.pt").exists() and not (tmp_path / "ckpt-algo-2").exists()
    assert "epoch=1 " not in logs["algo-2"] and re.findall(r"^epoch=(\d+) ", logs["algo-1"], re.M) == ["1", "2", "3"]
    # same world size, same shards, same seeds: the same training as two processes on one host
    _same_history(_history(bases["algo-1"] / "output" / "data" / "metrics.json"),
                  _history(ddp_run[0] / "reports" / "metrics.json"))
    ddp_state = load_file(str(ddp_run[0] / "model" / "model.safetensors"))
    hosts_state = load_file(str(bases["algo-1"] / "model" / "model.safetensors"))
    assert {k: v.shape for k, v in hosts_state.items()} == {k: v.shape for k, v in ddp_state.items()}


def test_sigterm_stops_all_ranks_and_the_rerun_resumes(tmp_path, sample_dataset, ddp_run):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "imgclf.local", "train", "--data", str(sample_dataset), "--output", str(out)]
    for k, v in DDP_HPS.items():
        cmd += ["--hp", f"{k}={v}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch=1 "):
            break
    proc.send_signal(signal.SIGTERM)  # local mode -> train (launcher) -> torchrun -> both workers
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, rest[-3000:]
    assert (out / "failure").read_text().startswith("TrainingInterrupted: stopped by SIGTERM in epoch 2"), rest[-3000:]
    assert (out / "checkpoints" / "checkpoint.pt").exists()
    assert "epoch=3" not in rest

    result = local_train(sample_dataset, out, DDP_HPS)  # the same command again: resumes
    assert result.returncode == 0, _failed(result)
    assert "resuming from checkpoint" in result.stdout
    assert re.findall(r"^epoch=(\d+) ", result.stdout, re.M) == ["2", "3"]
    assert not (out / "failure").exists()
    _same_history(_history(out / "reports" / "metrics.json"), _history(ddp_run[0] / "reports" / "metrics.json"))


def test_plan_from_the_resource_config(monkeypatch):
    monkeypatch.delenv(distributed.MASTER_ADDR_ENV, raising=False)
    monkeypatch.delenv(distributed.MASTER_PORT_ENV, raising=False)
    plan = distributed.make_plan(["algo-1", "algo-2", "algo-3"], "algo-2", 0, "eth0", gpus=8)
    assert (plan.processes_per_host, plan.world_size, plan.node_rank) == (8, 24, 1)
    assert plan.command()[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=3", "--node-rank=1",
                                  "--master-addr=algo-1", "--master-port=29500", "-m", "imgclf.training.job"]
    assert distributed.make_plan(["algo-1"], "algo-1", 0, gpus=0).world_size == 1  # CPU: one process
    assert "--standalone" in distributed.make_plan(["algo-1"], "algo-1", 3, gpus=0).command()
    with pytest.raises(HyperparameterError, match="processes-per-host=4: this host has 2 GPU"):
        distributed.make_plan(["algo-1"], "algo-1", 4, gpus=2)
    with pytest.raises(HyperparameterError, match="current_host 'algo-9' is not among hosts"):
        distributed.make_plan(["algo-1"], "algo-9", 1, gpus=0)


def test_sampler_shards_are_the_single_process_batches():
    """Global batch 8 over 2 ranks (4 each): the ranks' k-th batches together are the single-process k-th batch."""
    whole = EpochSampler(21, seed=7)
    ranks = [EpochSampler(21, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for s in (whole, *ranks):
        s.set_epoch(3)
    order = [i for i, _ in whole]
    shards = [[i for i, _ in s] for s in ranks]
    assert [len(s) for s in ranks] == [11, 11] and shards[1][-1] == order[0]  # padded by repeating the start
    for k in range(2):
        assert sorted(shards[0][4 * k:4 * k + 4] + shards[1][4 * k:4 * k + 4]) == sorted(order[8 * k:8 * k + 8])
    ranks[1].set_epoch(3, skip=4)  # resume after one step: the rank skips its own 4 samples
    assert [i for i, _ in ranks[1]] == shards[1][4:]


def test_bad_data_fails_before_any_worker_starts(tmp_path, sample_dataset):
    data = tmp_path / "data"
    shutil.copytree(sample_dataset, data)
    bad = data / "train" / "001.Spotted_pointer" / "broken.jpg"
    bad.write_bytes(b"not a JPEG")
    result = local_train(data, tmp_path / "out", DDP_HPS)
    assert result.returncode != 0
    assert (tmp_path / "out" / "failure").read_text().startswith("DataError: dataset is not usable")
    assert "broken.jpg: cannot decode" in (tmp_path / "out" / "failure").read_text()
    assert "distributed training:" not in result.stdout  # the launcher checked the data: torchrun never ran
