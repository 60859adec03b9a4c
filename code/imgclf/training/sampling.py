"""The training split's data order: fixed by (seed, epoch), sharded between ranks, resumable mid-epoch."""

from __future__ import annotations

import torch

from imgclf import data
from imgclf.preprocessing import load_rgb


class EpochSampler(torch.utils.data.Sampler):
    """Data order and augmentation fixed by (seed, epoch): a resumed run sees exactly the same batches.

    Yields (index, sample_seed) pairs; `skip` drops the samples already trained on before an interruption.
    With several ranks each takes every world_size-th sample of the epoch's order (padded by repeating its
    start so all ranks run the same number of steps, like DistributedSampler): the ranks' k-th batches
    together are the single-process k-th batch of the global batch size.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def shard(self) -> list[int]:
        """This rank's indices of the epoch (all of them with one rank)."""
        order = self.order()
        if self.world_size == 1:
            return order
        per_rank = -(-self.size // self.world_size)
        padded = (order * -(-per_rank * self.world_size // self.size))[:per_rank * self.world_size]
        return padded[self.rank::self.world_size]

    def __iter__(self):
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_033
        return iter([(i, (base + i) % 2**63) for i in self.shard()[self.skip:]])

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.skip


class SeededDataset(data.ImageDataset):
    """Runs the (random) transform under the sample's own seed, whatever worker process loads it."""

    def __getitem__(self, item):
        index, seed = item
        path, label = self.samples[index]
        image = load_rgb(path, self.draft_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label
