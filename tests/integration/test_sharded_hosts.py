"""Per-host shards through the real `train` entrypoint: two simulated instances whose train channels hold different
parts of the training images (as ShardedByS3Key gives them, one part lacking whole classes), told so by
inputdataconfig.json. The sampler rules themselves are tested in-process in tests/unit/test_sharding.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from imgclf import local, processes
from imgclf.training import distributed

from tests.conftest import TINY_HPS, free_port

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py

HPS = {**TINY_HPS, "epochs": "2", "image-size": "32", "processes-per-host": "1"}
RANK_LINE = re.compile(r"rank (\d+)/2 epoch (\d+): (\d+) samples, digest (\w+)")


def _shard(sample_dataset: Path, dest: Path, take: dict[str, slice]) -> int:
    """A host's part of train: the files `take` selects of each class named there; returns how many."""
    count = 0
    for name, part in take.items():
        files = sorted((sample_dataset / "train" / name).iterdir())[part]
        (dest / name).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dest / name / f.name)
        count += len(files)
    return count


def test_two_hosts_train_on_their_own_shards_with_one_class_list(tmp_path, sample_dataset):
    classes = sorted(p.name for p in (sample_dataset / "train").iterdir())
    # algo-1: half of every class but the last (48 images); algo-2: the other half of the first and all of the last
    parts = {"algo-1": {name: slice(0, None, 2) for name in classes[:-1]},
             "algo-2": {classes[0]: slice(1, None, 2), classes[-1]: slice(None)}}
    port, procs, bases, sizes = free_port(), {}, {}, {}
    for host, take in parts.items():
        bases[host] = tmp_path / host
        sizes[host] = _shard(sample_dataset, tmp_path / f"shard-{host}", take)
        channels = {"train": tmp_path / f"shard-{host}", "valid": sample_dataset / "valid",
                    "test": sample_dataset / "test"}
        local.write_tree(bases[host], HPS, channels, hosts=list(parts), current_host=host)
        config = bases[host] / "input" / "config" / "inputdataconfig.json"
        channel_config = json.loads(config.read_text())
        channel_config["train"]["S3DistributionType"] = "ShardedByS3Key"  # as SageMaker writes a sharded channel
        config.write_text(json.dumps(channel_config))
        env = local.training_env(bases[host], tmp_path / f"ckpt-{host}", {
            distributed.MASTER_ADDR_ENV: "127.0.0.1", distributed.MASTER_PORT_ENV: str(port),
            "OMP_NUM_THREADS": "1"})
        procs[host] = subprocess.Popen([processes.venv_bin("train")], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    logs = {}
    try:
        for host, proc in procs.items():
            logs[host] = proc.communicate(timeout=600)[0]
    finally:
        for proc in procs.values():
            proc.kill()
    for host, proc in procs.items():
        assert proc.returncode == 0, f"{host}:\n{logs[host][-4000:]}"
    assert sizes["algo-1"] != sizes["algo-2"]
    # every rank runs the same number of steps: the larger shard's size (one process per host), the smaller padded
    for host, rank in (("algo-1", 0), ("algo-2", 1)):
        lines = RANK_LINE.findall(logs[host])
        assert [(int(r), int(e), int(n)) for r, e, n, _ in lines] == [
            (rank, epoch, max(sizes.values())) for epoch in (1, 2)], logs[host][-3000:]
    absent = ", ".join(classes[1:-1])
    assert f"this host's shard of train has no images of 3 class(es) ({absent}); other hosts train them" in \
        logs["algo-2"]
    # one class list, the validation split's, on every host: the model knows all five classes in order
    config = json.loads((bases["algo-1"] / "model" / "config.json").read_text())
    assert config["class_names"] == classes
    assert list((bases["algo-2"] / "model").iterdir()) == []
