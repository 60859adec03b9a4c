"""Data loading per worker: today's path (each image decoded from its JPEG every epoch, then ToTensor and Normalize
in the worker) against the decode-once path (imgclf.data: decoded once into RAM, uint8 from the worker, normalised
in the main process or on the GPU), on generated JPEGs of photo sizes, 500x375 to 3000x2000.

    python scripts/bench/dataloader.py [--images 48] [--augment flip] [--rounds 3] [--photos DIR] [--quick]

Figures: a worker's CPU time per image (one thread, as DataLoader workers run: load, transform, collate) and the
images/s per worker it allows, for both paths, and their ratio `speedup_per_worker`, overall and per photo size;
what the decode-once path adds elsewhere (Normalise in the main process on the CPU, per image; the one pass that
decodes into RAM); `bitwise_equal`: both paths' batches for one seed and sampler are torch.equal (flip, and
trivialaugment with random erasing); and images/s of real DataLoaders with 1 to CPUs+1 workers, the measure of the
num-workers rule (docs/performance.md): both paths with an idle main process, and decode-once with a main process
that is busy --main-ms of CPU per image besides, as a training process is.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
from imgclf import data, sample_data
from imgclf.preprocessing import Preprocessing
from imgclf.training.sampling import EpochSampler, SeededDataset
from PIL import Image
from torch.utils.data import DataLoader, default_collate

SIZES = ((500, 375), (375, 500), (640, 480), (800, 600), (1024, 768), (1600, 1200), (2048, 1536), (3000, 2000))


def photos(root: Path, count: int) -> list[tuple[Path, int]]:
    """JPEGs cycling through SIZES: a drawn pattern scaled up, with sensor-like noise so that they compress (and
    decode) like photos rather than flat drawings (quality 90: 2-4 bits per pixel; the dog photos: median 2.5)."""
    rng = np.random.default_rng(0)
    found = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        img = sample_data.draw(i % len(sample_data.BREEDS), rng, 320).resize((width, height), Image.Resampling.BICUBIC)
        noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
        path = root / f"{width}x{height}_{i:03d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        found.append((path, i % 4))
    return found


def datasets(samples, prep: Preprocessing, augment: str, random_erase: float = 0.0):
    """(today's, decode-once) datasets: today's is sampling.SeededDataset over data.train_transform's float path."""
    old = SeededDataset(samples, data.train_transform(prep, augment, random_erase), prep.resize_size)
    new = data.ImageDataset(samples, data.train_transform(prep, augment, random_erase, uint8=True), prep.resize_size)
    new.decoded = data.DecodedImages.measure([p for p, _ in samples], prep.resize_size, data.cpus())
    return old, new


def worker_cpu(dataset, sampler: EpochSampler, batch_size: int, sizes: list[str]) -> dict[str, float]:
    """CPU seconds per image of a worker's work (load + transform, and the batch's collate shared out), by size."""
    per_size: dict[str, list[float]] = {size: [] for size in sizes}
    items = list(sampler)
    for start in range(0, len(items), batch_size):
        batch, spent = [], []
        for item in items[start:start + batch_size]:
            began = time.process_time()
            batch.append(dataset[item])
            spent.append(time.process_time() - began)
        began = time.process_time()
        default_collate(batch)
        share = (time.process_time() - began) / len(batch)
        for (index, _), seconds in zip(items[start:start + batch_size], spent, strict=True):
            per_size[sizes[index]].append(seconds + share)
    return {size: statistics.fmean(t) for size, t in per_size.items() if t}


def bitwise_equal(samples, prep: Preprocessing, augment: str, random_erase: float, batch_size: int) -> bool:
    """One epoch of batches, today's path against decode-once + Normalise (main process, CPU): torch.equal?"""
    old, new = datasets(samples, prep, augment, random_erase)
    normalise = data.Normalise(prep.mean, prep.std, torch.device("cpu"))
    pairs = zip(DataLoader(old, batch_size, sampler=EpochSampler(len(samples), 3)),
                data.DeviceBatches(DataLoader(new, batch_size, sampler=EpochSampler(len(samples), 3)), normalise),
                strict=True)
    return all(torch.equal(a, b) and torch.equal(la, lb) for (a, la), (b, lb) in pairs)


def loader_rate(dataset, prep: Preprocessing, workers: int, batch_size: int, epochs: int, decoded: bool,
                main_ms: float = 0.0) -> float:
    """Images/s of a real DataLoader with `workers` workers over `epochs` epochs (after one that starts them); the
    decode-once path normalises in this process, as the job does without a GPU. `main_ms`: CPU milliseconds this
    process spends per image besides (a busy loop: the training process's own work, which workers compete with)."""
    sampler = EpochSampler(len(dataset), 0)
    loader = DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, persistent_workers=True,
                        prefetch_factor=4)
    normalise = data.Normalise(prep.mean, prep.std, torch.device("cpu"))
    batches = data.DeviceBatches(loader, normalise) if decoded else loader
    for _ in batches:  # starts the workers (and fills the decoded cache)
        pass
    began, seen = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        for images, _labels in batches:
            seen += len(images)
            busy_until = time.thread_time() + main_ms / 1000 * len(images)
            while time.thread_time() < busy_until:
                pass
    return seen / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="generated JPEGs, cycling through the sizes")
    parser.add_argument("--photos", type=Path, help="measure on (up to --images of) these JPEGs instead, e.g. "
                        "../shared/samples/photos/dogs; by_size then has one entry, 'photos'")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--augment", default="flip", choices=("none", "flip", "trivialaugment", "randaugment"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the CPU timing; the median")
    parser.add_argument("--loader-epochs", type=int, default=25, help="timed epochs per DataLoader measurement")
    parser.add_argument("--max-workers", type=int, default=0, help="DataLoaders with 1..this many workers "
                        "(0: the CPUs + 1)")
    parser.add_argument("--main-ms", type=float, default=1.0, help="the decode-once DataLoaders are also measured "
                        "with the main process busy this many CPU ms per image (a training process's own work)")
    parser.add_argument("--quick", action="store_true", help="smoke test: a few images, one round, 1 worker")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.loader_epochs, args.max_workers, args.batch_size = 8, 1, 1, 1, 4
    torch.set_num_threads(1)  # DataLoader workers run one thread each; the timing here is one worker's
    prep = Preprocessing(args.image_size)
    max_workers = args.max_workers or data.cpus() + 1
    with tempfile.TemporaryDirectory(prefix="bench_dataloader.") as tmp:
        if args.photos:
            samples = [(path, i % 4) for i, path in enumerate(sorted(args.photos.rglob("*.jpg"))[:args.images])]
            sizes = ["photos"] * len(samples)
        else:
            samples = photos(Path(tmp), args.images)
            sizes = [path.name.split("_")[0] for path, _ in samples]
        old, new = datasets(samples, prep, args.augment)
        began = time.process_time()
        assert new.decoded is not None
        new.decoded.fill(threads=1)
        fill_cpu = (time.process_time() - began) / len(samples)
        sampler = EpochSampler(len(samples), seed=0)
        timings: dict[str, list[dict[str, float]]] = {"old": [], "decoded": []}
        for round_ in range(args.rounds):
            sampler.set_epoch(round_)
            for name, dataset in (("old", old), ("decoded", new)):
                timings[name].append(worker_cpu(dataset, sampler, args.batch_size, sizes))
        per_size = {name: {size: statistics.median(r[size] for r in rounds) for size in rounds[0]}
                    for name, rounds in timings.items()}
        mean = {name: statistics.fmean(per_size[name][s] for s in sizes) for name in per_size}  # over the images
        pixels = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8)
        normalise = data.Normalise(prep.mean, prep.std, torch.device("cpu"))
        began = time.process_time()
        for _ in range(50):
            normalise(pixels)
        normalise_cpu = (time.process_time() - began) / (50 * args.batch_size)
        equal = {"flip": bitwise_equal(samples, prep, "flip", 0.0, args.batch_size),
                 "trivialaugment_random_erase": bitwise_equal(samples[:16], prep, "trivialaugment", 0.5,
                                                              args.batch_size)}
        loaders = {}
        for workers in range(1, max_workers + 1):
            old_rate = loader_rate(old, prep, workers, args.batch_size, args.loader_epochs, decoded=False)
            new_rate = loader_rate(new, prep, workers, args.batch_size, args.loader_epochs, decoded=True)
            busy_rate = loader_rate(new, prep, workers, args.batch_size, args.loader_epochs, decoded=True,
                                    main_ms=args.main_ms)
            loaders[str(workers)] = {"old_images_per_second": round(old_rate, 1),
                                     "decoded_images_per_second": round(new_rate, 1),
                                     "decoded_busy_main_images_per_second": round(busy_rate, 1)}
    figures = {
        "old_cpu_ms_per_image": round(mean["old"] * 1000, 3),
        "decoded_cpu_ms_per_image": round(mean["decoded"] * 1000, 3),
        "old_images_per_second_per_worker": round(1 / mean["old"], 1),
        "decoded_images_per_second_per_worker": round(1 / mean["decoded"], 1),
        "speedup_per_worker": round(mean["old"] / mean["decoded"], 2),
        "by_size": {size: {"old_ms": round(per_size["old"][size] * 1000, 3),
                           "decoded_ms": round(per_size["decoded"][size] * 1000, 3),
                           "speedup": round(per_size["old"][size] / per_size["decoded"][size], 2)}
                    for size in dict.fromkeys(sizes)},
        "normalise_cpu_ms_per_image_main_process": round(normalise_cpu * 1000, 3),
        "decode_once_cpu_ms_per_image": round(fill_cpu * 1000, 3),
        "decoded_megabytes": round(new.decoded.nbytes / 1e6, 1),
        "bitwise_equal": all(equal.values()),
        "bitwise_equal_by_transform": equal,
        "loader_images_per_second_by_workers": loaders,
    }
    return common.emit("dataloader", figures, settings={
        "images": len(samples), "photos": str(args.photos or "generated"), "sizes": list(dict.fromkeys(sizes)),
        "augment": args.augment,
        "image_size": args.image_size, "draft_size": prep.resize_size, "batch_size": args.batch_size,
        "rounds": args.rounds, "loader_epochs": args.loader_epochs, "main_ms": args.main_ms, "cpus": data.cpus(),
        "quick": args.quick})


if __name__ == "__main__":
    main()
