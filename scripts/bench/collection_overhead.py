"""Overhead of debugging (tensor collection, rules, system monitor, profiler capture) on training epochs.

Trains the same model on the same generated data with the defaults (debugging=true) and with debugging=false,
alternating the two (off, on, off, on, ...) in this process so that both see the same machine, and compares
the epoch times (training + validation, as metrics.json's history records them). Prints JSON.

    python scripts/bench/collection_overhead.py [--repeats 2] [--epochs 3] [--model resnet18] [--image-size 96]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import dataset, emit, train_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternated")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-per-class", type=int, default=48)
    args = parser.parse_args()
    hps = {"model": args.model, "pretrained": False, "freeze": "none", "augment": True, "epochs": args.epochs,
           "image-size": args.image_size, "batch-size": 16, "lr": 0.001}
    with tempfile.TemporaryDirectory(prefix="bench-overhead.") as tmp:
        data = dataset(Path(tmp) / "data", classes=5, train=args.train_per_class, valid=16, size=160)
        epochs: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(args.repeats):
            for setting in ("off", "on"):
                work = Path(tmp) / f"{setting}{i}"
                metrics = train_ours(data, work, {**hps, "debugging": setting == "on"})
                epochs[setting] += [r["seconds"] for r in metrics["history"]]
                if setting == "on":
                    assert (work / "output" / "data" / "profiler-report.html").is_file()
    off, on = statistics.median(epochs["off"]), statistics.median(epochs["on"])
    emit("collection_overhead", {
        "epoch_seconds_off": epochs["off"], "epoch_seconds_on": epochs["on"],
        "median_epoch_seconds_off": off, "median_epoch_seconds_on": on,
        "mean_epoch_seconds_off": statistics.fmean(epochs["off"]),
        "mean_epoch_seconds_on": statistics.fmean(epochs["on"]),
        "overhead_percent_median": round(100 * (on - off) / off, 2),
        "overhead_percent_mean": round(100 * (statistics.fmean(epochs["on"]) / statistics.fmean(epochs["off"]) - 1), 2),
    }, setup={**hps, "train_images": 5 * args.train_per_class, "valid_images": 80, "repeats": args.repeats,
              "defaults": "collect-train-interval=10, collect-eval-interval=1, collect-stats-interval=100, "
                          "monitor-interval-ms=500, profiler-steps=10, rules=all"})


if __name__ == "__main__":
    main()
