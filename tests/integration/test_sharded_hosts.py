"""Per-host shards through the real `train` entrypoint: two simulated instances whose train channels hold different
parts of the training images (as ShardedByS3Key gives them, one part lacking whole classes), told so by
inputdataconfig.json. The sampler rules themselves are tested in-process in tests/unit/test_sharding.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_HPS
from tests.hosts import run_hosts

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
    sizes = {host: _shard(sample_dataset, tmp_path / f"shard-{host}", take) for host, take in parts.items()}

    def sharded(tree: Path) -> None:  # as SageMaker writes a channel it splits between the hosts
        config = tree / "input" / "config" / "inputdataconfig.json"
        channel_config = json.loads(config.read_text())
        channel_config["train"]["S3DistributionType"] = "ShardedByS3Key"
        config.write_text(json.dumps(channel_config))

    channels = {host: {"train": tmp_path / f"shard-{host}", "valid": sample_dataset / "valid",
                       "test": sample_dataset / "test"} for host in parts}
    bases, logs = run_hosts(tmp_path, HPS, channels, sharded)
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
