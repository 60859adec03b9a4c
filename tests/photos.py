"""Photo-like test images generated with Pillow, in every form clients send, so the tests need only the repository.

`photo()` paints a scene (sky-to-ground gradient, soft blobs, grain) at a real camera-ish size; the other helpers
encode it with the properties that break decoders: EXIF orientation, grayscale, CMYK, palette with transparency,
16-bit, ICC profile, progressive JPEG, huge and tiny. The same seed always gives the same bytes.
"""

from __future__ import annotations

import atexit
import functools
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageFilter

PHOTO_SIZE = (640, 480)  # a phone photo scaled for the web, like most of dogImages


def photo(size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> Image.Image:
    """An RGB image with a photo's statistics: smooth regions, edges, texture and sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    t = np.linspace(0, 1, h)[:, None, None]
    top, bottom = rng.uniform(60, 220, 3), rng.uniform(30, 160, 3)
    base = (top * (1 - t) + bottom * t) * np.ones((h, w, 3))
    img = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.3) * min(w, h)
        d.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=tuple(int(c) for c in rng.uniform(0, 255, 3)))
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, min(w, h) / 200)))
    grain = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def exif_rotated(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    """Stored sideways with EXIF Orientation=6 (display rotated 90 degrees clockwise), as phones write."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img.rotate(90, expand=True), fmt, exif=exif, **kwargs)


def palette_with_transparency(img: Image.Image) -> bytes:
    p = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(p, "PNG", transparency=0)


def sixteen_bit(img: Image.Image) -> bytes:
    """A 16-bit grayscale PNG (mode I;16), as scanners and medical or scientific cameras write."""
    wide = np.asarray(img.convert("L"), np.uint16) * 257
    return encode(Image.frombytes("I;16", img.size, wide.astype("<u2").tobytes()), "PNG")


def with_icc(img: Image.Image) -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(img, "JPEG", quality=90, icc_profile=profile)


@functools.cache
def forms(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, Content-Type): one photo in each form the serving path must decode like evaluation."""
    img = photo(seed=seed)
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    huge = photo((4000, 3000), seed=seed + 1)  # 12 MP, a camera original (under the 40 MP bomb limit)
    return {
        "jpeg": (encode(img, "JPEG", quality=90), "image/jpeg"),
        "progressive_jpeg": (encode(img, "JPEG", quality=85, progressive=True), "image/jpeg"),
        "grayscale_jpeg": (encode(img.convert("L"), "JPEG", quality=90), "application/x-image"),
        "cmyk_jpeg": (encode(img.convert("CMYK"), "JPEG", quality=90), "image/jpeg"),
        "exif_rotated_jpeg": (exif_rotated(img, quality=90), "image/jpeg"),
        "icc_jpeg": (with_icc(img), "image/jpeg"),
        "png_alpha": (encode(rgba, "PNG"), "image/png"),
        "palette_transparency_png": (palette_with_transparency(img), "image/png"),
        "png_16bit": (sixteen_bit(img), "image/png"),
        "webp": (encode(img, "WEBP", quality=90), "image/webp"),
        "octet_stream_png": (encode(img.convert("L"), "PNG"), "application/octet-stream"),
        "huge_jpeg": (encode(huge, "JPEG", quality=60), "image/jpeg"),
        "tiny_png": (encode(img.resize((7, 5)), "PNG"), "image/png"),
    }


_DIR = Path(tempfile.mkdtemp(prefix="imgclf-test-photos-"))
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def _write(name: str, body: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(body)
    return path


# Files for tests that take a path (the predict CLI, docker tests): a colour and a grayscale photo.
DOG = _write("dog.jpg", encode(photo(seed=0), "JPEG", quality=90))
GRAY = _write("gray_dog.jpg", encode(photo(seed=1).convert("L"), "JPEG", quality=90))
