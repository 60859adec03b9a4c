"""Frozen-backbone feature cache: same metrics as the normal loop (the job's own function: its subject is the
loop, not the process; scripts/bench/head_cache.py runs it through the `train` entrypoint)."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import TINY_HPS, train_in_process

# head-solver=sgd: the epochs of the training loop on cached features, compared with the same loop without them
HEAD_HPS = {**TINY_HPS, "freeze": "head", "augment": "false", "epochs": "3", "image-size": "32", "head-solver": "sgd"}


def history(tree) -> list[dict]:
    return json.loads((tree / "output" / "data" / "metrics.json").read_text())["history"]


def test_cached_head_training_matches_the_normal_loop(sample_dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, "imgclf")
    runs = {}
    for mode in ("off", "on"):
        caplog.clear()
        tree = train_in_process(tmp_path / mode, sample_dataset, {**HEAD_HPS, "feature-cache": mode})
        runs[mode] = (history(tree), caplog.text)
    (slow, slow_log), (cached, cached_log) = runs["off"], runs["on"]
    assert "feature cache: " not in slow_log and "feature cache: 120 images" in cached_log  # 5 classes x 24
    assert len(slow) == len(cached) == 3
    for a, b in zip(slow, cached):
        for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (key, a, b)
    # The head learned something (the loss moved), so equal metrics are not two untouched models.
    assert cached[-1]["train_loss"] != cached[0]["train_loss"]
    # Every epoch of the cached run trained on the features extracted once (train and valid: two extractions);
    # the speed-up itself is measured by scripts/bench/head_cache.py, not timed here.
    assert [e["feature_cache"] for e in slow] == [False] * 3 and [e["feature_cache"] for e in cached] == [True] * 3
    assert cached_log.count("feature cache: ") == 2, cached_log
