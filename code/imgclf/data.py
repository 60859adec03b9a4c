"""Datasets, image decoding, transforms and the validation of ImageFolder splits.

The eval transform and the decoder are defined here once: evaluation and serving both use them.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms

from imgclf.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "valid", "test")
# Other names users give the validation split.
SPLIT_ALIASES = {"valid": ("valid", "validation", "val")}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LISTED = 10  # problems listed per kind in an error message


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation, then convert any mode to 8-bit RGB; transparency is composited on white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(source: str | os.PathLike | IO[bytes], draft_size: int | None = None) -> Image.Image:
    """Decode an image file to RGB. With draft_size, JPEGs decode at a reduced scale no smaller than it."""
    with Image.open(source) as img:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return to_rgb(img)


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # torchvision InterpolationMode values
CROP_MODES = ("center", "squash")


def resize_size(image_size: int, crop_pct: float | None = None) -> int:
    """The side the image is resized to before the centre crop: image_size / crop_pct, floored as timm does;
    without crop_pct, torchvision's 256/224 proportion (rounded)."""
    if crop_pct is None:
        return int(round(image_size * 256 / 224))
    return math.floor(image_size / crop_pct)


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation: str = "bilinear",
                   crop_pct: float | None = None, crop_mode: str = "center") -> transforms.Compose:
    """Resize + centre crop + normalise: THE eval transform, used by validation, test and serving.

    center: the shorter side to resize_size(image_size, crop_pct), then the centre image_size square (timm's
    and torchvision's evaluation); squash: both sides to resize_size (aspect ratio not kept), then the crop.
    """
    if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES:
        raise ValueError(f"interpolation={interpolation!r} (one of {INTERPOLATIONS}), crop_mode={crop_mode!r} "
                         f"(one of {CROP_MODES})")
    side = resize_size(image_size, crop_pct)
    return transforms.Compose([
        transforms.Resize(side if crop_mode == "center" else (side, side),
                          interpolation=transforms.InterpolationMode(interpolation), antialias=True),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input. Decided once in training (models.preprocessing), stored in
    config.json (to_config) and read back by serving (from_config): both build the same eval_transform."""
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float | None = None  # None: torchvision's 224/256
    crop_mode: str = "center"

    @property
    def resize_size(self) -> int:
        """Also the JPEG draft size: decoding at a reduced scale never goes below what the resize needs."""
        return resize_size(self.image_size, self.crop_pct)

    def eval_transform(self) -> transforms.Compose:
        return eval_transform(self.image_size, self.mean, self.std, self.interpolation, self.crop_pct,
                              self.crop_mode)

    def train_transform(self, augment: bool):
        return train_transform(self.image_size, augment, self.mean, self.std, self.interpolation, self.crop_pct,
                               self.crop_mode)

    def to_config(self) -> dict:
        return {"image_size": self.image_size, "resize_size": self.resize_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                "crop_mode": self.crop_mode}

    @classmethod
    def from_config(cls, config: dict) -> Preprocessing:
        """From config.json; files written before interpolation/crop_pct were stored get the defaults they used."""
        return cls(int(config["image_size"]), tuple(config["mean"]), tuple(config["std"]),
                   config.get("interpolation", "bilinear"), config.get("crop_pct"), config.get("crop_mode", "center"))


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


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


@dataclass
class Split:
    name: str
    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]


def scan_split(name: str, root: Path) -> tuple[Split, list[str]]:
    """List classes (sub-folders, sorted) and images; return the split and the problems found."""
    problems = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        problems.append(f"{name} split {root}: no class folders (expected {root}/<class>/<image files>)")
    samples = []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image_file(p))
        if not files:
            problems.append(f"empty class folder {class_dir} (no {'/'.join(IMAGE_EXTENSIONS[:3])}... files)")
        samples.extend((f, index) for f in files)
    if class_dirs and not samples:
        problems.append(f"{name} split {root}: no images")
    return Split(name, root, [p.name for p in class_dirs], samples), problems


def _check_decodes(path: Path) -> str | None:
    try:
        load_rgb(path, draft_size=32)  # reduced-scale decode still reads every byte: truncation shows
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"{path}: cannot decode ({type(e).__name__}: {e})"


def _listing(kind: str, items: list[str]) -> str:
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{len(items)} {kind}: " + "; ".join(items[:MAX_LISTED]) + more


def find_split_dirs(channels: dict[str, str]) -> dict[str, Path]:
    """Map split name -> folder from SageMaker channels: train/valid/test, or one `training` channel with them."""
    roots = [Path(channels[c]) for c in ("training",) if c in channels]
    found: dict[str, Path] = {}
    for split in SPLITS:
        for alias in SPLIT_ALIASES.get(split, (split,)):
            if alias in channels:
                found[split] = Path(channels[alias])
                break
            for root in roots:
                if (root / alias).is_dir():
                    found[split] = root / alias
                    break
            if split in found:
                break
    missing = [s for s in ("train", "valid") if s not in found]
    if missing:
        raise DataError(
            f"missing data split(s) {', '.join(missing)}: give channels train, valid (and optionally test), "
            f"or one channel 'training' holding train/, valid/ and test/ folders; got channels "
            f"{', '.join(f'{k}={v}' for k, v in sorted(channels.items())) or 'none'}"
        )
    return found


def validate_splits(split_dirs: dict[str, Path], check_decode: bool = True, workers: int = 8) -> dict[str, Split]:
    """Scan and check every split before training; raise one DataError that lists every problem by path."""
    problems: list[str] = []
    splits = {}
    for name, root in split_dirs.items():
        if not root.is_dir():
            problems.append(f"{name} split {root}: not a folder")
            continue
        split, found = scan_split(name, root)
        splits[name] = split
        problems.extend(found)
    if "train" in splits:
        reference = set(splits["train"].classes)
        for name, split in splits.items():
            if name == "train" or not split.classes:
                continue
            extra, absent = set(split.classes) - reference, reference - set(split.classes)
            if extra or absent:
                problems.append(
                    f"class folders differ between train ({splits['train'].root}) and {name} ({split.root}): "
                    + (f"only in {name}: {', '.join(sorted(extra)[:MAX_LISTED])}; " if extra else "")
                    + (f"missing from {name}: {', '.join(sorted(absent)[:MAX_LISTED])}" if absent else "")
                    + ". Every split needs the same class folders."
                )
    if check_decode and not problems:
        paths = [p for s in splits.values() for p, _ in s.samples]
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
            bad = [msg for msg in pool.map(_check_decodes, paths) if msg]
        if bad:
            problems.append(_listing("files that do not decode (delete or replace them)", bad))
    if problems:
        raise DataError(f"dataset is not usable: {len(problems)} problem(s): " + " | ".join(problems))
    for split in splits.values():
        log.info("%s: %d images in %d classes (%s)", split.name, len(split.samples), len(split.classes), split.root)
    return splits


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
