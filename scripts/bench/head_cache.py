"""Benchmark (b): frozen-backbone head training, time per epoch: reference loop, our loop without and with
the feature cache, in one run (VGG16 with a new last layer, as the reference project).

The cache's first epoch includes computing the features; the figures that matter are the epochs after it,
against the reference loop's epoch. Also checks that the cached run's metrics equal the uncached run's.

    python scripts/bench/head_cache.py [--model vgg16] [--images 64] [--epochs 3] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import common
import reference


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(parser, model="vgg16", epochs=3)
    args = parser.parse_args(argv)
    # the training loop's epochs with and without the cache (head-solver=lbfgs would fit the head once instead)
    hps = {**common.training_hyperparameters(args, freeze="head", quick_epochs=2), "head-solver": "sgd"}
    with tempfile.TemporaryDirectory(prefix="bench_head.") as tmp:
        data = common.dataset(Path(tmp) / "data", args.classes, args.images // args.classes, 2,
                              size=48 if args.quick else 320)
        ref = reference.epochs(data, args.model, args.batch_size, args.image_size, head_only=True, count=2)
        slow = common.train_ours(data, Path(tmp) / "slow", {**hps, "feature-cache": "off"})["history"]
        cached = common.train_ours(data, Path(tmp) / "cached", {**hps, "feature-cache": "on"})["history"]
    keys = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy")
    match = all(abs(a[k] - b[k]) <= 1e-4 + 1e-3 * abs(a[k]) for a, b in zip(slow, cached) for k in keys)
    ref_epoch = statistics.median(e["seconds"] for e in ref)
    later = [e["seconds"] for e in cached[1:]] or [cached[0]["seconds"]]
    cached_later = max(statistics.mean(later), 1e-6)
    return common.emit("head_cache", {
        "reference_epoch_seconds": round(ref_epoch, 3),
        "slow_path_epoch_seconds": [e["seconds"] for e in slow],
        "cached_epoch_seconds": [e["seconds"] for e in cached],
        "cached_later_epoch_seconds": round(cached_later, 4),
        "speedup_vs_reference": round(ref_epoch / cached_later, 1),
        "speedup_vs_slow_path": round(statistics.mean(e["seconds"] for e in slow) / cached_later, 1),
        "metrics_match": match,
    }, settings={"model": args.model, "image_size": args.image_size, "train_images": len(slow) and
                 args.images // args.classes * args.classes, "valid_images": 2 * args.classes,
                 "batch_size": args.batch_size, "epochs": args.epochs, "our_hyperparameters": hps})


if __name__ == "__main__":
    main()
