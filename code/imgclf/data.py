"""Datasets and transforms as tensors, for training and evaluation (the splits are found and checked in
imgclf.splits).

The decoder and the eval transform are defined once, in imgclf.preprocessing (PIL + numpy, no torch):
evaluation uses them through this module, serving directly.

The training job's loaders do the float work on the device: their DataLoader workers send uint8 images (the
transforms with uint8=True: the PIL steps only) and `DeviceBatches` turns each batch into the model's input with
`Normalise`, the one place where training and evaluation divide by 255 and normalise. Their images may be decoded
once into RAM (`DecodedImages`, planned by `plan_decoded_cache`) instead of every epoch. Both give the same
numbers as decoding and normalising in the workers (tests/unit/test_decoded_cache.py).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torchvision import transforms

from imgclf.errors import HyperparameterError
from imgclf.preprocessing import Preprocessing, check_transform, decoded_nbytes, load_rgb

log = logging.getLogger(__name__)


class EvalTransform:
    """Preprocessing.eval_array as a torch tensor: evaluation and serving share one definition. uint8=True: its
    pixels before normalisation (Preprocessing.eval_pixels), for `Normalise`."""

    def __init__(self, prep: Preprocessing, uint8: bool = False):
        check_transform(prep.interpolation, prep.crop_mode)
        self.prep, self.uint8 = prep, uint8

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # uint8: a copy, as PILToTensor makes one (the crop is a read-only view of the image)
        return torch.from_numpy(self.prep.eval_pixels(img).copy() if self.uint8 else self.prep.eval_array(img))


def eval_transform(prep: Preprocessing, uint8: bool = False) -> EvalTransform:
    """Resize + centre crop + normalise (imgclf.preprocessing.eval_array): validation and test."""
    return EvalTransform(prep, uint8)


class EraseBox:
    """RandomErasing(p, value=0)'s random draws on a uint8 image, without erasing: (image, box), the box being
    (top, left, height, width), 0 x 0 when nothing is erased. `Normalise` erases it to 0 after normalising, where
    RandomErasing erased it: the same draws in the same order, so the same seed erases the same rectangle."""

    def __init__(self, p: float):
        self.erasing = transforms.RandomErasing(p=p, value=0)

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.erasing
        if torch.rand(1) < e.p:  # RandomErasing.forward, draw for draw
            top, left, height, width, value = e.get_params(img, scale=e.scale, ratio=e.ratio, value=[0.0])
            if value is not img:  # get_params returns the image itself when it found no box
                return img, torch.tensor([top, left, height, width])
        return img, torch.zeros(4, dtype=torch.long)


def train_transform(prep: Preprocessing, augment: str = "none", random_erase: float = 0.0, uint8: bool = False):
    """The training split's transform: `augment` (config.AUGMENTS) then, with random_erase > 0, RandomErasing on
    the normalised tensor (erased to 0: the mean colour), as torchvision's references order them.

    uint8=True (the training job's): the same PIL steps, then the uint8 tensor, and random erasing's box beside it
    (EraseBox): `Normalise` does ToTensor's division, Normalize and the erasing, with the same numbers."""
    if augment == "none":
        steps: list = [eval_transform(prep, uint8)]
    else:
        interpolation = transforms.InterpolationMode(prep.interpolation)
        policy = {"trivialaugment": [transforms.TrivialAugmentWide(interpolation=interpolation)],
                  "randaugment": [transforms.RandAugment(interpolation=interpolation)]}.get(augment, [])
        steps = [transforms.RandomResizedCrop(prep.image_size, interpolation=interpolation, antialias=True),
                 transforms.RandomHorizontalFlip(), *policy,
                 *([transforms.PILToTensor()] if uint8 else [transforms.ToTensor(),
                                                             transforms.Normalize(prep.mean, prep.std)])]
    if random_erase:
        steps.append(EraseBox(random_erase) if uint8 else transforms.RandomErasing(p=random_erase, value=0))
    return steps[0] if len(steps) == 1 else transforms.Compose(steps)


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Set each image's box (top, left, height, width) to 0 in place, as RandomErasing(value=0) does."""
    top, left, height, width = boxes.unbind(1)
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    in_rows = (rows >= top[:, None]) & (rows < (top + height)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + width)[:, None])
    return images.masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


class Normalise:
    """A uint8 batch -> the model's float input on `device` (in `memory_format`): ToTensor's x / 255, then
    Normalize's (x - mean) / std, the same float32 operations in the same order as in the workers, so the same
    numbers: bit-equal on the CPU; on CUDA, where dividing by a Python number multiplies by its reciprocal, 255 is a
    tensor so that the division is IEEE's too. Then random erasing's boxes (EraseBox), set to 0."""

    def __init__(self, mean, std, device: torch.device, memory_format: torch.memory_format = torch.preserve_format):
        self.device, self.memory_format = device, memory_format
        self.scale = torch.tensor(255.0, device=device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def __call__(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalise takes uint8 images (the transforms' uint8=True), not {images.dtype}")
        x = images.to(self.device, non_blocking=True, memory_format=self.memory_format).float()
        x = x.div_(self.scale).sub_(self.mean).div_(self.std)
        return x if boxes is None else erase(x, boxes.to(self.device, non_blocking=True))


class DecodedImages:
    """Each image as load_rgb decodes it (RGB at the JPEG draft size), uint8, in one buffer: decoded once, not every
    epoch. `fill` runs in the main process before the DataLoader starts its workers, and nothing writes the buffer
    after it, so the forked workers share its pages (copy-on-write) instead of copying them."""

    def __init__(self, paths: list[Path], draft_size: int | None, nbytes: list[int], threads: int = 1):
        self.paths, self.draft_size, self.threads = paths, draft_size, threads
        self.offsets = np.concatenate([[0], np.cumsum(nbytes, dtype=np.int64)])
        self.shapes = np.zeros((len(paths), 2), np.int64)  # (height, width); 0 x 0: not in the buffer
        self.buffer: np.ndarray | None = None

    @classmethod
    def measure(cls, paths: list[Path], draft_size: int | None, threads: int) -> DecodedImages:
        """The layout, from the files' headers (nothing decoded or allocated yet); `fill` will use `threads`."""
        with ThreadPoolExecutor(threads) as pool:
            return cls(paths, draft_size, list(pool.map(lambda p: decoded_nbytes(p, draft_size), paths)), threads)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def fill(self, threads: int | None = None) -> None:
        """Decode every image into the buffer (once; PIL's decoders release the GIL, so threads run in parallel)."""
        if self.buffer is not None:
            return
        threads = threads or self.threads
        started = time.monotonic()
        self.buffer = np.empty(self.nbytes, np.uint8)
        with ThreadPoolExecutor(threads) as pool:
            kept = sum(pool.map(self._decode, range(len(self.paths))))
        log.info("decoded cache: %d of %d images decoded into %.2f GB in %.1f s (%d threads)%s", kept,
                 len(self.paths), self.nbytes / 1e9, time.monotonic() - started, threads,
                 "" if kept == len(self.paths) else "; the others (decoded size unlike their header's) every epoch")

    def _decode(self, index: int) -> bool:
        assert self.buffer is not None
        pixels = np.asarray(load_rgb(self.paths[index], self.draft_size))
        start, end = self.offsets[index], self.offsets[index + 1]
        if pixels.nbytes != end - start:
            return False
        self.buffer[start:end] = pixels.reshape(-1)
        self.shapes[index] = pixels.shape[:2]
        return True

    def __getitem__(self, index: int) -> Image.Image | None:
        """The decoded image, or None when it is not in the buffer."""
        height, width = self.shapes[index]
        if self.buffer is None or not height:
            return None
        start = self.offsets[index]
        return Image.fromarray(self.buffer[start:start + height * width * 3].reshape(height, width, 3))


class ImageDataset(torch.utils.data.Dataset):
    """(transformed image, label) per sample. Items are indices, or (index, seed) pairs (sampling.EpochSampler):
    the transform then runs under the sample's own seed, whatever worker process loads it. Images come from
    `decoded` (plan_decoded_cache) when it holds them, else from their files."""

    def __init__(self, samples: list[tuple[Path, int]], transform, draft_size: int | None = None):
        self.samples = samples
        self.transform = transform
        self.draft_size = draft_size
        self.decoded: DecodedImages | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        cached = self.decoded[index] if self.decoded is not None else None
        return cached if cached is not None else load_rgb(self.samples[index][0], self.draft_size)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.image(index), self.samples[index][1]
        if seed is None:
            return self.transform(image), label
        # The transforms draw from torch's CPU generator: seeded here, restored after (a tenth of the cost of
        # torch.random.fork_rng + torch.manual_seed, which a decoded image would notice; the same draws).
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.transform(image), label
        finally:
            torch.set_rng_state(state)


def cpus() -> int:
    """The CPUs this process may run on (a container's or taskset's affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_processes() -> int:
    """The training processes of this host (torchrun's LOCAL_WORLD_SIZE): they share its CPUs and RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def cache_budget(share: float) -> tuple[int, str]:
    """(bytes this process may hold decoded, how that was worked out)."""
    memory = psutil.virtual_memory()
    processes = host_processes()
    budget = int(min(share * memory.total, memory.available) / processes)
    return budget, (f"{share:g} of {memory.total / 1e9:.1f} GB RAM, at most the {memory.available / 1e9:.1f} GB "
                    f"available, / {processes} training process(es) on this host")


def plan_decoded_cache(mode: str, share: float, datasets: dict[str, ImageDataset], threads: int) -> None:
    """The hyperparameters decoded-cache (auto/on/off) and decoded-cache-memory: give each of `datasets`, in order
    (train first), an empty DecodedImages when its decoded size fits what is left of the budget (DeviceBatches fills
    it on the first pass); the others decode every epoch. One log line per split, with the figures."""
    if mode == "off":
        log.info("decoded cache off (decoded-cache=off): images are decoded every epoch")
        return
    budget, why = cache_budget(share)
    left = budget
    for name, dataset in datasets.items():
        decoded = DecodedImages.measure([path for path, _ in dataset.samples], dataset.draft_size, threads)
        figures = (f"{name}: {len(dataset)} images decode to {decoded.nbytes / 1e9:.2f} GB at draft size "
                   f"{dataset.draft_size}, budget left {left / 1e9:.2f} GB of {budget / 1e9:.2f} GB ({why})")
        if decoded.nbytes <= left:
            dataset.decoded, left = decoded, left - decoded.nbytes
            log.info("decoded cache on for %s: decoded once, on the first pass", figures)
        elif mode == "on" and name == "train":
            raise HyperparameterError(f"decoded-cache=on: {figures}; raise decoded-cache-memory (now {share:g}), use "
                                      "an instance with more RAM, or decoded-cache=auto to decode every epoch instead")
        else:
            log.info("decoded cache off for %s: it does not fit, so its images are decoded every epoch", figures)


class DeviceBatches:
    """A DataLoader of uint8 images (the transforms' uint8=True) as batches of the model's input on the device
    (`Normalise`) and labels: what the training loop and evaluation iterate. A planned decoded cache of its dataset
    is filled on the first pass, before the DataLoader starts (forks) its workers."""

    def __init__(self, loader: torch.utils.data.DataLoader, normalise: Normalise):
        if not isinstance(loader.dataset, ImageDataset):
            raise TypeError(f"DeviceBatches reads an ImageDataset, not {type(loader.dataset).__name__}")
        self.loader, self.normalise = loader, normalise
        self.dataset: ImageDataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.dataset.decoded is not None:
            self.dataset.decoded.fill()
        for images, labels in self.loader:
            boxes = None
            if isinstance(images, list):  # (images, erase boxes): EraseBox
                images, boxes = images
            yield self.normalise(images, boxes), labels
