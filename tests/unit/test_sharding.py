"""Per-host shards of the train split (train.py --shard-by-s3-key: the train channel ShardedByS3Key): which samples
each rank trains on, the class list every host shares, and the channels that may be split. In-process: a
multi-host job's collectives (Context.max, Context.sum) are simulated over the hosts' values."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from imgclf import splits
from imgclf.errors import DataError
from imgclf.training.distributed import Context
from imgclf.training.sampling import (
    EpochSampler,
    check_class_coverage,
    host_shard_splits,
    rank_sampler,
    sharded_channels,
    split_between,
    train_is_sharded,
)

SEED = 11


@dataclass
class SimulatedRank(Context):
    """One rank of a job whose collectives see the other ranks' values (`others`: what they contribute)."""

    others_max: list[int] = field(default_factory=list)
    others_sum: list[list[float]] = field(default_factory=list)

    def max(self, value: int) -> int:
        return max([value, *self.others_max])

    def sum(self, values: list[float]) -> list[float]:
        return [sum(column) for column in zip(values, *self.others_sum, strict=True)]


def job(hosts: int, per_host: int) -> list[SimulatedRank]:
    """The ranks of a job of `hosts` x `per_host` processes, as torchrun numbers them (host h: h*per_host + local)."""
    return [SimulatedRank(rank=h * per_host + local, world_size=hosts * per_host, local_rank=local,
                          local_world_size=per_host) for h in range(hosts) for local in range(per_host)]


def indices(sampler: EpochSampler, epoch: int = 0) -> list[int]:
    sampler.set_epoch(epoch)
    return [index for index, _seed in sampler]


def test_with_per_host_shards_the_ranks_of_each_host_split_its_own_shard():
    """2 hosts x 2 processes; ShardedByS3Key gave host 0 seven train images and host 1 four."""
    sizes = {0: 7, 1: 4}
    ranks = job(hosts=2, per_host=2)
    largest = max(-(-n // 2) for n in sizes.values())
    samplers = {}
    for r in ranks:
        host = r.rank // 2
        r.others_max = [-(-n // 2) for h, n in sizes.items() if h != host]  # the other host's share
        samplers[r.rank] = rank_sampler(sizes[host], SEED, r, per_host_shard=True)
    for epoch in (0, 1):
        got = {rank: indices(s, epoch) for rank, s in samplers.items()}
        # every rank of the job runs the same number of steps: the largest host share (4), padded
        assert {len(g) for g in got.values()} == {largest} and {len(s) for s in samplers.values()} == {largest}
        for host, size in sizes.items():
            ours = got[2 * host] + got[2 * host + 1]
            assert set(ours) == set(range(size)), "a host's ranks cover its whole shard and nothing else"
            # host 0 (7 images, 8 slots): one image twice; host 1 (4 images): each of them twice
            assert len(ours) - len(set(ours)) == 2 * largest - size
        # the host's ranks interleave to that host's own (seeded) order of its shard
        whole = indices(EpochSampler(7, SEED), epoch)
        assert [got[r][k] for k in range(largest) for r in (0, 1)][:7] == whole


def test_without_shards_all_ranks_split_the_one_replicated_split():
    ranks = job(hosts=2, per_host=2)
    got = [indices(rank_sampler(10, SEED, r, per_host_shard=False)) for r in ranks]
    assert [len(g) for g in got] == [3, 3, 3, 3]  # 10 images over 4 ranks, padded to 12
    assert set().union(*got) == set(range(10))
    whole = indices(EpochSampler(10, SEED))
    assert [got[r][k] for k in range(3) for r in range(4)][:10] == whole  # the single-process order
    # what each rank is told: its place among all ranks, or among its host's
    assert [split_between(r, False) for r in ranks] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [split_between(r, True) for r in ranks] == [(0, 2), (1, 2), (0, 2), (1, 2)]


def test_one_process_with_a_shard_trains_on_all_of_it():
    sampler = rank_sampler(5, SEED, Context(), per_host_shard=True)
    assert sorted(indices(sampler)) == [0, 1, 2, 3, 4] and len(sampler) == 5


def test_a_per_rank_share_too_small_for_the_split_is_refused():
    with pytest.raises(ValueError, match="leave some of 9 out"):
        EpochSampler(9, SEED, rank=0, world_size=2, per_rank=4)


def test_the_job_reads_the_distribution_from_inputdataconfig():
    config = {"train": {"TrainingInputMode": "FastFile", "S3DistributionType": "ShardedByS3Key"},
              "valid": {"TrainingInputMode": "FastFile", "S3DistributionType": "FullyReplicated"},
              "weights": {}}
    assert sharded_channels(config) == {"train"}
    assert train_is_sharded(sharded_channels(config)) is True
    assert train_is_sharded(frozenset()) is False
    for channel in ("training", "valid", "weights"):
        with pytest.raises(DataError, match=f"channel\\(s\\) {channel} are ShardedByS3Key: only the train channel"):
            train_is_sharded(frozenset({"train", channel}))


def _folder(root: Path, classes: dict[str, int]) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(b"not decoded here")
    return root


def _validate(dirs: dict[str, Path]) -> dict[str, splits.Split]:
    return splits.validate_splits(dirs, check_decode=False)


def test_a_shard_lacking_a_class_is_numbered_by_the_validation_classes(tmp_path, caplog):
    dirs = {"train": _folder(tmp_path / "train", {"a.cat": 2, "c.emu": 1}),
            "valid": _folder(tmp_path / "valid", {"a.cat": 1, "b.dog": 1, "c.emu": 1}),
            "test": _folder(tmp_path / "test", {"a.cat": 1, "b.dog": 1, "c.emu": 1})}
    with caplog.at_level(logging.INFO):
        found = host_shard_splits(dirs, _validate)
    train = found["train"]
    assert train.classes == found["valid"].classes == ["a.cat", "b.dog", "c.emu"]  # the same on every host
    assert sorted((p.parent.name, label) for p, label in train.samples) == [("a.cat", 0), ("a.cat", 0), ("c.emu", 2)]
    assert "no images of 1 class(es) (b.dog); other hosts train them" in caplog.text


@pytest.mark.parametrize("train, test, message", [
    ({"a.cat": 1, "z.yak": 1}, {"a.cat": 1, "b.dog": 1}, "this host's train shard has classes that valid lacks: z.yak"),
    ({"a.cat": 1}, {"a.cat": 1}, "test .* and valid .*Every split needs the same class folders"),
    ({}, {"a.cat": 1, "b.dog": 1}, "this host's shard .* is empty; .* use fewer instances than train files"),
])
def test_shards_that_cannot_train_are_refused(tmp_path, train, test, message):
    dirs = {"train": _folder(tmp_path / "train", train), "valid": _folder(tmp_path / "valid", {"a.cat": 1, "b.dog": 1}),
            "test": _folder(tmp_path / "test", test)}
    with pytest.raises(DataError, match=message):
        host_shard_splits(dirs, _validate)


def test_every_class_needs_training_images_on_some_host():
    shard = splits.Split("train", Path("train"), ["a", "b", "c"], [(Path("x.jpg"), 0), (Path("y.jpg"), 0)])
    # this host has only class a; the other host's first rank contributes b; its second rank counts nothing
    ranks = job(hosts=2, per_host=2)
    ranks[0].others_sum = [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(DataError, match="no host has training images of 1 class\\(es\\): c"):
        check_class_coverage(shard, ranks[0])
    ranks[0].others_sum = [[0, 0, 0], [0, 1, 3], [0, 0, 0]]
    check_class_coverage(shard, ranks[0])
    ranks[1].others_sum = [[2, 0, 0], [0, 1, 3], [0, 0, 0]]  # a second rank's counts are its host's first rank's
    check_class_coverage(shard, ranks[1])


def test_the_workers_get_the_named_network_interface_only_where_the_host_has_it(monkeypatch, caplog):
    """resourceconfig.json's interface goes to gloo and NCCL when the host has it; the SDK's local mode names
    `ethwe`, which its containers lack: then neither is set (gloo would stop at "Unable to find address"), and
    one warning says why. A user's own setting wins either way."""
    from imgclf.training import distributed

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    [(_, present)] = socket.if_nameindex()[:1]
    env = distributed.make_plan(["algo-1", "algo-2"], "algo-1", 1, interface=present).environment()
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == present
    env = distributed.make_plan(["algo-1", "algo-2"], "algo-1", 1, interface="ethwe-absent").environment()
    assert "GLOO_SOCKET_IFNAME" not in env and "NCCL_SOCKET_IFNAME" not in env
    assert "names network interface 'ethwe-absent', which this host lacks" in caplog.text
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert "GLOO_SOCKET_IFNAME" not in distributed.make_plan(["a", "b"], "a", 1, interface=present).environment()
