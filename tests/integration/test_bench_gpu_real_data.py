"""scripts/bench/gpu.py --real-data: the benchmark's training step fed through the training job's own DataLoader
(decode-once cache, workers, Normalise), run with --quick on the CPU on a small generated JPEG ImageFolder tree.
Checks the figures are there and sane, not the speed (that is for the GPU machine: docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.photos import photo

CLASSES, PER_CLASS = 3, 8  # 24 images: --quick's 7 batches of 4 cross an epoch


def test_real_data_quick_run_reports_real_images_per_second_data_wait_and_ratio(tmp_path):
    data = tmp_path / "dogs"
    for c in range(CLASSES):
        folder = data / "train" / f"{c + 1:03d}.Breed_{c + 1}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):  # dogImages' usual sizes, landscape and portrait
            photo((500, 375) if i % 2 else (375, 500), seed=c * PER_CLASS + i).save(folder / f"{i:03d}.jpg",
                                                                                    quality=90)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "gpu.py"), "--quick", "--real-data",
                             str(data)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout[result.stdout.index("{\n"):])
    assert report["benchmark"] == "gpu" and report["settings"]["device"] == "cpu"
    settings = report["settings"]["real_data"]
    assert settings["images"] == CLASSES * PER_CLASS and settings["classes"] == CLASSES
    assert settings["train_dir"] == str(data / "train") and settings["workers"] >= 1  # the job's rule: >= 1
    figures = report["figures"]["resnet18"]
    real = figures["real_data"]
    assert figures["train_images_per_second"] > 0 and real["images_per_second"] > 0
    assert 0 < real["data_wait_share"] < 1 and 0 < real["startup"]["data_wait_share"] < 1
    assert real["ratio_to_synthetic"] == round(real["images_per_second"] / figures["train_images_per_second"], 3)
    assert real["epochs_started"] >= 2 and real["images"] > 0  # the steady steps ran past an epoch's end
    cache = real["decoded_cache"]  # auto: 36 small images fit
    assert cache["on"] and cache["images"] == CLASSES * PER_CLASS and cache["bytes"] > 0 and cache["seconds"] >= 0
    assert "real data" in result.stderr and "x synthetic" in result.stderr  # the summary line
