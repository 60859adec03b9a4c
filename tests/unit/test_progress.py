"""Progress inside an epoch (imgclf.training.progress): a log line every N steps that no metric regex reads, a
tqdm bar instead on a terminal."""

from __future__ import annotations

import io
import logging
import re

from imgclf import config
from imgclf.training import progress
from imgclf.training.progress import Progress


def test_a_line_every_interval_steps_that_no_metric_regex_matches(caplog):
    caplog.set_level(logging.INFO, "imgclf.train")
    steps = Progress("epoch 2/7", total=9, interval=3, done=2)  # resumed after 2 steps
    for loss in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0):
        steps.update(loss)
    steps.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # after steps 3, 6 and 9
    assert re.fullmatch(r"epoch 2/7: step 3/9 \(33%\), \d+\.\d\d s/step, about \d+ s left; loss 1\.0000 \(mean of "
                        r"the last 1 steps\)", lines[0]), lines[0]
    assert lines[1].startswith("epoch 2/7: step 6/9 (67%)") and "loss 3.0000 (mean of the last 3 steps)" in lines[1]
    assert lines[2].startswith("epoch 2/7: step 9/9 (100%)") and "about 0 s left; loss 6.0000" in lines[2]
    for line in lines:
        assert not any(re.search(d["Regex"], line) for d in config.METRIC_DEFINITIONS), line


def test_silent_at_interval_zero_and_without_a_loss(caplog):
    caplog.set_level(logging.INFO, "imgclf.train")
    for _ in range(5):
        Progress("epoch 1/1", total=5, interval=0).update(1.0)
    extraction = Progress("feature extraction (train)", total=None, interval=2)
    extraction.update()
    extraction.update()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["feature extraction (train): step 2"]
    assert "loss" not in caplog.records[0].getMessage()


def test_a_bar_on_a_terminal_and_no_lines(caplog, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    caplog.set_level(logging.INFO, "imgclf.train")
    steps = Progress("epoch 1/3", total=4, interval=1)
    for loss in (0.5, 0.25, 0.125, 0.0625):
        steps.update(loss)
    assert steps.bar is not None and (steps.bar.n, steps.bar.total) == (4, 4)  # tqdm redraws at most every 0.1 s
    steps.close()
    assert not caplog.records
    assert "epoch 1/3:   0%|" in terminal.getvalue() and "0/4" in terminal.getvalue()
    assert progress.duration(59.6) == "1 min 00 s" and progress.duration(3725) == "62 min 05 s"
