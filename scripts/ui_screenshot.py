"""Screenshot the try-a-model page (`python -m imgclf.local serve --ui`) with a photo's top-5 breeds.

    python scripts/ui_screenshot.py OUT [--model model.tar.gz] [--photo FILE] [--png FILE]   (make ui-screenshot)

Trains the small sample run of scripts/report_screenshot.py in OUT/run (unless --model, or OUT/run already
holds a model), serves it with the page, chooses a photo in headless Chromium (by default a test image of the
sample data that the model gets right) and writes the page with its answer to --png (default
docs/images/try-a-model.png, the README's picture), as a small palette PNG. Needs Debian's chromium package.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

from imgclf import atomic, local, sample_data  # noqa: E402
from imgclf.ui import chromium  # noqa: E402
from PIL import Image  # noqa: E402
from report_screenshot import HPS  # noqa: E402 (scripts/ is on the path: the same small run)

VIEWPORT = (960, 560)
STARTUP_TIMEOUT = 300.0
MAX_PNG_BYTES = 200_000  # small enough to commit


def example_photo(data: Path, model_url: str) -> Path:
    """The first test image of the sample data that the model puts in its own class: a picture of what the model
    does when it is right (the top of the README)."""
    for path in sorted((data / "test").glob("*/*.jpg")):
        request = urllib.request.Request(f"{model_url}/invocations", data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "image/jpeg", "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            top = json.load(response)["predictions"][0]["top_k"][0]
        if top["class_name"] == path.parent.name and top["probability"] < 0.99:  # a few bars, not one
            return path
    raise SystemExit(f"the model gets no test image of {data} right with some doubt; pass --photo")


def shoot(model: Path, data: Path, photo: Path | None, png: Path) -> None:
    try:
        with local.serving(model, ui=True, timeout=STARTUP_TIMEOUT) as server:
            photo = photo or example_photo(data, server.url)
            with tempfile.TemporaryDirectory(prefix="ui-screenshot.") as tmp, chromium.launch(Path(tmp)) as browser:
                browser.set_viewport(*VIEWPORT)
                browser.navigate(server.ui_url)
                browser.wait_until("document.getElementById('status').textContent === 'Model server ready'")
                browser.set_files("#file", [photo])
                browser.wait_until("document.querySelectorAll('#predictions li').length > 0 || "
                                   "!document.getElementById('error').hidden", timeout=120)
                browser.evaluate("document.getElementById('filename').textContent = "
                                 "document.getElementById('filename').textContent.split(' · ')[0]")  # no timing
                raw = browser.screenshot(Path(tmp) / "raw.png")
                with Image.open(raw) as img, atomic.atomic_path(png) as out:
                    img.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, "PNG",
                                                                                                   optimize=True)
    except local.ServerFailed as e:
        raise SystemExit(f"the model server did not become healthy: {e}") from None
    png.chmod(0o644)  # a file to commit, not a private temporary one
    size = png.stat().st_size
    print(f"screenshot: {png} ({size // 1000} kB)")
    if size > MAX_PNG_BYTES:
        raise SystemExit(f"{png} is {size} bytes, over {MAX_PNG_BYTES}: too big to commit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="work folder: sample data and the training run")
    parser.add_argument("--model", type=Path, help="model.tar.gz or a training output folder (skips training)")
    parser.add_argument("--photo", type=Path, help="the photo to choose in the page (default: a sample test image)")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "images" / "try-a-model.png")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, data = args.model or args.out / "run" / "model.tar.gz", args.out / "data"
    if not data.exists():
        sample_data.generate(data, classes=5)
    if args.model is None and not model.exists() and (code := local.train(data, args.out / "run", HPS)) != 0:
        return code
    shoot(model, data, args.photo, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
