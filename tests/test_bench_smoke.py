"""The benchmarks run (--quick: tiny models and sizes) and print their JSON; their speed is not tested here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "scripts" / "bench"
EXPECTED = {
    "train_throughput.py": ("reference_images_per_second", "ours_images_per_second", "speedup"),
    "head_cache.py": ("reference_epoch_seconds", "cached_later_epoch_seconds", "speedup_vs_reference"),
    "forward.py": ("forward_seconds", "decode_transform_seconds"),
    "serving.py": ("resnet18",),
    "gpu.py": ("resnet50", "vit_b_16"),
    "decode.py": ("pil_draft_ms_per_image", "torchvision_io_ms_per_image"),
}


def last_json(stdout: str) -> dict:
    """The JSON document the benchmark prints last (training prints metric lines before it)."""
    start = stdout.rindex("\n{\n") + 1 if "\n{\n" in stdout else stdout.index("{\n")
    return json.loads(stdout[start:])


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_runs_and_prints_its_figures(script):
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick"], capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = last_json(result.stdout)
    assert report["benchmark"] == script.removesuffix(".py")
    assert {"cpu_count", "torch"} <= set(report["machine"])
    assert set(EXPECTED[script]) <= set(report["figures"]), report["figures"]
    if script == "head_cache.py":
        assert report["figures"]["metrics_match"] is True
    if script == "serving.py":
        figures = report["figures"]["resnet18"]
        for name in ("naive", "ours_torch", "ours_onnx_float32"):
            assert figures[name]["concurrency_4"]["requests_per_second"] > 0
        assert figures["export"]["parity"]["passed"] and "accepted" in figures["export"]["int8"]
        assert figures["training"]["epochs"] == 2  # --quick trains its model with the training job
