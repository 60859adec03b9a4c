"""The whole pipeline on this machine, no AWS (`make demo`, scripts/demo.py): sample data -> train -> serve ->
predict -> stop.

Training runs the training image's real `train` entrypoint and serving the serving image's real `serve`
entrypoint, both in local mode (imgclf.local: host processes over a temporary /opt/ml tree); the predictions are
predict.py's (imgclf.aws.invocations) over the served /invocations. `run` returns 0 only when every step worked;
2 with an `error:` line when an option or the --data folder is bad (checked before anything runs or is written);
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
from imgclf.processes import MAX_PORT

STEPS = ("data", "train", "serve", "predict", "stop")
# The built-in sample data: a model learns it from scratch in about a minute on 2 CPU cores.
SAMPLE_HPS = {"model": "resnet18", "pretrained": "false", "freeze": "none", "augment": "false",
              "image-size": "64", "epochs": "5", "batch-size": "16", "lr": "0.001"}
PREDICT_TIMEOUT = 60.0  # seconds per request


class StepFailed(Exception):
    pass


def banner(number: int, text: str) -> None:
    print(f"\n==> [{number}/{len(STEPS)}] {text}", flush=True)


def check(output: Path, data: Path | None, model: str | None, weights: Path | None, hp: Sequence[str],
          port: int | None, images: int, startup_timeout: float) -> dict[str, str]:
    """The hyperparameters to train with, once every option is checked; UserError naming the bad one."""
    if images < 1:
        raise UserError(f"--images {images}: give 1 or more test images to send")
    if port is not None and not 0 < port <= MAX_PORT:
        raise UserError(f"--port {port}: multi-model-server takes ports 1-{MAX_PORT}")
    if not startup_timeout > 0:
        raise UserError(f"--startup-timeout {startup_timeout:g}: give the seconds to wait for the server, above 0")
    if weights is not None and not weights.exists():
        raise UserError(f"--weights {weights}: no such file or folder")
    if data is not None:
        splits.split_channels(data.expanduser())  # the layout (DataError); step 1 checks every image
    hps = hyperparameters(data, model, weights, hp)
    local.check_hyperparameters(hps)
    local.output_folder(output)
    return hps


def prepare_data(data: Path | None, output: Path) -> Path:
    """`data` once checked (a DataError, a UserError, names what is wrong), else the sample dataset (generated under
    `output` the first time)."""
    if data:
        root = data.expanduser()
        splits.validate_splits(splits.split_channels(root))
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
    return {**hps, **local.parse_hp(list(hp))}


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
    """Every step in turn; 0 when all worked, 2 for a bad option or --data folder (nothing run), else the number of
    the step that failed (130: interrupted)."""
    try:
        hps = check(output, data, model, weights, hp, port, images, startup_timeout)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = 1
    try:
        banner(step, "data")
        try:
            data_dir = prepare_data(data, output)
        except UserError as e:  # the user's --data: bad input, not a failed step
            print(f"error: {e}", file=sys.stderr)
            return 2
        step = 2
        banner(step, "train (the training image's `train` entrypoint, local mode)")
        train(data_dir, output, hps, weights)
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
