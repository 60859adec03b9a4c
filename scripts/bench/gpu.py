"""GPU benchmark: training and inference images/second of ResNet50 and ViT-B/16 at bf16 on synthetic tensors, and
with --real-data DIR the same training step fed from JPEGs through the training job's own data loaders.

Made for one call on the lent GPU machine (well under 5 minutes): no downloads, prints JSON (stdout) and one
summary line per model (stderr). Training step = bf16 autocast forward + cross-entropy + backward + AdamW step
(channels_last for the CNN), inference = bf16 forward under inference_mode. --compile adds torch.compile'd
variants (about a minute each).

--real-data DIR (an ImageFolder dataset with train/, found as the job finds it, or one folder of class folders, as a
`train` channel) runs that training step again, same model, batch size, dtype and compile setting, on the batches of
the job's training DataLoader, wired by the job's own imgclf.training.job.run_batches: imgclf.data's ImageDataset
with the job's training transform (uint8), the decode-once cache planned by data.plan_decoded_cache (decoded-cache,
decoded-cache-memory), the sampler of a single-process job, training.job.LoaderSettings.loader (num-workers: -1 =
the job's rule; prefetch-factor) and data.DeviceBatches (host-to-device copy and Normalise on the device). Per model
it reports the real-data images/s, its ratio to the synthetic figure, and the data-wait share: the time blocked in
next() of that batch stream, which includes the copy and normalisation on the device (torch.cuda.synchronize before
and after it on a GPU; wall time on the CPU), over the total step time. The first --warmup steps (worker start-up,
the first batches) are reported apart from the steady state, and so is the cache fill (seconds, images, bytes).

    python scripts/bench/gpu.py [--batch-size 256] [--steps 20] [--compile] [--models resnet50 timm/...] [--quick]
    python scripts/bench/gpu.py --real-data ../dogImages [--workers 16] [--decoded-cache auto|on|off] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import common
import torch
from imgclf import config, data, splits
from imgclf import models as imgclf_models
from imgclf.errors import DataError
from imgclf.training import job
from imgclf.training.distributed import SINGLE
from torch import nn
from torchvision import models

CLASSES = 133  # dogImages' breeds


def build(name: str, image_size: int, classes: int = CLASSES) -> nn.Module:
    """A torchvision model, or timm's for `timm/<name>` (the recipes' backbones), with `classes` classes."""
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/"), pretrained=False, num_classes=classes)
    kwargs = {"image_size": image_size} if name.startswith("vit") else {}
    return models.get_model(name, weights=None, num_classes=classes, **kwargs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(step, batch: int, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return round(batch * steps / (time.perf_counter() - started), 1)


def training_split(root: Path) -> splits.Split:
    """The training split the job reads from `root`: its train/ folder as the job finds it in a `training` channel
    (splits.find_split_dirs), or `root` itself as a `train` channel (one folder per class), scanned by the job's
    splits.validate_splits (not decoded: the benchmark reads every file anyway)."""
    try:
        train_dir = splits.find_split_dirs({"training": str(root)})["train"]
    except DataError:  # no valid/ beside it, or no splits at all: a `train` channel
        train_dir = root / "train" if (root / "train").is_dir() else root
    return splits.validate_splits({"train": train_dir}, check_decode=False)["train"]


def loader_hyperparameters(args) -> config.Hyperparameters:
    """The job's hyperparameters of its training DataLoader, validated as the job validates them (augment=auto:
    the job's choice for a run that trains the backbone, flip)."""
    return config.parse_hyperparameters({
        "pretrained": False, "augment": args.augment, "num-workers": args.workers,
        "prefetch-factor": args.prefetch_factor, "decoded-cache": args.decoded_cache,
        "decoded-cache-memory": args.decoded_cache_memory, "batch-size": args.batch_size,
        "image-size": args.image_size})


class RealData:
    """The training job's batches of one model's preprocessing, from the job's own wiring (job.run_batches: dataset,
    decoded cache plan, sampler, DataLoader and DeviceBatches, as a single-process job); `epochs` yields them epoch
    after epoch."""

    def __init__(self, hp: config.Hyperparameters, split: splits.Split, prep, device: torch.device,
                 memory_format: torch.memory_format):
        batches = job.run_batches(hp, {"train": split}, prep, device, SINGLE, hp.batch_size, per_host_shard=False,
                                  memory_format=memory_format)
        self.sampler, self.batches = batches.sampler, batches.train
        self.dataset = batches.train.dataset
        self.workers = job.LoaderSettings.from_hyperparameters(hp).workers()
        self.epoch = 0

    def fill_cache(self) -> dict:
        """The decode-once pass (DeviceBatches would run it on its first pass), timed on its own."""
        decoded = self.dataset.decoded
        if decoded is None:
            return {"on": False}
        started = time.perf_counter()
        decoded.fill()
        return {"on": True, "seconds": round(time.perf_counter() - started, 2),
                "images": int((decoded.shapes[:, 0] > 0).sum()), "of_images": len(decoded.paths),
                "bytes": decoded.nbytes, "threads": decoded.threads}

    def epochs(self):
        while True:
            self.sampler.set_epoch(self.epoch)  # as the job's epoch_batches does
            yield from self.batches
            self.epoch += 1


def real_data_training(model: nn.Module, train_step, real: RealData, warmup: int, steps: int,
                       device: torch.device) -> dict:
    """`steps` training steps on the job's batches after `warmup` (at least one: the workers' start-up). Per step,
    time blocked in next() (the DataLoader's batch, the copy to the device and Normalise; synchronized on a GPU)
    and the whole step (synchronized at its start)."""
    startup = max(1, warmup)
    stream = real.epochs()
    starts, waits, counts = [], [], []
    for _ in range(startup + steps):
        sync(device)
        began = time.perf_counter()
        images, labels = next(stream)
        labels = labels.to(device, non_blocking=True)
        sync(device)
        waits.append(time.perf_counter() - began)
        starts.append(began)
        counts.append(len(labels))
        train_step(images, labels)
    sync(device)
    starts.append(time.perf_counter())
    stream.close()
    seconds = starts[-1] - starts[startup]
    wait = sum(waits[startup:])
    images = sum(counts[startup:])
    return {
        "images_per_second": round(images / seconds, 1),
        "data_wait_share": round(wait / seconds, 4),
        "data_wait_seconds": round(wait, 3), "step_seconds": round(seconds, 3), "steps": steps, "images": images,
        "startup": {"steps": startup, "first_batch_seconds": round(waits[0], 3),
                    "seconds": round(starts[startup] - starts[0], 3),
                    "data_wait_share": round(sum(waits[:startup]) / (starts[startup] - starts[0]), 4)},
        "epochs_started": real.epoch + 1, "steps_per_epoch": len(real.batches),
    }


def bench(name: str, args, device: torch.device, compiled: bool, split: splits.Split | None = None,
          hp: config.Hyperparameters | None = None) -> dict:
    torch.manual_seed(0)
    classes = max(CLASSES, len(split.classes)) if split else CLASSES
    model = build(name, args.image_size, classes).to(device)
    fmt = torch.contiguous_format if "vit" in name else torch.channels_last  # CNNs: NHWC convolutions
    model = model.to(memory_format=fmt)
    if compiled:
        model.compile()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, classes, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    criterion = nn.CrossEntropyLoss()

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            model(x)

    model.train()
    train = images_per_second(lambda: train_step(x, y), args.batch_size, args.warmup, args.steps, device)
    model.eval()
    infer = images_per_second(infer_step, args.batch_size, args.warmup, args.steps, device)
    result: dict = {"train_images_per_second": train, "inference_images_per_second": infer}
    if split is not None and hp is not None:
        prep = imgclf_models.preprocessing(name, model, args.image_size)  # the job's, for this backbone
        real = RealData(hp, split, prep, device, fmt)
        cache = real.fill_cache()
        model.train()
        figures = real_data_training(model, train_step, real, args.warmup, args.steps, device)
        figures["ratio_to_synthetic"] = round(figures["images_per_second"] / train, 3)
        result["real_data"] = {**figures, "workers": real.workers, "decoded_cache": cache}
        del real
        gc.collect()  # the DataLoader's workers and the decoded buffer go before the next model's
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        torch.cuda.reset_peak_memory_stats()
    return result


def summary(key: str, result: dict) -> str:
    line = f"{key}: synthetic {result['train_images_per_second']:,.1f} img/s training"
    real = result.get("real_data")
    if real:
        cache = real["decoded_cache"]
        filled = (f"cache fill {cache['seconds']} s for {cache['images']} images, {cache['bytes'] / 1e6:,.1f} MB"
                  if cache["on"] else "decoded cache off")
        line += (f"; real data {real['images_per_second']:,.1f} img/s = {real['ratio_to_synthetic']:.2f}x synthetic,"
                 f" data wait {real['data_wait_share']:.1%} of step time, {real['workers']} workers"
                 f" (start-up: first batch {real['startup']['first_batch_seconds']} s; {filled})")
    return line


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd models")
    parser.add_argument("--budget", type=float, default=240, help="seconds; later measurements are skipped")
    parser.add_argument("--models", nargs="+",
                        help="torchvision names or timm/<name> (e.g. the recipes' backbones); default resnet50 "
                        "vit_b_16 (--quick --real-data: resnet18)")
    parser.add_argument("--quick", action="store_true", help="smoke test on CPU: tiny batch and images")
    real = parser.add_argument_group("real data (the training job's DataLoader; its hyperparameters' defaults)")
    real.add_argument("--real-data", type=Path, metavar="DIR",
                      help="ImageFolder dataset (train/ inside, or one folder per class): also train from its JPEGs")
    real.add_argument("--workers", type=int, default=config.default("num-workers"),
                      help="num-workers: DataLoader workers; -1 = the job's rule (CPUs - 1)")
    real.add_argument("--prefetch-factor", type=int, default=config.default("prefetch-factor"))
    real.add_argument("--decoded-cache", default=config.default("decoded-cache"), choices=("auto", "on", "off"))
    real.add_argument("--decoded-cache-memory", type=float, default=config.default("decoded-cache-memory"))
    real.add_argument("--augment", default="auto", help="the job's augment (auto: flip, as for full training)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.steps, args.warmup = 2, 32, 1, 1
        if args.real_data:  # a few steps of a small CNN, over more than one epoch of a small dataset
            args.batch_size, args.image_size, args.steps, args.warmup = 4, 64, 5, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for the GPU machine (use --quick for a CPU smoke test)")
    args.models = args.models or (["resnet18"] if args.quick and args.real_data else ["resnet50", "vit_b_16"])
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    split = training_split(args.real_data) if args.real_data else None
    hp = loader_hyperparameters(args) if args.real_data else None
    started, figures = time.monotonic(), {}
    for compiled in (False, True) if args.compile else (False,):
        for name in args.models:
            key = f"{name}{'_compiled' if compiled else ''}"
            if time.monotonic() - started > args.budget:
                figures[key] = "skipped: over --budget"
                continue
            figures[key] = bench(name, args, device, compiled, split, hp)
            print(summary(key, figures[key]), file=sys.stderr, flush=True)
    settings = {"device": str(device), "dtype": "bfloat16", "batch_size": args.batch_size,
                "image_size": args.image_size, "steps": args.steps, "warmup": args.warmup,
                "seconds": round(time.monotonic() - started, 1)}
    if split is not None and hp is not None:
        settings["real_data"] = {
            "dir": str(args.real_data), "train_dir": str(split.root), "images": len(split.samples),
            "classes": len(split.classes), "num_workers": hp.num_workers,
            "workers": job.LoaderSettings.from_hyperparameters(hp).workers(), "prefetch_factor": hp.prefetch_factor,
            "decoded_cache": hp.decoded_cache, "decoded_cache_memory": hp.decoded_cache_memory,
            "augment": hp.augment, "cpus": data.cpus(), "pin_memory": torch.cuda.is_available(),
            "data_wait": "time blocked in next() of data.DeviceBatches: the DataLoader's batch, its copy to the "
                         "device and Normalise there (torch.cuda.synchronize before and after on a GPU), and the "
                         "labels' copy; over the step's total time"}
    return common.emit("gpu", figures, settings=settings)


if __name__ == "__main__":
    main()
