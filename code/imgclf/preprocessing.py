"""How an image file becomes the model's input: THE decoder and THE eval transform, with PIL and numpy only.

Evaluation (imgclf.data.eval_transform wraps `eval_array` into a tensor) and serving (which feeds the array to
ONNX Runtime, or to torch for models without model.onnx) both call these functions, so the two cannot drift
apart, and the serving image needs no torch. The steps are torchvision's evaluation transform on a PIL image,
operation for operation: Resize (PIL's resize with the same output size rule), CenterCrop (same rounding, zero
padding when the crop is larger), ToTensor (uint8 / 255 in float32), Normalize ((x - mean) / std in float32).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision InterpolationMode values -> PIL's filters (torchvision resizes PIL images with these)
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
               "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}
INTERPOLATIONS = tuple(PIL_FILTERS)
CROP_MODES = ("center", "squash")
# The sizes a model may have (timm's largest pretrained input is 1024) and the crop_pct bounds (timm's lie in
# 0.875-1.15): config.json is refused outside them, since serving sizes its buffers from these values.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024
CROP_PCTS = (0.5, 2.0)


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


def _draft(img: Image.Image, draft_size: int | None) -> Image.Image:
    """JPEGs: decode at a reduced scale (1/2, 1/4, 1/8) no smaller than draft_size on either side."""
    if draft_size and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    return img


def load_rgb(source: str | os.PathLike | IO[bytes], draft_size: int | None = None) -> Image.Image:
    """Decode an image file to RGB. With draft_size, JPEGs decode at a reduced scale no smaller than it."""
    with Image.open(source) as img:
        _draft(img, draft_size).load()
        return to_rgb(img)


def decoded_nbytes(source: str | os.PathLike | IO[bytes], draft_size: int | None = None) -> int:
    """The bytes of load_rgb(source, draft_size)'s pixels, read from the header without decoding (EXIF rotation and
    mode conversion keep the pixel count)."""
    with Image.open(source) as img:
        width, height = _draft(img, draft_size).size
        return width * height * 3


def resize_size(image_size: int, crop_pct: float | None = None) -> int:
    """The side the image is resized to before the centre crop: image_size / crop_pct, floored as timm does;
    without crop_pct, torchvision's 256/224 proportion (rounded)."""
    if crop_pct is None:
        return int(round(image_size * 256 / 224))
    return math.floor(image_size / crop_pct)


def check_transform(interpolation: str, crop_mode: str) -> None:
    if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES:
        raise ValueError(f"interpolation={interpolation!r} (one of {INTERPOLATIONS}), crop_mode={crop_mode!r} "
                         f"(one of {CROP_MODES})")


def resized_size(width: int, height: int, side: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `side`, the longer one keeps the ratio (truncated)."""
    if width <= height:
        return side, int(side * height / width)
    return int(side * width / height), side


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision's CenterCrop on an HWC array: zero padding when smaller, then round((h - size) / 2)."""
    h, w = arr.shape[:2]
    if size > w or size > h:
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = arr.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return arr[top:top + size, left:left + size]


def eval_array(img: Image.Image, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               interpolation: str = "bilinear", crop_pct: float | None = None,
               crop_mode: str = "center") -> np.ndarray:
    """Resize + centre crop + normalise an RGB image: a float32 (3, image_size, image_size) array.

    center: the shorter side to resize_size(image_size, crop_pct), then the centre image_size square (timm's
    and torchvision's evaluation); squash: both sides to resize_size (aspect ratio not kept), then the crop.
    """
    return normalise(eval_pixels(img, image_size, interpolation, crop_pct, crop_mode), mean, std)


def eval_pixels(img: Image.Image, image_size: int, interpolation: str = "bilinear", crop_pct: float | None = None,
                crop_mode: str = "center") -> np.ndarray:
    """eval_array before normalisation: the resized and cropped pixels, a uint8 (3, image_size, image_size) array
    (what the training job's loaders send, to normalise on the device: imgclf.data.Normalise)."""
    check_transform(interpolation, crop_mode)
    side = resize_size(image_size, crop_pct)
    size = resized_size(*img.size, side) if crop_mode == "center" else (side, side)
    if size != img.size:
        img = img.resize(size, PIL_FILTERS[interpolation])
    return center_crop(np.asarray(img), image_size).transpose(2, 0, 1)


def normalise(pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """uint8 (3, H, W) -> float32: ToTensor's x / 255, then Normalize's (x - mean) / std, each step in float32."""
    arr = pixels.astype(np.float32) / np.float32(255)
    return (arr - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input. Decided once in training (models.preprocessing), stored in
    config.json (to_config) and read back by serving (from_config): both run the same `eval_array`."""
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

    def eval_array(self, img: Image.Image) -> np.ndarray:
        return eval_array(img, self.image_size, self.mean, self.std, self.interpolation, self.crop_pct,
                          self.crop_mode)

    def eval_pixels(self, img: Image.Image) -> np.ndarray:
        return eval_pixels(img, self.image_size, self.interpolation, self.crop_pct, self.crop_mode)

    def to_config(self) -> dict:
        return {"image_size": self.image_size, "resize_size": self.resize_size, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                "crop_mode": self.crop_mode}

    @classmethod
    def from_config(cls, config: dict) -> Preprocessing:
        """From config.json; files written before interpolation/crop_pct were stored get the defaults they used."""
        return cls(int(config["image_size"]), tuple(config["mean"]), tuple(config["std"]),
                   config.get("interpolation", "bilinear"), config.get("crop_pct"), config.get("crop_mode", "center"))
