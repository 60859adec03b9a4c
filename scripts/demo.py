#!/usr/bin/env python
"""The whole pipeline on this machine, no AWS: sample data -> train -> serve -> predict.

    python scripts/demo.py                                   # generated sample "breeds", a couple of minutes
    python scripts/demo.py --data ~/dogImages --model resnet50 --weights ~/resnet50-0676ba61.pth

Training runs the training image's real `train` entrypoint and serving the serving image's real `serve`
entrypoint, both in local mode (host processes over a temporary /opt/ml tree). Exits 0 only when every
step worked; otherwise it names the step that failed and exits with that step's number (1-5).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "code"))

from imgclf import local, sample_data, splits  # noqa: E402
from imgclf.errors import DataError  # noqa: E402

STEPS = ("data", "train", "serve", "predict", "stop")
# The built-in sample data: a model learns it from scratch in about a minute on 2 CPU cores.
SAMPLE_HPS = {"model": "resnet18", "pretrained": "false", "freeze": "none", "augment": "false",
              "image-size": "64", "epochs": "5", "batch-size": "16", "lr": "0.001"}


class StepFailed(Exception):
    pass


def banner(number: int, text: str) -> None:
    print(f"\n==> [{number}/{len(STEPS)}] {text}", flush=True)


def prepare_data(args) -> Path:
    if args.data:
        root = args.data.expanduser()
        try:
            splits.validate_splits(splits.split_channels(root))
        except DataError as e:
            raise StepFailed(str(e)) from None
        return root
    root = args.output / "data"
    if not (root / "train").is_dir():
        sample_data.generate(root, classes=5)
    print(f"sample dataset: {root} (5 procedurally drawn breeds, train/valid/test)")
    return root


def hyperparameters(args) -> dict[str, str]:
    if not args.data and not args.model and not args.weights:
        hps = dict(SAMPLE_HPS)
    else:  # your data: fine-tune a pretrained backbone's new head, as the reference project did
        hps = {"model": args.model or "vgg16", "pretrained": "true" if args.weights else "false",
               "freeze": "head" if args.weights else "none", "epochs": "5"}
    for pair in args.hp:
        key, _, value = pair.partition("=")
        hps[key] = value
    return hps


def train(args, data_dir: Path) -> dict:
    hps = hyperparameters(args)
    print("hyperparameters: " + " ".join(f"{k}={v}" for k, v in hps.items()), flush=True)
    code = local.train(data_dir, args.output / "train", hps, args.weights)
    if code != 0:
        failure = args.output / "train" / "failure"
        reason = failure.read_text().strip() if failure.exists() else f"train exited with {code}"
        raise StepFailed(reason)
    reports = args.output / "train" / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    print(f"\nbest epoch {metrics['best_epoch']}: valid accuracy {metrics['valid_accuracy']:.3f}"
          + (f", test accuracy {metrics['test_accuracy']:.3f}" if "test_accuracy" in metrics else ""))
    print(f"model:   {args.output / 'train' / 'model.tar.gz'}")
    print(f"reports: {reports}: " + ", ".join(sorted(p.name for p in reports.iterdir())))
    return metrics


def predict(url: str, data_dir: Path, count: int) -> None:
    split = "test" if (data_dir / "test").is_dir() else "valid"
    images = splits.image_files(data_dir / split)
    picks = random.Random(0).sample(images, min(count, len(images)))
    print(f"sending {len(picks)} images from {data_dir / split} (their folder is the true breed)", flush=True)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), *map(str, picks),
                             "--url", url, "--top-k", "3"], text=True)
    if result.returncode != 0:
        raise StepFailed(f"scripts/predict.py exited with {result.returncode}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="your ImageFolder dataset (train/, valid/, test/)")
    parser.add_argument("--model", help="torchvision model name (default: resnet18 on sample data, else vgg16)")
    parser.add_argument("--weights", type=Path, help="pretrained weights file for --model (torchvision state_dict)")
    parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="extra hyperparameter")
    parser.add_argument("--output", type=Path, default=REPO / "demo-output", help="where everything goes")
    parser.add_argument("--port", type=int, help="server port (default: a free one)")
    parser.add_argument("--images", type=int, default=3, help="test images to send to the server")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    step = 0
    try:
        step = 1
        banner(step, "data")
        data_dir = prepare_data(args)
        step = 2
        banner(step, "train (the training image's `train` entrypoint, local mode)")
        train(args, data_dir)
        step = 3
        banner(step, "serve (the serving image's `serve` entrypoint, local mode)")
        log = args.output / "serve.log"
        with local.serving(args.output / "train" / "model.tar.gz", args.port, workers=None, log=log,
                           timeout=args.startup_timeout) as server:
            print(f"server ready at {server.url} (log: {log})")
            step = 4
            banner(step, f"predict: {args.images} test images -> top-3 breeds")
            predict(server.url, data_dir, args.images)
            step = 5
            banner(step, "stop the server")
            if leftovers := server.stop():
                raise StepFailed(f"server processes ignored SIGTERM and were killed: {leftovers}")
    except (StepFailed, local.ServerFailed) as e:
        print(f"\ndemo failed at step {step}/{len(STEPS)} ({STEPS[step - 1]}): {e}", file=sys.stderr)
        return step
    except KeyboardInterrupt:
        print(f"\ndemo interrupted at step {step} ({STEPS[step - 1]})", file=sys.stderr)
        return 130
    print(f"\ndemo finished: every step worked. Everything is under {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
