"""Progress inside a long pass (an epoch's steps, a feature extraction): a tqdm bar on an interactive terminal,
else a log line every `log-interval` steps, which is what SageMaker's and the local mode's logs show.

The lines never read `name=number`: that is the form of the metric regexes (config.METRIC_DEFINITIONS) that
SageMaker and the tuners parse, and a progress line must not count as a metric.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

log = logging.getLogger("imgclf.train")


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """`update()` once per step (with the step's loss when there is one: a float, or a tensor that stays on its
    device until a line or the bar's loss needs it: one host sync per interval, not per step), `close()` at the
    end. `done` steps were run before this pass started (a resumed epoch); interval 0 is silent."""

    def __init__(self, what: str, total: int | None, interval: int, done: int = 0):
        self.what, self.total, self.interval, self.done = what, total, interval, done
        self.started, self.first = time.monotonic(), done
        self.losses: list[float | torch.Tensor] = []
        self.bar = None
        if interval and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=what, unit="step", file=sys.stderr, leave=False,
                            dynamic_ncols=True)

    def update(self, loss: float | torch.Tensor | None = None) -> None:
        self.done += 1
        if loss is not None:
            self.losses.append(loss)
        if self.bar is not None:
            self.bar.update()
        if not self.interval or self.done % self.interval:
            return
        if self.bar is None:
            log.info("%s", self.line())
        elif self.losses:
            self.bar.set_postfix_str(f"loss {self.mean_loss():.4f}", refresh=False)
        self.losses.clear()

    def mean_loss(self) -> float:
        """The mean of the losses since the last line (tensors read back together: one host sync)."""
        tensors = [v for v in self.losses if isinstance(v, torch.Tensor)]
        values = [v for v in self.losses if not isinstance(v, torch.Tensor)]
        if tensors:
            values += torch.stack([t.detach() for t in tensors]).tolist()
        return sum(values) / len(values)

    def line(self) -> str:
        per_step = (time.monotonic() - self.started) / max(1, self.done - self.first)
        of = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = f", about {duration(per_step * (self.total - self.done))} left" if self.total else ""
        loss = (f"; loss {self.mean_loss():.4f} (mean of the last {len(self.losses)} steps)"
                if self.losses else "")
        return f"{self.what}: step {self.done}{of}, {per_step:.2f} s/step{left}{loss}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
