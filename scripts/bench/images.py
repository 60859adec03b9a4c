#!/usr/bin/env python
"""The images, measured (make bench-images, after make build): sizes, serving cold start, and training speed
in the container against local mode (the same job, the same machine, one run).

    python scripts/bench/images.py [--engine docker] [--prefix imgclf] [--tag latest]

Cold start: `docker run -d` -> first healthy /ping -> first prediction answered, median of 3 starts.
Training: a ResNet18 at 96 px on generated data, run by `python -m imgclf.local train` on the host and by
`docker run -d IMAGE train` over a mounted tree; the ratio is of the mean epoch time (after the first epoch).
Containers run detached: podman's API service spins a core while a client is attached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import requests
from imgclf import local
from imgclf.processes import free_port

HPS = {"model": "resnet18", "pretrained": "false", "freeze": "none", "augment": "false", "image-size": "96",
       "epochs": "3", "batch-size": "16", "num-workers": "0", "debugging": "false"}


def run(*cmd: str, timeout: float = 1800) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


def epoch_seconds(metrics: Path) -> float:
    history = json.loads(metrics.read_text())["history"]
    return statistics.mean(h["seconds"] for h in history[1:])


def train_both(engine: list[str], image: str, data: Path, work: Path) -> dict:
    hp_args = [f"--hp={k}={v}" for k, v in HPS.items()]
    host = work / "host"
    run(sys.executable, "-m", "imgclf.local", "train", "--data", str(data), "--output", str(host), *hp_args)
    tree = work / "tree"
    run(sys.executable, str(common.REPO / "containers/local_tree.py"), str(tree), "--data", str(data), *hp_args)
    name = f"imgclf-bench-{int(time.time())}"
    run(*engine, "run", "-d", "--name", name, "--shm-size", "1g", "-v", f"{tree}:/opt/ml", image, "train")
    try:
        while run(*engine, "inspect", "--format", "{{.State.Running}}", name).strip() == "true":
            time.sleep(1)  # polled: under podman a held-open `wait` makes the API service spin a core
        status = int(run(*engine, "inspect", "--format", "{{.State.ExitCode}}", name).strip())
        if status:
            raise SystemExit(f"training in {image} failed:\n{run(*engine, 'logs', name)[-3000:]}")
    finally:
        subprocess.run([*engine, "rm", "-f", name], capture_output=True)
    local_s = epoch_seconds(host / "reports" / "metrics.json")
    container_s = epoch_seconds(tree / "output" / "data" / "metrics.json")
    return {"local_mode_epoch_seconds": round(local_s, 3), "container_epoch_seconds": round(container_s, 3),
            "container_vs_local_mode": round(container_s / local_s, 3), "model_dir": str(tree / "model")}


def cold_start(engine: list[str], image: str, model_dir: Path, photo: bytes, starts: int) -> dict:
    pings, firsts = [], []
    for n in range(starts):
        port = free_port()
        name = f"imgclf-bench-serve-{n}-{int(time.time())}"
        started = time.monotonic()
        run(*engine, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080", "-v",
            f"{model_dir}:/opt/ml/model:ro", image, "serve")
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                local.wait_healthy(f"{url}/ping", 300, interval=0.1)
            except local.ServerFailed as e:
                raise SystemExit(f"{image}: {e}") from None
            pings.append(time.monotonic() - started)
            response = requests.post(f"{url}/invocations", data=photo, headers={"Content-Type": "image/jpeg"},
                                     timeout=120)
            response.raise_for_status()
            firsts.append(time.monotonic() - started)
        finally:
            subprocess.run([*engine, "rm", "-f", name], capture_output=True)
    return {"run_to_healthy_ping_seconds": round(statistics.median(pings), 2),
            "run_to_first_prediction_seconds": round(statistics.median(firsts), 2), "starts": starts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="docker")
    parser.add_argument("--prefix", default="imgclf")
    parser.add_argument("--tag", default="latest")
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    engine = args.engine.split()
    images = {name: f"{args.prefix}-{name}:{args.tag}" for name in ("train-cpu", "train-gpu", "serve")}
    sizes = {name: round(json.loads(run(*engine, "image", "inspect", img))[0]["Size"] / 1e9, 2)
             for name, img in images.items()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = common.dataset(work / "data", classes=5, train=40, valid=10, test=5, size=160)
        training = train_both(engine, images["train-cpu"], data, work)
        serving = cold_start(engine, images["serve"], Path(training.pop("model_dir")), common.photo(), args.starts)
    common.emit("images", {"image_size_gb": sizes, "training": training, "serving_cold_start": serving})


if __name__ == "__main__":
    main()
