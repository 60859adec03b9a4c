"""The odd image forms decode to the source photo's pixels (not just the same pixels by two paths).

tests/photos.py encodes one photo in every form clients send; `load_rgb` (the decoder evaluation and serving
share) must give back that photo: exactly where the form is lossless, within a stated tolerance where it is not.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from imgclf.preprocessing import load_rgb
from PIL import Image

from tests.photos import forms, photo

SOURCE = photo(seed=0)
GRAY = SOURCE.convert("L").convert("RGB")
RGBA = SOURCE.convert("RGBA")
RGBA.putalpha(Image.linear_gradient("L").resize(SOURCE.size))


def on_white(img: Image.Image) -> Image.Image:
    return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA")).convert("RGB")


def palette_reference() -> Image.Image:
    """The palette PNG's own colours (quantised: that loss is the encoder's), its transparent index on white."""
    return on_white(Image.open(io.BytesIO(forms()["palette_transparency_png"][0])).convert("RGBA"))


# form -> (expected image, largest mean absolute difference, largest single difference) on 0-255. The lossy
# bounds are about 1.3x what Pillow 13 gives (JPEG q90 with 4:2:0 chroma: 4.6; WebP: 4.2; CMYK JPEG: 2.8; grayscale
# JPEG: 2.3); a wrong decode is far off: inverted CMYK, alpha on black, 16 bits truncated, EXIF ignored (size).
EXPECTED = {
    "jpeg": (SOURCE, 6.0, None),
    "progressive_jpeg": (SOURCE, 6.0, None),
    "icc_jpeg": (SOURCE, 6.0, None),
    "exif_rotated_jpeg": (SOURCE, 6.0, None),  # upright again: EXIF orientation applied
    "webp": (SOURCE, 5.5, None),
    "cmyk_jpeg": (SOURCE, 3.7, None),
    "grayscale_jpeg": (GRAY, 3.0, None),
    "octet_stream_png": (GRAY, 0.0, 0),
    "png_16bit": (GRAY, 0.5, 1),  # 16 bits scaled back to 8: at most one step of rounding
    "png_alpha": (on_white(RGBA), 0.0, 1),  # transparency composited on white
    "palette_transparency_png": (palette_reference(), 0.0, 0),
}


@pytest.mark.parametrize("form", list(EXPECTED))
def test_odd_form_decodes_to_the_source_pixels(form):
    expected, mean_bound, max_bound = EXPECTED[form]
    got = load_rgb(io.BytesIO(forms()[form][0]))
    assert got.mode == "RGB" and got.size == expected.size, (got.mode, got.size)
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(expected.convert("RGB"), np.int16))
    assert diff.mean() <= mean_bound, diff.mean()
    if max_bound is not None:
        assert diff.max() <= max_bound, diff.max()


def test_every_form_is_checked_or_says_why_not():
    not_pixel_checked = {"huge_jpeg": "another photo, at 12 MP", "tiny_png": "a 7x5 resize of the photo"}
    assert set(forms()) == set(EXPECTED) | set(not_pixel_checked)
