"""A small ImageFolder dataset of procedurally drawn "breeds", learnable in a minute on 2 CPU cores.

Each breed is a pattern (spots, stripes, rings, checks, triangles, ...) in its own range of colours, drawn
with random scale, position, rotation, colour jitter, noise and image size, so the model must learn the
breed, not one picture.
Layout and names follow dogImages: <out>/{train,valid,test}/<NNN.Name>/<Name>_<NNNNN>.jpg

    python -m imgclf.sample_data OUT [--classes 5] [--train 24] [--valid 8] [--test 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BREEDS = ("Spotted_pointer", "Striped_terrier", "Ringed_retriever", "Checkered_collie", "Triangle_spaniel",
          "Crossed_corgi", "Wavy_whippet", "Dotted_dalmatian")


def _colour(rng, hue: float, light: float) -> tuple[int, int, int]:
    """A colour near `hue` (0-1): each breed has its own coat colours, jittered per image."""
    h = (hue + rng.normal(0, 0.04)) % 1.0
    rgb = colorsys.hls_to_rgb(h, float(np.clip(light + rng.normal(0, 0.08), 0.1, 0.9)), rng.uniform(0.4, 0.9))
    red, green, blue = (int(255 * c) for c in rgb)
    return red, green, blue


def draw(breed: int, rng: np.random.Generator, size: int = 96) -> Image.Image:
    hue = breed / len(BREEDS)
    bg = _colour(rng, hue, 0.75)
    fg = _colour(rng, hue + 0.5, 0.3)
    side = size * 2  # draw large, rotate, then crop: patterns fill the frame at any angle
    img = Image.new("RGB", (side, side), bg)
    d = ImageDraw.Draw(img)
    step = int(rng.integers(14, 28))
    width = max(2, step // 3)
    offset = int(rng.integers(0, step))
    kind = breed % len(BREEDS)
    for y in range(-step + offset, side + step, step):
        for x in range(-step + offset, side + step, step):
            r = step // 3
            if kind == 0:  # spots
                d.ellipse([x - r, y - r, x + r, y + r], fill=fg)
            elif kind == 3 and ((x // step) + (y // step)) % 2 == 0:  # checks
                d.rectangle([x, y, x + step, y + step], fill=fg)
            elif kind == 4:  # triangles
                d.polygon([(x, y + r), (x + r, y - r), (x + 2 * r, y + r)], fill=fg)
            elif kind == 5:  # crosses
                d.line([x - r, y, x + r, y], fill=fg, width=width)
                d.line([x, y - r, x, y + r], fill=fg, width=width)
            elif kind == 7:  # small dots, dense
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=fg)
        if kind == 1:  # stripes
            d.rectangle([0, y, side, y + width], fill=fg)
        elif kind == 6:  # waves
            pts = [(x, y + r * math.sin(x / step * math.pi)) for x in range(0, side, 4)]
            d.line(pts, fill=fg, width=width)
    if kind == 2:  # rings around a random centre
        cx, cy = rng.integers(side // 4, 3 * side // 4, 2)
        for rad in range(step, side, step):
            d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], outline=fg, width=width)
    img = img.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR)
    crop = int(side * rng.uniform(0.35, 0.5))
    x0, y0 = rng.integers(side // 4, side - crop - side // 4 + 1, 2)
    img = img.crop((x0, y0, x0 + crop, y0 + crop)).resize((size, int(size * rng.uniform(0.75, 1.33))))
    noise = rng.normal(0, 12, (img.height, img.width, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))


def class_names(classes: int) -> list[str]:
    if not 2 <= classes <= len(BREEDS):
        raise ValueError(f"classes must be between 2 and {len(BREEDS)}, got {classes}")
    return [f"{i + 1:03d}.{name}" for i, name in enumerate(BREEDS[:classes])]


def generate(out: str | Path, classes: int = 5, per_split: dict[str, int] | None = None, seed: int = 0,
             size: int = 96) -> Path:
    """Write the dataset under `out`; the same arguments always give the same files."""
    per_split = per_split or {"train": 24, "valid": 8, "test": 8}
    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for index, name in enumerate(class_names(classes)):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                image = draw(index, rng, size)
                image.save(folder / f"{name.split('.', 1)[1]}_{n:05d}.jpg", quality=90)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--train", type=int, default=24)
    parser.add_argument("--valid", type=int, default=8)
    parser.add_argument("--test", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args(argv)
    path = generate(args.out, args.classes, {"train": args.train, "valid": args.valid, "test": args.test},
                    args.seed, args.size)
    print(f"sample dataset written to {path}")


if __name__ == "__main__":
    main()
