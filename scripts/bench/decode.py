"""Decoder choice: PIL with draft mode (preprocessing.load_rgb, what training and serving use) against
torchvision.io.decode_image, per JPEG, one thread, on the shared dog photos (or generated ones).

    python scripts/bench/decode.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from imgclf import preprocessing
from torchvision.io import ImageReadMode, decode_image


def photos(tmp: Path, count: int) -> list[Path]:
    shared = common.REPO.parent / "shared" / "samples" / "photos"
    found = sorted(shared.rglob("*.jpg"))[:count]
    if found:
        return found
    print(f"note: {shared} does not exist: measuring with generated photos instead", file=sys.stderr)
    root = common.dataset(tmp / "data", 2, count // 2, 0, 0, size=480)
    return sorted(root.rglob("*.jpg"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 4, 1
    torch.set_num_threads(1)
    draft = preprocessing.resize_size(args.image_size)
    with tempfile.TemporaryDirectory(prefix="bench_decode.") as tmp:
        paths = photos(Path(tmp), args.images)
        blobs = [p.read_bytes() for p in paths]
        decoders = {
            "pil_draft": lambda i: preprocessing.load_rgb(paths[i], draft),
            "torchvision_io": lambda i: decode_image(torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8),
                                                     mode=ImageReadMode.RGB, apply_exif_orientation=True),
        }
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for _ in range(args.rounds):
            for name, decode in decoders.items():
                started = time.perf_counter()
                for i in range(len(paths)):
                    decode(i)
                times[name].append((time.perf_counter() - started) / len(paths) * 1000)
    figures = {f"{name}_ms_per_image": round(statistics.median(t), 3) for name, t in times.items()}
    figures["torchvision_vs_pil"] = round(figures["torchvision_io_ms_per_image"] / figures["pil_draft_ms_per_image"], 3)
    return common.emit("decode", figures, settings={"images": len(paths), "draft_size": draft, "threads": 1})


if __name__ == "__main__":
    main()
