"""The benchmarks run (--quick: tiny models and sizes) and print their JSON; their speed is not tested here.

Which ones: every scripts/bench/*.py that is not a helper module (the Makefile's BENCH_HELPERS, the same list
that `make bench` leaves out), so a new benchmark is smoke-tested without being added here; and gpu.py, a helper
to `make bench` only because it wants a GPU, whose --quick runs on the CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py

BENCH = REPO / "scripts" / "bench"
# Benchmarks that `make bench` leaves out but whose --quick runs anywhere.
QUICK_HELPERS = {"gpu.py"}
# The figures each benchmark must report (a benchmark not named here must report some figures).
EXPECTED = {
    "train_throughput.py": ("reference_images_per_second", "ours_images_per_second", "speedup"),
    "head_cache.py": ("reference_epoch_seconds", "cached_later_epoch_seconds", "speedup_vs_reference"),
    "forward.py": ("forward_seconds", "decode_transform_seconds"),
    "serving.py": ("resnet18",),
    "gpu.py": ("resnet50", "vit_b_16"),
    "decode.py": ("pil_draft_ms_per_image", "torchvision_io_ms_per_image"),
    "prepare.py": ("one_thread_ms_per_batch", "worker_threads_ms_per_batch", "speedup"),
    "collection_overhead.py": ("all_epochs", "later_epochs", "per_step"),
    "dataloader.py": ("old_cpu_ms_per_image", "decoded_cpu_ms_per_image", "speedup_per_worker", "bitwise_equal",
                      "loader_images_per_second_by_workers"),
}


def bench_helpers() -> set[str]:
    """The Makefile's BENCH_HELPERS: modules of scripts/bench that are not benchmarks of `make bench`."""
    found = re.search(r"^BENCH_HELPERS\s*:?=(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert found, "the Makefile defines no BENCH_HELPERS"
    return {f"{name}.py" for name in found.group(1).split()}


def benchmarks() -> list[str]:
    return sorted({p.name for p in BENCH.glob("*.py")} - bench_helpers() | QUICK_HELPERS)


def last_json(stdout: str) -> dict:
    """The JSON document the benchmark prints last (training prints metric lines before it)."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{\n")
    return json.loads(stdout[start:])


def test_the_smoke_list_is_every_benchmark_present():
    helpers = bench_helpers()
    assert {"common.py", "reference.py"} <= helpers, helpers
    assert helpers <= {p.name for p in BENCH.glob("*.py")}, "BENCH_HELPERS names a module that does not exist"
    assert set(EXPECTED) <= set(benchmarks()), f"figures expected of no benchmark: {set(EXPECTED) - set(benchmarks())}"
    assert {"collection_overhead.py", "serving.py", "decode.py"} <= set(benchmarks())


@pytest.mark.parametrize("script", benchmarks())
def test_benchmark_runs_and_prints_its_figures(script):
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = last_json(result.stdout)
    assert report["benchmark"] == script.removesuffix(".py")
    assert {"cpu_count", "torch"} <= set(report["machine"])
    assert report["figures"], f"{script} --quick reports no figures"
    assert set(EXPECTED.get(script, ())) <= set(report["figures"]), report["figures"]
    if script == "collection_overhead.py":
        assert report["setup"]["quick"] is True and report["setup"]["repeats"] == 1
        assert [len(report["figures"]["epochs"][k]) for k in ("off", "on")] == [2, 2]
    if script == "head_cache.py":
        assert report["figures"]["metrics_match"] is True
    if script == "dataloader.py":  # decode-once batches are today's, bit for bit
        assert report["figures"]["bitwise_equal"] is True
    if script == "serving.py":
        figures = report["figures"]["resnet18"]
        for name in ("naive", "ours_torch", "ours_onnx_float32"):
            assert figures[name]["concurrency_4"]["requests_per_second"] > 0
        assert figures["export"]["parity"]["passed"] and "accepted" in figures["export"]["int8"]
        assert figures["training"]["epochs"] == 2  # --quick trains its model with the training job
