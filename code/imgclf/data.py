"""Datasets and transforms (the splits are found and checked in imgclf.splits).

The decoder and the eval transform are defined once, in imgclf.preprocessing (PIL + numpy, no torch):
evaluation uses them through this module, serving directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from imgclf import preprocessing
from imgclf.preprocessing import (  # noqa: F401 (the decoder and its settings, re-exported for training)
    CROP_MODES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    Preprocessing,
    load_rgb,
    resize_size,
    to_rgb,
)


class EvalTransform:
    """preprocessing.eval_array as a torch tensor: evaluation and serving share one definition."""

    def __init__(self, *args):
        preprocessing.check_transform(args[3], args[5])
        self.args = args

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocessing.eval_array(img, *self.args))


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear",
                   crop_pct: float | None = None, crop_mode: str = "center") -> EvalTransform:
    """Resize + centre crop + normalise (imgclf.preprocessing.eval_array): validation, test and serving."""
    return EvalTransform(image_size, tuple(mean), tuple(std), interpolation, crop_pct, crop_mode)


def train_transform(image_size: int, augment: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    interpolation: str = "bilinear", crop_pct: float | None = None, crop_mode: str = "center"):
    if not augment:
        return eval_transform(image_size, mean, std, interpolation, crop_pct, crop_mode)
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, interpolation=transforms.InterpolationMode(interpolation),
                                     antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[Path, int]], transform, draft_size: int | None = None):
        self.samples = samples
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return self.transform(load_rgb(path, self.draft_size)), label
