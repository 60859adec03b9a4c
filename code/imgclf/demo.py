"""The whole pipeline on this machine, no AWS (`make demo`, scripts/demo.py): sample data -> train -> serve ->
predict -> stop.

Training runs the training image's real `train` entrypoint and serving the serving image's real `serve`
entrypoint, both in local mode (imgclf.local: host processes over a temporary /opt/ml tree); the predictions are
predict.py's (imgclf.aws.invocations) over the served /invocations. `run` returns 0 only when every step worked;
otherwise it names the step that failed and returns that step's number (1-5).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from imgclf import local, sample_data, splits
from imgclf.aws import invocations
from imgclf.errors import UserError

STEPS = ("data", "train", "serve", "predict", "stop")
# The built-in sample data: a model learns it from scratch in about a minute on 2 CPU cores.
SAMPLE_HPS = {"model": "resnet18", "pretrained": "false", "freeze": "none", "augment": "false",
              "image-size": "64", "epochs": "5", "batch-size": "16", "lr": "0.001"}
PREDICT_TIMEOUT = 60.0  # seconds per request


class StepFailed(Exception):
    pass


def banner(number: int, text: str) -> None:
    print(f"\n==> [{number}/{len(STEPS)}] {text}", flush=True)


def prepare_data(data: Path | None, output: Path) -> Path:
    """`data` once checked, else the sample dataset (generated under `output` the first time)."""
    if data:
        root = data.expanduser()
        splits.validate_splits(splits.split_channels(root))  # a DataError (UserError) fails the step with its reason
        return root
    root = output / "data"
    if not (root / "train").is_dir():
        sample_data.generate(root, classes=5)
    print(f"sample dataset: {root} (5 procedurally drawn breeds, train/valid/test)")
    return root


def hyperparameters(data: Path | None, model: str | None, weights: Path | None, hp: Sequence[str]) -> dict[str, str]:
    if not data and not model and not weights:
        hps = dict(SAMPLE_HPS)
    else:  # your data: fine-tune a pretrained backbone's new head, as the reference project did
        hps = {"model": model or "vgg16", "pretrained": "true" if weights else "false", "epochs": "5"}  # freeze: auto
    for pair in hp:
        key, _, value = pair.partition("=")
        hps[key] = value
    return hps


def train(data_dir: Path, output: Path, hps: dict[str, str], weights: Path | None) -> dict:
    print("hyperparameters: " + " ".join(f"{k}={v}" for k, v in hps.items()), flush=True)
    code = local.train(data_dir, output / "train", hps, weights)
    if code != 0:
        failure = output / "train" / "failure"
        reason = failure.read_text().strip() if failure.exists() else f"train exited with {code}"
        raise StepFailed(reason)
    reports = output / "train" / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    print(f"\nbest epoch {metrics['best_epoch']}: valid accuracy {metrics['valid_accuracy']:.3f}"
          + (f", test accuracy {metrics['test_accuracy']:.3f}" if "test_accuracy" in metrics else ""))
    print(f"model:   {output / 'train' / 'model.tar.gz'}")
    print(f"reports: {reports}: " + ", ".join(sorted(p.name for p in reports.iterdir())))
    return metrics


def predict(url: str, data_dir: Path, count: int) -> None:
    split = "test" if (data_dir / "test").is_dir() else "valid"
    images = splits.image_files(data_dir / split)
    picks = random.Random(0).sample(images, min(count, len(images)))
    print(f"sending {len(picks)} images from {data_dir / split} (their folder is the true breed)", flush=True)
    code = invocations.predict(picks, partial(invocations.via_url, url, PREDICT_TIMEOUT), top_k=3)
    if code != 0:
        raise StepFailed(f"the predictions failed (predict.py's exit status {code})")


def run(*, output: Path, data: Path | None = None, model: str | None = None, weights: Path | None = None,
        hp: Sequence[str] = (), port: int | None = None, images: int = 3, startup_timeout: float = 180.0) -> int:
    """Every step in turn; 0 when all worked, else the number of the step that failed (130: interrupted)."""
    output.mkdir(parents=True, exist_ok=True)
    step = 0
    try:
        step = 1
        banner(step, "data")
        data_dir = prepare_data(data, output)
        step = 2
        banner(step, "train (the training image's `train` entrypoint, local mode)")
        train(data_dir, output, hyperparameters(data, model, weights, hp), weights)
        step = 3
        banner(step, "serve (the serving image's `serve` entrypoint, local mode)")
        log = output / "serve.log"
        with local.serving(output / "train" / "model.tar.gz", port, workers=None, log=log,
                           timeout=startup_timeout) as server:
            print(f"server ready at {server.url} (log: {log})")
            step = 4
            banner(step, f"predict: {images} test images -> top-3 breeds")
            predict(server.url, data_dir, images)
            step = 5
            banner(step, "stop the server")
            if leftovers := server.stop():
                raise StepFailed(f"server processes ignored SIGTERM and were killed: {leftovers}")
    except (StepFailed, local.ServerFailed, UserError) as e:
        print(f"\ndemo failed at step {step}/{len(STEPS)} ({STEPS[step - 1]}): {e}", file=sys.stderr)
        return step
    except KeyboardInterrupt:
        print(f"\ndemo interrupted at step {step} ({STEPS[step - 1]})", file=sys.stderr)
        return 130
    print(f"\ndemo finished: every step worked. Everything is under {output}")
    return 0
