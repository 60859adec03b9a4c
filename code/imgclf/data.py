"""Datasets and transforms as tensors, for training and evaluation (the splits are found and checked in
imgclf.splits).

The decoder and the eval transform are defined once, in imgclf.preprocessing (PIL + numpy, no torch):
evaluation uses them through this module, serving directly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from imgclf.preprocessing import Preprocessing, check_transform, load_rgb


class EvalTransform:
    """Preprocessing.eval_array as a torch tensor: evaluation and serving share one definition."""

    def __init__(self, prep: Preprocessing):
        check_transform(prep.interpolation, prep.crop_mode)
        self.prep = prep

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(self.prep.eval_array(img))


def eval_transform(prep: Preprocessing) -> EvalTransform:
    """Resize + centre crop + normalise (imgclf.preprocessing.eval_array): validation and test."""
    return EvalTransform(prep)


def train_transform(prep: Preprocessing, augment: str = "none", random_erase: float = 0.0):
    """The training split's transform: `augment` (config.AUGMENTS) then, with random_erase > 0, RandomErasing on
    the normalised tensor (erased to 0: the mean colour), as torchvision's references order them."""
    if augment == "none":
        steps: list = [eval_transform(prep)]
    else:
        interpolation = transforms.InterpolationMode(prep.interpolation)
        policy = {"trivialaugment": [transforms.TrivialAugmentWide(interpolation=interpolation)],
                  "randaugment": [transforms.RandAugment(interpolation=interpolation)]}.get(augment, [])
        steps = [transforms.RandomResizedCrop(prep.image_size, interpolation=interpolation, antialias=True),
                 transforms.RandomHorizontalFlip(), *policy, transforms.ToTensor(),
                 transforms.Normalize(prep.mean, prep.std)]
    if random_erase:
        steps.append(transforms.RandomErasing(p=random_erase, value=0))
    return steps[0] if len(steps) == 1 else transforms.Compose(steps)


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
