"""A serving worker preparing one multi-model-server batch (IMGCLF_BATCH_SIZE requests of one photo each):
decoded and transformed on one thread, against the worker's share of the CPUs (inference.prepared: what a GPU
worker does while the GPU waits), on the shared dog photos (or generated ones). The forward pass is not timed.

    python scripts/bench/prepare.py [--batch 16] [--rounds 7] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import common
import decode
from imgclf.preprocessing import Preprocessing
from imgclf.serving import inference
from imgclf.serving.settings import ServingSettings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="requests per batch (the GPU default)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.rounds = 4, 1
    cpus = os.cpu_count() or 1
    model = inference.ServingModel(run=lambda batch: batch, config={}, class_names=[], labels=[],
                                   preprocessing=Preprocessing(args.image_size), settings=ServingSettings(workers=1))
    ways = {"one_thread": replace(model, settings=ServingSettings(workers=cpus)), "worker_threads": model}
    with tempfile.TemporaryDirectory(prefix="bench_prepare.") as tmp:
        photos = [p.read_bytes() for p in decode.photos(Path(tmp), args.batch)]
        requests = [inference.ImageRequest([photo]) for photo in photos]
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                started = time.perf_counter()
                done = inference.prepared(requests, way)
                times[name].append(time.perf_counter() - started)
                assert not [d for d in done if isinstance(d, Exception)], done
    figures = {f"{name}_ms_per_batch": round(statistics.median(t) * 1000, 2) for name, t in times.items()}
    figures.update({f"{name}_images_per_second": round(len(requests) / statistics.median(t), 1)
                    for name, t in times.items()})
    figures["speedup"] = round(figures["one_thread_ms_per_batch"] / figures["worker_threads_ms_per_batch"], 3)
    return common.emit("prepare", figures, settings={
        "requests_per_batch": len(requests), "image_size": args.image_size, "rounds": args.rounds, "cpus": cpus,
        "worker_threads": inference.preparing_threads(model.settings)})


if __name__ == "__main__":
    main()
