"""Overhead of debugging (tensor collection, rules, system monitor, profiler capture) on training epochs.

Trains the same model on the same generated data with the defaults (debugging=true) and with debugging=false,
alternating the two (off, on, off, on, ...) in this process, and compares the time of each epoch (training
+ validation pass). Both wall-clock and process CPU time are measured: on a shared machine CPU time is
the steadier figure. One intra-op thread and in-process data loading (num-workers=0) keep all the work in
this process, so that its CPU time is the whole cost. Epoch 1 holds the fixed costs (the profiler capture
of 10 steps, the layer statistics of step 0, starting the monitor); later epochs show the steady state.
Last, the Debugger's own cost per training step is measured on a trivial model, where nothing hides it.

    python scripts/bench/collection_overhead.py [--repeats 2] [--epochs 3] [--image-size 64] [--quick]

--quick is the smoke test of `make test`: one run per setting, 2 epochs of a few 32 px images, fewer Debugger steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import dataset, emit, train_ours
from imgclf.training import job, sampling


def instrument(marks: list[tuple[str, float, float]]) -> None:
    """Record (event, CPU seconds, wall seconds) at each epoch's start (set_epoch) and end (its metrics line)."""
    set_epoch, epoch_line = sampling.EpochSampler.set_epoch, job.epoch_line

    def timed_set_epoch(self, epoch, skip=0):
        marks.append(("start", time.process_time(), time.perf_counter()))
        return set_epoch(self, epoch, skip)

    def timed_epoch_line(record):
        marks.append(("end", time.process_time(), time.perf_counter()))
        return epoch_line(record)

    sampling.EpochSampler.set_epoch, job.epoch_line = timed_set_epoch, timed_epoch_line


def per_step_cost(steps: int = 3000) -> dict[str, float]:
    """Microseconds the Debugger adds to one training step (a trivial model, so that nothing hides it)."""
    from imgclf import config
    from imgclf.debugging.debugger import Debugger, DebugSettings
    from torch import nn

    result = {}
    for debugging in (False, True):
        settings = DebugSettings.from_hyperparameters(
            config.parse_hyperparameters({"debugging": debugging, "profiler-steps": 0}))
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
        with tempfile.TemporaryDirectory() as tmp, Debugger(settings, Path(tmp), torch.device("cpu")) as dbg:
            dbg.attach(model, optimizer)
            dbg.epoch_begin(0)
            started = time.process_time()
            for _ in range(steps):
                dbg.step_begin()
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                dbg.mark("forward")
                loss.backward()
                dbg.mark("backward")
                optimizer.step()
                dbg.mark("optimizer")
                dbg.step_end(loss.detach())  # as the training loop: read back only at collection steps
            result["on" if debugging else "off"] = 1e6 * (time.process_time() - started) / steps
    return {"step_cpu_us_off": round(result["off"], 1), "step_cpu_us_on": round(result["on"], 1),
            "debugger_cpu_us_per_step": round(result["on"] - result["off"], 1)}


def overhead(on: list[float], off: list[float]) -> float:
    return round(100 * (statistics.fmean(on) / statistics.fmean(off) - 1), 2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting, alternated")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-per-class", type=int, default=64, help="5 classes; batches of 16")
    parser.add_argument("--quick", action="store_true", help="smoke test: one run each, tiny images, 2 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.epochs, args.image_size, args.train_per_class = 1, 2, 32, 4
    valid_per_class = 2 if args.quick else 16
    torch.set_num_threads(1)
    hps = {"model": args.model, "pretrained": False, "freeze": "none", "augment": True, "epochs": args.epochs,
           "image-size": args.image_size, "batch-size": 16, "lr": 0.001, "num-workers": 0}
    marks: list[tuple[str, float, float]] = []
    instrument(marks)
    # per setting: [(epoch number, cpu seconds, wall seconds)]
    epochs: dict[str, list[tuple[int, float, float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="bench-overhead.") as tmp:
        data = dataset(Path(tmp) / "data", classes=5, train=args.train_per_class, valid=valid_per_class, size=96)
        for i in range(args.repeats):
            for setting in ("off", "on"):
                marks.clear()
                work = Path(tmp) / f"{setting}{i}"
                train_ours(data, work, {**hps, "debugging": setting == "on"})
                starts, ends = [m for m in marks if m[0] == "start"], [m for m in marks if m[0] == "end"]
                epochs[setting] += [(n + 1, e[1] - s[1], e[2] - s[2]) for n, (s, e) in enumerate(zip(starts, ends))]
                if setting == "on":
                    assert (work / "output" / "data" / "profiler-report.html").is_file()

    def pick(setting: str, column: int, first: bool | None = None) -> list[float]:
        return [e[column] for e in epochs[setting] if first is None or (e[0] == 1) == first]

    figures = {}
    for label, first in (("all_epochs", None), ("epoch_1", True), ("later_epochs", False)):
        figures[label] = {
            "cpu_seconds_off": statistics.fmean(pick("off", 1, first)),
            "cpu_seconds_on": statistics.fmean(pick("on", 1, first)),
            "cpu_overhead_percent": overhead(pick("on", 1, first), pick("off", 1, first)),
            "wall_seconds_off": statistics.fmean(pick("off", 2, first)),
            "wall_seconds_on": statistics.fmean(pick("on", 2, first)),
            "wall_overhead_percent": overhead(pick("on", 2, first), pick("off", 2, first)),
        }
    figures["per_step"] = per_step_cost(steps=100 if args.quick else 3000)
    figures["epochs"] = {k: [[n, round(c, 3), round(w, 3)] for n, c, w in v] for k, v in epochs.items()}
    return emit("collection_overhead", figures, setup={
        **hps, "train_images": 5 * args.train_per_class, "steps_per_epoch": -(-5 * args.train_per_class // 16),
        "valid_images": 5 * valid_per_class, "repeats": args.repeats, "torch_threads": 1, "quick": args.quick,
        "defaults": "collect-train-interval=10, collect-eval-interval=1, collect-stats-interval=100, "
                    "monitor-interval-ms=500, profiler-steps=10 from step 5, rules=all"})


if __name__ == "__main__":
    main()
