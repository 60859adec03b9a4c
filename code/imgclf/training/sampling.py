"""The training split's data order: fixed by (seed, epoch), sharded between ranks, resumable mid-epoch.

Which ranks split which copy of the training split: SageMaker gives every host the whole split (a
`FullyReplicated` channel), and then all the job's ranks split that one copy; or, with the train channel
`ShardedByS3Key`, each host its own part of the files, and then the ranks of a host split that host's part
(`rank_sampler`). The job learns which from SageMaker's /opt/ml/input/config/inputdataconfig.json
(`S3DistributionType`). A host's part may lack whole classes, so with per-host shards the class list comes from
the validation split, which every host has whole (`host_shard_splits`), and the ranks check together that every
class has training images on some host (`check_class_coverage`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from imgclf import data
from imgclf.errors import DataError
from imgclf.preprocessing import load_rgb
from imgclf.splits import MAX_LISTED, Split
from imgclf.training.distributed import Context

log = logging.getLogger(__name__)
SHARDED = "ShardedByS3Key"  # inputdataconfig.json's S3DistributionType of a channel split between the hosts


class EpochSampler(torch.utils.data.Sampler):
    """Data order and augmentation fixed by (seed, epoch): a resumed run sees exactly the same batches.

    Yields (index, sample_seed) pairs; `skip` drops the samples already trained on before an interruption.
    With several ranks each takes every world_size-th sample of the epoch's order (padded by repeating its
    start so all ranks run the same number of steps, like DistributedSampler): the ranks' k-th batches
    together are the single-process k-th batch of the global batch size. `per_rank` (default: the padded share,
    size / world_size rounded up) may be larger: hosts with shards of different sizes all take the largest share.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 per_rank: int | None = None):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.per_rank = -(-size // world_size) if per_rank is None else per_rank
        if self.per_rank * world_size < size:
            raise ValueError(f"{per_rank} samples per rank leave some of {size} out with {world_size} ranks")
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        # a stop on an epoch's last batch skips it all (batches x batch size may pass a partial last batch)
        self.epoch, self.skip = epoch, min(skip, self.per_rank)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def shard(self) -> list[int]:
        """This rank's indices of the epoch (all of them with one rank)."""
        order = self.order()
        total = self.per_rank * self.world_size
        if total == self.size:
            return order[self.rank::self.world_size]
        padded = (order * -(-total // self.size))[:total]
        return padded[self.rank::self.world_size]

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_033
        return iter([(i, (base + i) % 2**63) for i in self.shard()[self.skip:]])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def sharded_channels(input_data_config: dict) -> frozenset[str]:
    """The channels SageMaker split between the hosts (inputdataconfig.json: S3DistributionType ShardedByS3Key)."""
    return frozenset(name for name, c in input_data_config.items() if (c or {}).get("S3DistributionType") == SHARDED)


def train_is_sharded(sharded: frozenset[str]) -> bool:
    """Whether this host has its own part of the train split. Only the train channel may be split: evaluation
    needs the whole valid and test splits on every host, and the weights file must be on each of them."""
    others = sorted(sharded - {"train"})
    if others:
        raise DataError(f"channel(s) {', '.join(others)} are {SHARDED}: only the train channel may be split between "
                        "the hosts (every host needs the whole valid and test splits and the weights); send the "
                        "others FullyReplicated (train.py --shard-by-s3-key does), or the split folders as separate "
                        "channels instead of one 'training' channel")
    return "train" in sharded


def host_shard_splits(split_dirs: dict[str, Path], validate: Callable[[dict[str, Path]], dict[str, Split]]
                      ) -> dict[str, Split]:
    """This host's splits when train is a per-host shard: valid (and test) are whole and checked as usual, the
    shard's classes must be among valid's, and its labels are renumbered by valid's class list, the same on every
    host (a shard may lack whole classes: sorted class folders would number them differently on each host).
    `validate` is splits.validate_splits with its settings."""
    train_dir = split_dirs["train"]
    if not train_dir.is_dir() or not any(p.is_file() for p in train_dir.rglob("*")):
        raise DataError(f"train channel ({SHARDED}): this host's shard {train_dir} is empty; SageMaker gives each "
                        "instance a part of the files, so use fewer instances than train files")
    found = validate({name: d for name, d in split_dirs.items() if name != "train"})
    reference = found["valid"]
    differ = [name for name, s in found.items() if s.classes != reference.classes]
    shard = validate({"train": train_dir})["train"]
    extra = sorted(set(shard.classes) - set(reference.classes))
    if differ or extra:
        raise DataError("class folders differ: " + "; ".join(
            [f"{name} ({found[name].root}) and valid ({reference.root})" for name in differ]
            + ([f"this host's train shard has classes that valid lacks: {', '.join(extra[:MAX_LISTED])}"] if extra
               else [])) + ". Every split needs the same class folders.")
    index = {name: i for i, name in enumerate(reference.classes)}
    samples = [(path, index[shard.classes[label]]) for path, label in shard.samples]
    absent = [c for c in reference.classes if c not in set(shard.classes)]
    if absent:
        log.info("this host's shard of train has no images of %d class(es) (%s%s); other hosts train them",
                 len(absent), ", ".join(absent[:MAX_LISTED]), " ..." if len(absent) > MAX_LISTED else "")
    return {"train": Split("train", shard.root, list(reference.classes), samples), **found}


def check_class_coverage(train: Split, dist: Context) -> None:
    """Collective: every class has training images on some host (each host's first rank counts its shard)."""
    counts = [0.0] * len(train.classes)
    if dist.local_rank == 0:
        for _path, label in train.samples:
            counts[label] += 1
    missing = [name for name, n in zip(train.classes, dist.sum(counts), strict=True) if not n]
    if missing:
        raise DataError(f"no host has training images of {len(missing)} class(es): "
                        f"{', '.join(missing[:MAX_LISTED])}; add train images of them or drop them from every split")


def split_between(dist: Context, per_host_shard: bool) -> tuple[int, int]:
    """(this rank's place, how many ranks) among the ranks that split one copy of the training split: every rank
    of the job for a replicated split, the ranks of this host for a per-host shard."""
    return (dist.local_rank, dist.local_world_size) if per_host_shard else (dist.rank, dist.world_size)


def rank_sampler(size: int, seed: int, dist: Context, per_host_shard: bool) -> EpochSampler:
    """This rank's sampler of a training split of `size` samples (this host's shard, or the whole split). Every
    rank of the job takes the same number of samples per epoch, or DDP's collective steps would wait forever:
    per-host shards differ in size, so each takes the largest share of any host (`dist.max`), padded."""
    rank, ranks = split_between(dist, per_host_shard)
    per_rank = -(-size // ranks)
    if per_host_shard:
        per_rank = dist.max(per_rank)
    return EpochSampler(size, seed, rank=rank, world_size=ranks, per_rank=per_rank)


class SeededDataset(data.ImageDataset):
    """Runs the (random) transform under the sample's own seed, whatever worker process loads it."""

    def __getitem__(self, item):
        index, seed = item
        path, label = self.samples[index]
        image = load_rgb(path, self.draft_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label
