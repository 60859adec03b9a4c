"""Benchmark (d): the model's forward pass alone, one image, with the serving settings (inference.model_fn: ONNX
Runtime on model.onnx when the model has one, else PyTorch in eval mode, channels_last, the serving dtype; the
threads of one server worker). The serving benchmark
divides its latency by this figure: what the server adds on top of the network.

    python scripts/bench/forward.py [--model resnet50] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import common
import torch


def measure(model_path: Path, threads: int, iterations: int) -> dict:
    """Seconds per forward pass of one preprocessed image (p50/p95/p99) and of the preprocessing alone."""
    from imgclf.serving import inference
    from imgclf.serving.settings import ServingSettings

    settings = dataclasses.replace(ServingSettings.from_environment(), torch_threads=threads)  # IMGCLF_SERVE_DTYPE
    model = inference.model_fn(str(model_path), settings)
    image = common.photo()
    prep, fwd = [], []
    for _ in range(iterations):
        t0 = time.perf_counter()
        batch = model.preprocessing.eval_array(inference.decode(image, model.draft_size))[None]
        t1 = time.perf_counter()
        model.run(batch)
        fwd.append(time.perf_counter() - t1)
        prep.append(t1 - t0)
    return {"threads": threads, "runtime": model.run.description, "forward_seconds": common.percentiles(fwd),
            "decode_transform_seconds": common.percentiles(prep)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model and sizes")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.iterations = "resnet18", 32, 3
    with tempfile.TemporaryDirectory(prefix="bench_forward.") as tmp:
        path = common.model_dir(Path(tmp) / "model", args.model, args.image_size)
        figures = measure(path, args.threads, args.iterations)
    settings = {"model": args.model, "image_size": args.image_size, "iterations": args.iterations,
                "photo_bytes": len(common.photo())}
    return common.emit("forward", figures, settings=settings)


if __name__ == "__main__":
    main()
