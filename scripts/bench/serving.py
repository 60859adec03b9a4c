"""Benchmark (c): serving over HTTP, the real server (`python -m imgclf.local serve`: MMS + our handlers)
against a naive baseline server (scripts/bench/naive_server.py: single-threaded http.server, PIL, fp32, one
image at a time), same model directory, same photo, in one run. Also times the bare forward pass (benchmark
(d), with one server worker's torch threads) so that the serving overhead shows as a ratio.

Latency p50/p95/p99 at concurrency 1; throughput (requests/s) at concurrency 4.

    python scripts/bench/serving.py [--model resnet50] [--requests 40] [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import common
import requests
from imgclf.processes import free_port

BENCH = Path(__file__).resolve().parent


@contextmanager
def server(cmd: list[str], port: int, log: Path, timeout: float = 300):
    """Start a server process (own process group), wait for /ping 200, stop it (and its children) after."""
    env = {**os.environ, "PYTHONPATH": str(common.REPO / "code")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this benchmark started
            proc.wait()


def load(url: str, image: bytes, concurrency: int, count: int) -> dict:
    """`count` requests from `concurrency` clients; latency percentiles and requests per second."""
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
    client(1)  # warm-up (connection, first request)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = [t for ts in pool.map(client, share) for t in ts]
    wall = time.perf_counter() - started
    return {"requests": count, "latency_seconds": common.percentiles(latencies),
            "requests_per_second": round(count / wall, 3)}


def measure(url: str, image: bytes, requests_c1: int, requests_c4: int) -> dict:
    return {"concurrency_1": load(url, image, 1, requests_c1), "concurrency_4": load(url, image, 4, requests_c4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--requests", type=int, default=40, help="per load level")
    parser.add_argument("--workers", type=int, default=0, help="our server's workers (0: its default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, few requests")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.image_size, args.requests = "resnet18", 32, 4
    image = common.photo()
    cpus = os.cpu_count() or 1
    workers = args.workers or cpus  # the serve entrypoint's default: one worker per CPU
    with tempfile.TemporaryDirectory(prefix="bench_serving.") as tmp:
        model = common.model_dir(Path(tmp) / "model", args.model, args.image_size)
        ours_cmd = [sys.executable, "-m", "imgclf.local", "serve", "--model", str(model), "--port"]
        naive_cmd = [sys.executable, str(BENCH / "naive_server.py"), "--model", str(model), "--port"]
        # The bare forward pass in a child process: the same torch threads as one worker of our server.
        bare = subprocess.run([sys.executable, "-c", (
            f"import sys, json; sys.path.insert(0, {str(BENCH)!r}); import forward; "
            f"print(json.dumps(forward.measure(__import__('pathlib').Path({str(model)!r}), "
            f"{max(1, cpus // workers)}, {max(3, args.requests // 2)})))")],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(common.REPO / "code")})
        bare_fwd = __import__("json").loads(bare.stdout.strip().splitlines()[-1])
        results = {}
        for name, cmd in (("naive", naive_cmd), ("ours", ours_cmd)):
            port = free_port()
            with server(cmd + [str(port)] + (["--workers", str(workers)] if name == "ours" else []), port,
                        Path(tmp) / f"{name}.log") as url:
                results[name] = measure(url, image, args.requests, args.requests)
    ours, naive = results["ours"], results["naive"]
    p50 = ours["concurrency_1"]["latency_seconds"]["p50"]
    return common.emit("serving", {
        **results, "bare_forward": bare_fwd,
        "throughput_c4_vs_naive": round(ours["concurrency_4"]["requests_per_second"]
                                        / naive["concurrency_4"]["requests_per_second"], 3),
        "p50_c1_vs_bare_forward": round(p50 / bare_fwd["forward_seconds"]["p50"], 3),
        "p50_c1_vs_naive": round(p50 / naive["concurrency_1"]["latency_seconds"]["p50"], 3),
    }, settings={"model": args.model, "image_size": args.image_size, "our_workers": workers,
                 "photo_bytes": len(image), "requests_per_level": args.requests})


if __name__ == "__main__":
    main()
