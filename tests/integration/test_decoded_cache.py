"""The decoded cache in the training job: decoded once in the main process, read by forked DataLoader workers,
the same training as decoding every epoch (tests/unit/test_decoded_cache.py holds its batches to today's)."""

from __future__ import annotations

import json
import logging

from tests.conftest import TINY_HPS, train_in_process


def test_decoded_once_trains_exactly_as_decoding_every_epoch(sample_dataset, tmp_path, caplog):
    """Augmentation and random erasing (drawn in the worker, applied after normalising), one forked worker."""
    hps = {**TINY_HPS, "epochs": "2", "augment": "trivialaugment", "random-erase": "0.5", "num-workers": "1",
           "prefetch-factor": "2"}
    caplog.set_level(logging.INFO, "imgclf")
    histories = {}
    for mode in ("on", "off"):
        tree = train_in_process(tmp_path / mode, sample_dataset, {**hps, "decoded-cache": mode})
        metrics = json.loads((tree / "output" / "data" / "metrics.json").read_text())
        histories[mode] = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in metrics["history"]]
    assert histories["on"] == histories["off"]
    assert "decoded cache on for train:" in caplog.text and "decoded cache on for valid:" in caplog.text
    assert "decoded cache off (decoded-cache=off)" in caplog.text
    assert "decoded cache: " in caplog.text and " images decoded into " in caplog.text  # the fill ran
