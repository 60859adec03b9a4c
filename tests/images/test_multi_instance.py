"""Multi-instance training across real containers of the CPU training image (gloo over each container's eth0).

tests/integration/test_distributed.py simulates hosts as processes on 127.0.0.1; here every host is a container:
- `scripts/train.py --local --instance-count 2` and the SDK's `ModelTrainer` with `Compute(instance_count=2)`: the
  SageMaker SDK's local mode runs one container per host with docker-compose, on its own network where each
  host is reached by its name (the master address); each host must log world size 2 and train its own half of
  the training images (the digests of the samplers' shards), and one model.tar.gz (rank 0's) comes back;
- a SIGTERM to one container of a 2-container job stops both, rank 0 checkpoints, and the rerun resumes. The
  SDK's local mode drops CheckpointConfig (nothing would be kept for a rerun), so these two run as SageMaker runs
  instances: `docker run` with an /opt/ml tree each, on a network of their own.

docker-compose stays attached (under podman that spins a core), so the jobs are tiny. Containers are removed
after each run; the ones a failure leaves, at the end (the label, or the image's name for the SDK's).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest
import yaml
from imgclf.config import hyperparameter_strings
from imgclf.training import distributed
from imgclf.training.sampling import EpochSampler

from tests.conftest import TINY_HPS
from tests.images.conftest import (
    LABEL,
    PREFIX,
    REUSE_TAG,
    TAG,
    engine,
    image,
    remove_containers,
    remove_image_containers,
    require_image_tests,
)
from tests.images.test_images import finish, make_tree, run_detached, script, wait_for_log
from tests.integration.test_sdk_requests import sdk_environment

pytestmark = pytest.mark.images
require_image_tests()
# The tiny timm model at 32 px: what these test is the containers and their network, not the model.
HPS = {**TINY_HPS, "epochs": "2", "image-size": "32"}
SEED = 42  # the job's default seed: the samplers' shards are computed here from it
RANK_LINE = re.compile(r"rank (\d+)/(\d+) epoch (\d+): (\d+) samples, digest (\w+)")
COMPOSE_SERVICE = "com.docker.compose.service"  # docker-compose's label: the service is the host's name


@pytest.fixture(scope="module")
def train_cpu(request):
    """The CPU training image, the only one this module runs. With IMGCLF_TEST_TAG only it need exist
    (make build IMAGES=train-cpu ...); otherwise the session's `images` fixture builds all four."""
    if not REUSE_TAG:
        request.getfixturevalue("images")
    elif engine("image", "inspect", image("train-cpu"), check=False).returncode != 0:
        pytest.fail(f"IMGCLF_TEST_TAG={TAG}: no image {image('train-cpu')}; build it first: make build "
                    f"IMAGE_PREFIX={PREFIX} TAG={TAG} IMAGES=train-cpu ...", pytrace=False)
    try:
        yield image("train-cpu")
    finally:
        remove_containers(f"{LABEL}={TAG}")
        remove_image_containers()


def train_size(data: Path) -> int:
    return sum(1 for p in (data / "train").rglob("*") if p.is_file())


def containers() -> set[str]:
    return set(engine("ps", "-aq", "--no-trunc").stdout.split())


def compose_logs(img: str, before: set[str]) -> dict[str, str]:
    """{host: its container's log} of the job docker-compose ran (it leaves the containers stopped); removed.
    Only containers not in `before`: other tests' local-mode jobs leave theirs with the same image and labels."""
    found = {}
    listing = engine("ps", "-a", "--no-trunc", "--format",
                     f'{{{{.ID}}}} {{{{.Image}}}} {{{{.Label "{COMPOSE_SERVICE}"}}}}')
    for line in listing.stdout.splitlines():
        cid, used, *service = line.split()
        if used.split("/")[-1] == img and service and cid not in before:
            logs = engine("logs", cid, check=False)
            found[service[0]] = (logs.stdout + logs.stderr).replace("\r", "")
            engine("rm", "-f", cid, check=False)
    return found


def rank_lines(log: str) -> dict[tuple[int, int], tuple[int, str]]:
    """{(epoch, rank): (samples, digest)} from a host's per-rank epoch lines (world size 2 in every one)."""
    found = {}
    for rank, world, epoch, count, digest in RANK_LINE.findall(log):
        assert world == "2", log[-3000:]
        found[int(epoch), int(rank)] = (int(count), digest)
    return found


def check_two_hosts(logs: dict[str, str], size: int, epochs: tuple[int, ...]) -> None:
    """Two containers formed one world of 2 with the first host as master (reached by its name on the job's
    network), host i is rank i, and each trained its own half of every epoch: the logged digests are the job's
    samplers' shards, which are disjoint and cover the split. Only rank 0 printed metrics and wrote the model."""
    hosts = sorted(logs)
    assert len(hosts) == 2, f"expected the containers of 2 hosts, got {hosts}"
    master = hosts[0]
    for node, host in enumerate(hosts):
        log = logs[host]
        assert (f"2 host(s) x 1 process(es) = world size 2; this host {host} is node {node} (CPU); "
                f"master {master}:{distributed.DEFAULT_MASTER_PORT}") in log, log[-3000:]
        assert f"process group ready: rank {node} of 2 (local rank 0) on cpu, backend gloo" in log, log[-3000:]
        assert sorted(rank_lines(log)) == [(e, node) for e in epochs], log[-3000:]
        assert ("model written to" in log) == (node == 0), log[-3000:]
        assert re.findall(r"^epoch=(\d+) ", log, re.M) == ([str(e) for e in epochs] if node == 0 else [])
    for epoch in epochs:
        shards = []
        for node, host in enumerate(hosts):
            sampler = EpochSampler(size, SEED, rank=node, world_size=2)
            sampler.set_epoch(epoch - 1)
            shards.append([index for index, _seed in sampler])
            assert rank_lines(logs[host])[epoch, node] == (size // 2, distributed.sample_digest(shards[-1]))
        assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(size))


def model_files(tarball: Path) -> list[str]:
    with tarfile.open(tarball) as tar:
        return sorted(tar.getnames())


MODEL_FILES = ["config.json", "model.onnx", "model.safetensors"]


# ---- the SDK's local mode: one container per host, docker-compose's network ----------------------------------

@pytest.fixture(scope="module")
def scripts_run(train_cpu, tmp_path_factory, sample_dataset):
    """`scripts/train.py --local --instance-count 2`, once: (the script's result, {host: log}, home, seconds)."""
    home = tmp_path_factory.mktemp("multi-scripts") / "home"
    (home / "jobs").mkdir(parents=True)
    # The SDK's own local-mode settings: its compose services carry the tests' label, its job folders stay here.
    (home / ".sagemaker" / "config.yaml").parent.mkdir()
    (home / ".sagemaker" / "config.yaml").write_text(yaml.safe_dump({"local": {
        "container_config": {"labels": {LABEL: TAG}}, "container_root": str(home / "jobs")}}))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "HOME": str(home),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "code")}
    before, started = containers(), time.monotonic()
    train = script("train.py", "--local", "--instance-count", "2", "--data", str(sample_dataset),
                   "--image", train_cpu, "--job-name", f"{PREFIX}-multi", *[f"--hp={k}={v}" for k, v in HPS.items()],
                   env=env, timeout=1200)
    took = time.monotonic() - started
    return train, compose_logs(train_cpu, before), home, took


def test_scripts_local_two_instances_train_their_own_shards_in_one_world(scripts_run, sample_dataset):
    train, logs, home, took = scripts_run
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-5000:]
    print(f"\ntrain.py --local --instance-count 2: {took:.0f} s")
    # The SDK names the hosts algo-1-<suffix>, algo-2-<suffix>: the master address is a compose network alias.
    assert [re.sub(r"-\w+$", "", h) for h in sorted(logs)] == ["algo-1", "algo-2"], sorted(logs)
    check_two_hosts(logs, train_size(sample_dataset), (1, 2))


def test_scripts_local_two_instances_return_one_model(scripts_run):
    train, _, home, _ = scripts_run
    assert train.returncode == 0, train.stderr[-3000:]
    output = home / "sagemaker-local" / f"{PREFIX}-multi" / "output"
    assert train.stdout.strip() == (output / "model.tar.gz").as_uri()
    assert sorted(p.name for p in output.iterdir()) == ["model.tar.gz", "output.tar.gz"]
    assert model_files(output / "model.tar.gz") == MODEL_FILES
    metrics = json.loads((home / "reports" / f"{PREFIX}-multi" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]  # rank 0's reports, summed over both hosts


@pytest.fixture(scope="module")
def trainer_run(train_cpu, tmp_path_factory, sample_dataset):
    """The SDK's ModelTrainer in local-container mode with Compute(instance_count=2), once: (model.tar.gz,
    {host: log}, what the SDK printed, seconds)."""
    from sagemaker.core.training.configs import Compute, InputData
    from sagemaker.train import ModelTrainer
    from sagemaker.train.model_trainer import Mode

    work = tmp_path_factory.mktemp("multi-sdk")
    env = {**sdk_environment(work / "home"), "AWS_DEFAULT_REGION": "us-east-1", "SAGEMAKER_VALIDATE_ROLE": "false"}
    before, started = containers(), time.monotonic()
    with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(printed := io.StringIO()):
        ModelTrainer(training_image=train_cpu, training_mode=Mode.LOCAL_CONTAINER,
                     compute=Compute(instance_type="local_cpu", instance_count=2),
                     hyperparameters=hyperparameter_strings(HPS), base_job_name=f"{PREFIX}-multi-sdk",
                     local_container_root=str(work / "train"),
                     ).train(input_data_config=[InputData(channel_name=split, data_source=str(sample_dataset / split))
                                                for split in ("train", "valid", "test")])
    took = time.monotonic() - started
    return (work / "train" / "compressed_artifacts" / "model.tar.gz", compose_logs(train_cpu, before),
            printed.getvalue(), took)


def test_model_trainer_two_instances_train_their_own_shards_and_return_one_model(trainer_run, sample_dataset):
    """ModelTrainer's hosts are algo-1 and algo-2, and its resourceconfig.json names the interface `ethwe`,
    which a compose container lacks: the job falls back to the interface that reaches the master."""
    tarball, logs, printed, took = trainer_run
    print(f"\nModelTrainer(instance_count=2): {took:.0f} s")
    assert sorted(logs) == ["algo-1", "algo-2"], printed[-5000:]
    assert all("names network interface 'ethwe', which this host lacks" in log for log in logs.values())
    check_two_hosts(logs, train_size(sample_dataset), (1, 2))
    assert model_files(tarball) == MODEL_FILES, printed[-3000:]


# ---- a SIGTERM to one instance stops both; the rerun resumes ---------------------------------------------------
# SageMaker sends SIGTERM (spot interruption, StopTrainingJob) and waits 120 s before SIGKILL.
STOP_S = 120


@pytest.fixture
def network(train_cpu):
    """A network of this test's own, as SageMaker's instances share one: each host reached by its name."""
    name = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
    engine("network", "create", "--label", f"{LABEL}={TAG}", name)
    yield name
    remove_containers(f"{LABEL}={TAG}")
    engine("network", "rm", name, check=False)


def start_hosts(img: str, trees: dict[str, Path], net: str) -> dict[str, str]:
    """`train` in one container per host over its own /opt/ml tree (checkpoints included), on `net`."""
    return {host: run_detached(img, "train", tree=tree, options=(
        "--hostname", host, "--network", net, "--network-alias", host)) for host, tree in trees.items()}


def test_sigterm_to_one_instance_stops_both_and_the_rerun_resumes(train_cpu, network, tmp_path, sample_dataset):
    """SIGTERM to algo-2 only: its rank asks to stop, both ranks stop at the same step (no gloo wait), rank 0 on
    algo-1 writes the checkpoint; both containers exit within SageMaker's 120 s. Rerun: rank 0 reads it and hands
    it to rank 1, and training goes on from epoch 2 (the checkpoint is on the master only, as the docs say suffices)."""
    hosts = ["algo-1", "algo-2"]
    trees = {}
    for host in hosts:  # batch 4: 15 steps per rank and epoch, so the stop lands inside epoch 2
        trees[host] = make_tree(tmp_path / host, sample_dataset, {**HPS, "epochs": "3", "batch-size": "4"})
        (trees[host] / "input/config/resourceconfig.json").write_text(json.dumps({
            "current_host": host, "hosts": hosts, "network_interface_name": "eth0", "current_instance_type": "local"}))
    started = time.monotonic()
    names = start_hosts(train_cpu, trees, network)
    wait_for_log(names["algo-1"], "epoch=1 ")
    engine("kill", "--signal", "TERM", names["algo-2"])
    stopping = time.monotonic()
    ended = {host: finish(names[host], timeout=STOP_S) for host in hosts}
    print(f"\nboth hosts stopped {time.monotonic() - stopping:.0f} s after the SIGTERM "
          f"({stopping - started:.0f} s to epoch 1)")
    for host, (status, logs) in ended.items():
        assert status != 0, f"{host}:\n{logs[-3000:]}"
        failure = (trees[host] / "output" / "failure").read_text()
        assert failure.startswith("TrainingInterrupted: stopped by SIGTERM in epoch 2"), f"{host}: {failure}"
        assert "epoch=3 " not in logs
        assert not (trees[host] / "model" / "model.safetensors").exists()
    assert "SIGTERM received" in ended["algo-2"][1] and "SIGTERM received" not in ended["algo-1"][1]
    assert (trees["algo-1"] / "checkpoints" / "checkpoint.pt").is_file()
    assert not any((trees["algo-2"] / "checkpoints").glob("*")), "only rank 0 writes checkpoints"

    for tree in trees.values():
        (tree / "output" / "failure").unlink()  # SageMaker starts the rerun with a fresh output folder
    started = time.monotonic()
    names = start_hosts(train_cpu, trees, network)
    ended = {host: finish(names[host]) for host in hosts}
    print(f"rerun: {time.monotonic() - started:.0f} s")
    for node, host in enumerate(hosts):
        status, logs = ended[host]
        assert status == 0, f"{host}:\n{logs[-3000:]}"
        assert "resuming from checkpoint" in logs, f"{host}:\n{logs[-3000:]}"
        assert sorted(rank_lines(logs)) == [(2, node), (3, node)], logs[-3000:]
    assert re.findall(r"^epoch=(\d+) ", ended["algo-1"][1], re.M) == ["2", "3"]
    assert sorted(p.name for p in (trees["algo-1"] / "model").iterdir()) == MODEL_FILES
    assert not any((trees["algo-2"] / "model").iterdir())
