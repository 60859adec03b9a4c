"""Benchmark (a): full fine-tuning throughput, the reference project's loop against ours, in one run.

Same model (random init: throughput does not depend on the weights), same generated JPEGs, same batch
size, same machine. An epoch is a training pass plus a validation pass (one image per class), timed on the
last of --epochs epochs (steady state: workers started, kernels chosen). Prints JSON with the ratio.

    python scripts/bench/train_throughput.py [--model resnet50] [--images 64] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common
import reference


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_training_args(parser, model="resnet50", epochs=2, epochs_help="the last one is timed")
    parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="our hyperparameters")
    args = parser.parse_args(argv)
    hps = common.training_hyperparameters(args, freeze="none", quick_epochs=1,
                                          **dict(kv.split("=", 1) for kv in args.hp))
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        data = common.dataset(Path(tmp) / "data", args.classes, args.images // args.classes, 1,
                              size=48 if args.quick else 320)
        ref = reference.epochs(data, args.model, args.batch_size, args.image_size, head_only=False,
                               count=args.epochs)[-1]
        ours = common.train_ours(data, Path(tmp) / "ours", hps)["history"][-1]
    images = args.images // args.classes * args.classes
    ref_ips, ours_ips = images / ref["seconds"], images / ours["seconds"]
    return common.emit("train_throughput", {
        "reference_epoch_seconds": round(ref["seconds"], 3), "ours_epoch_seconds": ours["seconds"],
        "reference_images_per_second": round(ref_ips, 3), "ours_images_per_second": round(ours_ips, 3),
        "speedup": round(ours_ips / ref_ips, 3),
    }, settings={"model": args.model, "image_size": args.image_size, "train_images": images,
                 "valid_images": args.classes, "batch_size": args.batch_size, "timed_epoch": args.epochs,
                 "our_hyperparameters": hps})


if __name__ == "__main__":
    main()
