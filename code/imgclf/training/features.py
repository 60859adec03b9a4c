"""Frozen-backbone fast path: compute the backbone's features once per image, then train the head on them.

While only the head trains, the backbone is in eval mode (models.train_mode) and sees the same pixels every
epoch (augment=false), so its output for an image never changes: computing it once and feeding the cached
features to the head gives the same logits, losses and gradients as running the whole model every epoch,
with the same data order (sampling.EpochSampler) and the same head initialisation. Epochs after the
extraction then cost milliseconds instead of a full forward pass over the dataset.

The split is generic: a forward pre-hook on the head layer (the one models.replace_head returned) captures
its input, i.e. everything before it (VGG: features + classifier[0..5] with Dropout in eval). A model whose
output is not just head(input) (SqueezeNet pools after its head convolution) is detected on the first batch
and trained by the normal loop instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
from torch import nn

from imgclf import data
from imgclf.config import Hyperparameters
from imgclf.preprocessing import Preprocessing
from imgclf.training.progress import Progress

log = logging.getLogger(__name__)


class FeatureCacheUnsupported(Exception):
    """The model cannot be split into (frozen trunk -> features, head); the normal loop is used."""


def should_cache(hp: Hyperparameters) -> tuple[bool, str]:
    """(use the cache?, why): the decision for `feature-cache` = auto/on/off, with the reason for the log."""
    frozen_epochs = {"head": hp.epochs, "none": 0}.get(hp.freeze, min(hp.head_epochs, hp.epochs))
    if hp.feature_cache == "off":
        return False, "feature-cache=off"
    if frozen_epochs == 0:
        return False, f"the backbone trains from the first epoch (freeze={hp.freeze})"
    changing = ([f"augment={hp.augment}"] if hp.augment != "none" else []) + [
        f"{name}={value:g}" for name, value in (("random-erase", hp.random_erase), ("mixup", hp.mixup),
                                                ("cutmix", hp.cutmix)) if value]
    if changing:
        return False, (f"{', '.join(changing)} changes the pixels every epoch, so the backbone's features cannot be "
                       "reused; without augmentation (augment=none) the head trains on cached features")
    if hp.feature_cache == "auto" and frozen_epochs < 2:
        return False, "the backbone is frozen for one epoch only: caching would not save a pass"
    return True, f"the backbone is frozen for {frozen_epochs} epoch(s) and no augmentation changes the pixels"


class FeatureCache:
    """Features and labels of one split, indexed like the split's samples; on `device`."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, indices: list[int], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) batches in the order of `indices`, batched like a DataLoader (last one short)."""
        for start in range(0, len(indices), batch_size):
            idx = torch.as_tensor(indices[start:start + batch_size], device=self.features.device)
            yield self.features[idx], self.labels[idx]


class SamplerBatches:
    """A DataLoader stand-in over a cache: batches in the sampler's order (and resume skip)."""

    def __init__(self, cache: FeatureCache, sampler, batch_size: int):
        self.cache, self.sampler, self.batch_size = cache, sampler, batch_size

    def __iter__(self):
        return self.cache.batches([index for index, _seed in self.sampler], self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


class SequentialBatches(SamplerBatches):
    """Batches in index order (evaluation)."""

    def __init__(self, cache: FeatureCache, batch_size: int):
        super().__init__(cache, None, batch_size)

    def __iter__(self):
        return self.cache.batches(list(range(len(self.cache))), self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.cache) // self.batch_size)


def head_module(model: nn.Module, head: list[str]) -> nn.Module:
    if len(head) != 1:
        raise FeatureCacheUnsupported(f"the model has {len(head)} head layers ({', '.join(head)}), not one")
    return model.get_submodule(head[0])


@torch.no_grad()  # not inference_mode: the head's backward saves these features
def extract(model: nn.Module, head: list[str], loader, speed, watch=None,
            progress: Progress | None = None) -> FeatureCache:
    """Run the (eval-mode) model over `loader` once; keep the input of the head layer for every image.

    `watch` (the Debugger) sees the backbone's activations on the first batch: training steps on cached
    features never run the backbone, so this is where poor_weight_initialization can judge it.

    `loader` must yield the split's samples in index order (no shuffling). The features keep the dtype the
    trunk produced under autocast, so the head computes exactly what it computes inside the full model.
    """
    layer = head_module(model, head)
    captured: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    chunks: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    checked = False
    started = time.monotonic()
    try:
        for images, batch_labels in loader:
            captured.clear()
            with speed.autocast():
                if watch is not None and not chunks:
                    watch.backbone_forward_begin(model)
                logits = model(speed.inputs(images))
                if watch is not None and not chunks:
                    watch.backbone_forward_end(model)
                if len(captured) != 1:
                    raise FeatureCacheUnsupported(f"head layer {head[0]} ran {len(captured)} times in one forward")
                if not checked:  # the model's output must be the head's output, nothing after it
                    again = layer(captured[0])
                    if again.shape != logits.shape or not torch.allclose(again.float(), logits.float(),
                                                                         rtol=1e-4, atol=1e-5):
                        raise FeatureCacheUnsupported(f"{type(model).__name__} transforms the output of its head "
                                                      f"layer {head[0]} further")
                    checked = True
            chunks.append(captured[0].detach().clone())
            labels.append(batch_labels.to(speed.device))
            if progress is not None:
                progress.update()
    finally:
        hook.remove()
        if progress is not None:
            progress.close()
    features = torch.cat(chunks)
    log.info("feature cache: %d images -> %s %s features in %.1f s (%.1f MB)", len(features),
             tuple(features.shape[1:]), str(features.dtype).removeprefix("torch."), time.monotonic() - started,
             features.numel() * features.element_size() / 1e6)
    return FeatureCache(features, torch.cat(labels))


class FrozenFeatures:
    """The training loop's switch: `for_epoch` gives (head, train batches, valid batches) on cached features
    for an epoch whose backbone is frozen, or None for the normal loop. Extraction happens on first use.
    `decision` is `should_cache`'s (use the cache?, why)."""

    def __init__(self, decision: tuple[bool, str], model: nn.Module, head: list[str], speed, splits: dict, sampler,
                 make_loader, batch_size: int, prep: Preprocessing, watch=None, log_interval: int = 0):
        self.enabled, why = decision
        log.info("feature cache %s: %s", "on" if self.enabled else "off", why)
        self.model, self.head, self.speed, self.splits = model, head, speed, splits
        self.sampler, self.make_loader, self.batch_size, self.prep = sampler, make_loader, batch_size, prep
        self.watch = watch  # the Debugger: sees the backbone during extraction
        self.log_interval = log_interval
        self.train: FeatureCache | None = None
        self.valid: FeatureCache | None = None

    def _extract(self, split: str, watch=None) -> FeatureCache:
        loader = self.make_loader(data.ImageDataset(self.splits[split].samples, data.eval_transform(self.prep),
                                                    self.prep.resize_size))
        progress = Progress(f"feature extraction ({split})", len(loader), self.log_interval)
        return extract(self.model, self.head, loader, self.speed, watch, progress)

    def for_epoch(self, backbone_trains: bool) -> tuple[nn.Module, SamplerBatches, SequentialBatches] | None:
        if not self.enabled or backbone_trains:
            return None
        if self.train is None or self.valid is None:
            try:
                self.train = self._extract("train", self.watch)
                self.valid = self._extract("valid")
            except FeatureCacheUnsupported as e:
                log.warning("feature cache off: %s; training with the normal loop", e)
                self.enabled = False
                return None
        return (head_module(self.model, self.head), SamplerBatches(self.train, self.sampler, self.batch_size),
                SequentialBatches(self.valid, self.batch_size))
