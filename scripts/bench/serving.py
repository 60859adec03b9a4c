"""Benchmark (c): serving over HTTP, in one run, per model (ResNet50 and VGG16, 224 px):

- naive: scripts/bench/naive_server.py (single-threaded http.server, PIL, eager fp32 torch, one image at a time)
- ours_torch: the real server (`python -m imgclf.local serve`: MMS + our handlers) on a model without model.onnx
- ours_torch_bfloat16: the same with IMGCLF_SERVE_DTYPE=bfloat16 (PyTorch's autocast; no accuracy check)
- ours_onnx_float32: the same server on the exported graph (ONNX Runtime, exact fp32: the default)
- ours_onnx_int8: the same graph quantized (IMGCLF_SERVE_DTYPE=int8), if the export's accuracy check accepted it
- the workers x threads rule's alternatives: N workers x 1 thread, 1 worker x N threads (N = CPUs)
  (the default: one worker per CPU, each with up to 4 threads that sleep when idle: imgclf.serving.runtime)
- ours_onnx_float32_batch_4: the default server with batching across requests (IMGCLF_BATCH_SIZE=4, 10 ms delay;
  the default on a GPU is 16, off on the CPU)
- --servers names a subset (say `--servers ours_onnx_float32 ours_onnx_float32_batch_4 --concurrency 1 16` for the
  GPU question of docs/performance.md, run in the serve-gpu image's environment)

The models: --trained ones (default resnet50) are trained by the training job itself (all layers, from random
weights: no pretrained weights here) on generated images of 8 classes until they classify them, so the int8
check judges a model with real margins; the others keep random weights (speed does not depend on them, but on
near-uniform outputs the int8 check rightly refuses the quantized graph). 8 classes, not 133: the classifier's
size changes the FLOPs by under 0.1%.

Latency p50/p95/p99 and throughput (requests/s) at each --concurrency level (1 and 4); all servers run at once and
are measured in --rounds interleaved turns (this machine's speed drifts by tens of percent). FLOP/s: the forward pass's
FLOPs per image (torch.utils.flop_counter: 2 per multiply-add of convolutions and matrix products) times the
requests per second at the highest concurrency, as a share of the CPU's fp32 peak: cores x clock x 64 (AVX-512: two FMA
units x 16 fp32 lanes x 2 operations), the clock from /proc/cpuinfo. The export's own figures (time, parity,
int8 agreement on the generated validation images) are in `export`, the training's in `training`.

    python scripts/bench/serving.py [--models resnet50 vgg16] [--trained resnet50] [--requests 40] [--quick]
                                    [--concurrency 1 4] [--servers NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import common
import requests
import torch
from imgclf import local
from imgclf.processes import free_port

BENCH = Path(__file__).resolve().parent
CLASSES = 8
FP32_FLOPS_PER_CYCLE = 64  # AVX-512: 2 FMA units x 16 fp32 lanes x 2 (multiply + add)


def load(url: str, image: bytes, concurrency: int, count: int) -> tuple[list[float], float]:
    """`count` requests from `concurrency` clients: (each request's latency, wall seconds for all)."""
    def client(n: int) -> list[float]:
        times = []
        with requests.Session() as s:
            for _ in range(n):
                t = time.perf_counter()
                r = s.post(f"{url}/invocations", data=image, headers={"Content-Type": "image/jpeg",
                                                                      "Accept": "application/json"}, timeout=300)
                r.raise_for_status()
                times.append(time.perf_counter() - t)
        return times

    share = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [t for ts in pool.map(client, share) for t in ts]
    return latencies, time.perf_counter() - started


def measure(urls: dict[str, str], image: bytes, count: int, rounds: int, levels: list[int]) -> dict:
    """Every server at each concurrency of `levels`, `count` requests per level in all, in `rounds` interleaved
    rounds (A B C A B C ...): a slow spell of a shared machine then hits every server, not one."""
    samples = {name: {c: ([], 0.0) for c in levels} for name in urls}
    for url in urls.values():  # warm-up: every worker has answered once
        load(url, image, 4, 4)
    for r in range(rounds):
        for name, url in urls.items():
            for c in levels:
                latencies, wall = load(url, image, c, count // rounds + (r < count % rounds))
                done, seconds = samples[name][c]
                samples[name][c] = (done + latencies, seconds + wall)
    return {name: {f"concurrency_{c}": {"requests": len(lat), "latency_seconds": common.percentiles(lat),
                                        "requests_per_second": round(len(lat) / wall, 3)}
                   for c, (lat, wall) in levels.items()} for name, levels in samples.items()}


def flops_per_image(arch: str, image_size: int) -> int:
    from imgclf import models
    from torch.utils.flop_counter import FlopCounterMode

    net, _ = models.build_model(arch, 133)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net.eval()(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


def peak_fp32_flops() -> tuple[float, str]:
    """cores x clock x 64 fp32 operations per cycle (AVX-512 with two FMA units); the clock from /proc/cpuinfo."""
    cpus = os.cpu_count() or 1
    try:
        mhz = max(float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        mhz = 2800.0
    return cpus * mhz * 1e6 * FP32_FLOPS_PER_CYCLE, f"{cpus} cores x {mhz:.0f} MHz x {FP32_FLOPS_PER_CYCLE}"


def prepare(root: Path, arch: str, args, data: Path, train: bool) -> tuple[Path, Path, dict, dict | None]:
    """Two model directories of the same weights: torch only, and exported (model.onnx + int8)."""
    from imgclf import export

    training = None
    if train:
        started = time.monotonic()
        metrics = common.train_ours(data, root / "job", {
            "model": arch, "pretrained": False, "freeze": "none", "augment": False, "image-size": args.image_size,
            "batch-size": 16, "epochs": args.train_epochs, "lr": 0.001, "lr-scheduler": "none", "debugging": False})
        exported = root / "job" / "model"
        training = {"seconds": round(time.monotonic() - started, 1), "epochs": args.train_epochs,
                    **{k: metrics[k] for k in ("best_epoch", "valid_accuracy", "test_accuracy") if k in metrics}}
    else:
        exported = common.model_dir(root / "exported", arch, args.image_size, classes=CLASSES)
    for f in exported.glob("*.onnx"):
        f.unlink()  # the training job's own export: measured below
    torch_only = root / "torch_only"
    torch_only.mkdir()
    (torch_only / "model.safetensors").symlink_to(exported / "model.safetensors")
    config = json.loads((exported / "config.json").read_text())
    config.pop("onnx", None)
    (torch_only / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    entry = export.export(exported, sorted((data / "valid").rglob("*.jpg")), int8=True)
    return torch_only, exported, {"seconds": round(time.monotonic() - started, 1), **entry}, training


def bench_model(arch: str, args, tmp: Path, data: Path, image: bytes) -> dict:
    root = tmp / arch
    root.mkdir()
    torch_only, exported, export_figures, training = prepare(root, arch, args, data, arch in args.trained)
    cpus = os.cpu_count() or 1
    ours = [sys.executable, "-m", "imgclf.local", "serve", "--model"]
    runs = {"naive": ([sys.executable, str(BENCH / "naive_server.py"), "--model", str(torch_only), "--port"], {}),
            "ours_torch": ([*ours, str(torch_only), "--port"], {}),
            "ours_onnx_float32": ([*ours, str(exported), "--port"], {})}
    if not args.quick:  # the smoke run starts one server per runtime (each a Java model server: seconds of CPU)
        runs["ours_torch_bfloat16"] = ([*ours, str(torch_only), "--port"], {"IMGCLF_SERVE_DTYPE": "bfloat16"})
        if export_figures["int8"]["accepted"]:
            runs["ours_onnx_int8"] = ([*ours, str(exported), "--port"], {"IMGCLF_SERVE_DTYPE": "int8"})
    if cpus > 1 and not args.quick:  # the workers x threads rule's alternatives (the default: imgclf.serving.runtime)
        runs[f"ours_onnx_float32_{cpus}_workers_x_1_thread"] = ([*ours, str(exported), "--port"],
                                                                {"IMGCLF_TORCH_THREADS": "1"})
        runs[f"ours_onnx_float32_1_worker_x_{cpus}_threads"] = ([*ours, str(exported), "--workers", "1", "--port"],
                                                                 {})
    if not args.quick:
        runs["ours_onnx_float32_batch_4"] = ([*ours, str(exported), "--port"], {"IMGCLF_BATCH_SIZE": "4",
                                                                                "IMGCLF_MAX_BATCH_DELAY_MS": "10"})
    if args.servers:
        unknown = set(args.servers) - set(runs)
        if unknown:
            raise SystemExit(f"--servers: no server {', '.join(sorted(unknown))}; these run here: {', '.join(runs)}")
        runs = {name: run for name, run in runs.items() if name in args.servers}
    with ExitStack() as stack:  # all servers up at once (idle ones cost no CPU), measured in turns
        urls = {}
        for name, (cmd, env) in runs.items():
            port = free_port()
            urls[name] = stack.enter_context(local.server_process(
                cmd + [str(port)], f"http://127.0.0.1:{port}", root / f"{name}.log", env, timeout=300)).url
        results = measure(urls, image, args.requests, args.rounds, args.concurrency)
    for name, r in results.items():
        print(f"{arch} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
    flops = flops_per_image(arch, args.image_size)
    peak, how = peak_fp32_flops()
    top, low = f"concurrency_{max(args.concurrency)}", f"concurrency_{min(args.concurrency)}"
    naive = results.get("naive")
    for r in results.values():
        rps = r[top]["requests_per_second"]
        if naive:
            r[f"throughput_c{max(args.concurrency)}_vs_naive"] = round(rps / naive[top]["requests_per_second"], 3)
            r[f"p50_c{min(args.concurrency)}_vs_naive"] = round(r[low]["latency_seconds"]["p50"]
                                                                / naive[low]["latency_seconds"]["p50"], 3)
        r[f"gflops_per_second_c{max(args.concurrency)}"] = round(flops * rps / 1e9, 1)
        r[f"share_of_fp32_peak_c{max(args.concurrency)}"] = round(flops * rps / peak, 3)
    return {**results, "export": export_figures, **({"training": training} if training else {}),
            "gflops_per_image": round(flops / 1e9, 3),
            "fp32_peak_gflops": round(peak / 1e9, 1), "fp32_peak_estimate": how}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg16"])
    parser.add_argument("--trained", nargs="*", default=["resnet50"],
                        help="models trained on the generated images first (the others: random weights)")
    parser.add_argument("--train-epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=40, help="per server and load level")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the requests are split into")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, few requests")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="clients at once, per level")
    parser.add_argument("--servers", nargs="+", help="only these servers (names as in the output)")
    args = parser.parse_args(argv)
    train, valid = 16, 5  # per class: 128 training and 40 validation images
    if args.quick:
        args.models, args.trained, args.image_size, args.requests, args.train_epochs, args.rounds = (
            ["resnet18"], ["resnet18"], 32, 4, 2, 2)
        train, valid = 2, 1
    image = common.photo()
    with tempfile.TemporaryDirectory(prefix="bench_serving.") as tmp:
        data = common.dataset(Path(tmp) / "data", classes=CLASSES, train=train, valid=valid)
        figures = {arch: bench_model(arch, args, Path(tmp), data, image) for arch in args.models}
    return common.emit("serving", figures, settings={
        "image_size": args.image_size, "photo_bytes": len(image), "requests_per_level": args.requests,
        "rounds": args.rounds, "concurrency": args.concurrency,
        "classes": CLASSES, "images_per_class": {"train": train, "valid": valid},
        "default_workers": "serve's default (imgclf.serving.runtime.onnx_threads)",
        "weights": f"trained by the training job: {args.trained or 'none'}; random: the others"})


if __name__ == "__main__":
    main()
