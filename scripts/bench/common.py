"""Shared by the benchmarks: machine description, generated data, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "code"))  # run from a checkout without installing the package

import torch  # noqa: E402
from imgclf import sample_data  # noqa: E402


def machine() -> dict:
    """What the figures were measured on: they only compare within one run on one machine."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
        info["load_average_1m"] = os.getloadavg()[0]
    except (OSError, StopIteration):
        pass
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def dataset(root: Path, classes: int, train: int, valid: int, test: int = 1, size: int = 320) -> Path:
    """A generated ImageFolder dataset (JPEGs about size x size px, like dogImages' typical photo)."""
    return sample_data.generate(root, classes=classes, per_split={"train": train, "valid": valid, "test": test},
                                size=size)


def emit(name: str, figures: dict, **extra) -> dict:
    result = {"benchmark": name, "machine": machine(), **extra, "figures": figures,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(result, indent=2), flush=True)
    return result


def percentiles(values: list[float], points=(50, 95, 99)) -> dict[str, float]:
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] for p in points}


def add_training_args(parser, model: str, epochs: int, epochs_help: str | None = None) -> None:
    """The flags of the training benchmarks (head_cache, train_throughput)."""
    parser.add_argument("--model", default=model)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=64, help="training images (spread over --classes)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, images and sizes")


def training_hyperparameters(args, freeze: str, quick_epochs: int, **extra) -> dict:
    """Our hyperparameters for a training benchmark (--quick: a tiny model, images and sizes)."""
    if args.quick:
        args.model, args.image_size, args.images, args.batch_size, args.epochs = "resnet18", 32, 8, 4, quick_epochs
    return {"model": args.model, "pretrained": False, "freeze": freeze, "augment": False,
            "image-size": args.image_size, "batch-size": args.batch_size, "epochs": args.epochs,
            "lr-scheduler": "none", "debugging": False, **extra}


def train_ours(data_dir: Path, work: Path, hps: dict, weights: Path | None = None) -> dict:
    """imgclf.training.job.run, the training job's own loop, in this process; returns its metrics (history: seconds).
    `weights`: the weights channel (pretrained=true without a download)."""
    from imgclf import config
    from imgclf.training import job

    channels = {split: str(data_dir / split) for split in ("train", "valid", "test") if (data_dir / split).is_dir()}
    paths = job.Paths(work / "model", work / "output" / "data", work / "checkpoints",
                      {**channels, **({"weights": str(weights)} if weights else {})})
    for d in (paths.model, paths.output_data, paths.checkpoints):
        d.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # its metric lines: stdout stays the benchmark's JSON
        return job.run(config.parse_hyperparameters(hps), paths)


def model_dir(path: Path, arch: str, image_size: int, classes: int = 133) -> Path:
    """A model directory as training writes it (random weights: speed does not depend on them)."""
    from imgclf import artifacts, models, preprocessing

    torch.manual_seed(0)
    net, _ = models.build_model(arch, classes)
    names = [f"{i + 1:03d}.Breed_{i + 1}" for i in range(classes)]
    artifacts.save_model(path, net, {"architecture": arch, "class_names": names,
                                     **preprocessing.Preprocessing(image_size).to_config()})
    return path


def photo() -> bytes:
    """A real dog photo from ../shared/samples (this project's machines), else a generated JPEG of similar size."""
    shared = REPO.parent / "shared" / "samples" / "photos" / "dogs"
    samples = sorted(shared.rglob("*.jpg"))
    if samples:
        return samples[len(samples) // 2].read_bytes()
    print(f"note: {shared} does not exist: measuring with a generated photo instead", file=sys.stderr)
    import io

    buf = io.BytesIO()
    sample_data.draw(0, __import__("numpy").random.default_rng(0), 480).save(buf, "JPEG", quality=90)
    return buf.getvalue()
