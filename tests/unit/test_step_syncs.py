"""The training steps read nothing back from the device per step (imgclf.training.loop.train_one_epoch): the loss
and the accuracy stay on the device; the progress line reads them every log-interval steps, the debugger's
collection every collect-train-interval steps, the epoch's sums once at its end. On the CPU, where nothing
syncs, the reads themselves are counted; on a GPU, CUDA's sync debug mode fails any sync between those steps."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import imgclf
import pytest
import torch
from imgclf import config
from imgclf.debugging.debugger import Debugger, DebugSettings
from imgclf.training import loop
from imgclf.training.accel import Accel
from imgclf.training.checkpoint import State
from imgclf.training.distributed import SINGLE
from imgclf.training.job import make_optimizer
from imgclf.training.metrics import RunningSums
from torch import nn

PACKAGE = str(Path(imgclf.__file__).parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__")  # what brings a device value to the host
STEPS, LOG_INTERVAL, COLLECT_INTERVAL = 24, 8, 6


def batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 5, generator=g).to(device), torch.randint(0, 3, (4,), generator=g).to(device))
            for _ in range(STEPS)]


def setup(tmp_path: Path, monkeypatch, device: torch.device, optimizer: str = "sgd") -> loop.Setup:
    monkeypatch.setenv("IMGCLF_TENSORBOARD_DIR", str(tmp_path / "live"))
    hp = config.parse_hyperparameters({"epochs": 1, "log-interval": LOG_INTERVAL, "collect-train-interval":
                                       COLLECT_INTERVAL, "collect-stats-interval": 1000, "profiler-steps": 0,
                                       "optimizer": optimizer})
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(device)
    opt = make_optimizer(hp, model.parameters(), device)
    dbg = Debugger(DebugSettings.from_hyperparameters(hp), tmp_path / "output", device)
    dbg.attach(model, opt)
    # only what train_one_epoch reads; the rest of a Setup belongs to the job around it
    return loop.Setup(hp=hp, model=model, head=[], optimizer=opt,
                      scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step)),
                      criterion=nn.CrossEntropyLoss(), speed=Accel(device), device=device, dist=SINGLE, dbg=dbg,
                      sampler=None, rank_batch=4, train_loader=None, eval_loaders={}, cache=None,  # type: ignore[arg-type]
                      classes=["a", "b", "c"], fingerprint={}, checkpoints=tmp_path / "checkpoints",
                      stop=SimpleNamespace(requested=False), preprocessing=None)  # type: ignore[arg-type]


def reference(data, hp: config.Hyperparameters) -> tuple[RunningSums, list[float]]:
    """Today's arithmetic with a read per step: the sums and the losses the steps must reproduce exactly."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
    sums, losses = RunningSums(), []
    for images, labels in data:
        opt.zero_grad()
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        sums.loss += loss.item() * labels.numel()
        sums.correct += int((logits.argmax(1) == labels).sum())
        sums.seen += labels.numel()
    return sums, losses


def test_the_steps_read_back_only_at_log_and_collection_steps(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "imgclf.train")
    cpu = torch.device("cpu")
    run = setup(tmp_path, monkeypatch, cpu)
    data = batches(cpu)
    now: list[int | str] = [-1]  # the step running (0-based), "end" after the last
    reads: list[tuple[int | str, str]] = []  # (step, what) of each read by the package's code

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                reads.append((now[0], name))
            return original(self, *args, **kwargs)
        return read

    def steps():
        for step, batch in enumerate(data):
            now[0] = step
            yield batch
        now[0] = "end"

    class Loader:
        def __iter__(self):
            return steps()

        def __len__(self):
            return STEPS

    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, counted(name))
        with run.dbg:
            sums = loop.train_one_epoch(run, State(), run.model, Loader(), None)

    # progress after steps 7, 15, 23 (every 8th), the collection at steps 0, 6, 12, 18 (step 0 also takes the
    # layer statistics: many reads), the epoch's sums and the collection of steps 19-23 at the end
    at = {step: [what for s, what in reads if s == step] for step, _ in reads}
    assert sorted(at, key=str) == sorted([0, 6, 7, 12, 15, 18, 23, "end"], key=str), reads
    assert all(at[s] == ["tolist"] for s in (6, 7, 12, 15, 18, 23)) and at["end"] == ["tolist", "tolist"], reads
    expected, losses = reference(data, run.hp)
    assert sums == expected  # identical numbers, not just close ones
    assert run.dbg.collector.points["TRAIN"] == [(s, losses[s]) for s in range(0, STEPS, COLLECT_INTERVAL)]
    lines = [r.getMessage() for r in caplog.records if "(mean of the last" in r.getMessage()]
    assert [line.split("; loss ")[1] for line in lines] == \
        [f"{sum(losses[i:i + LOG_INTERVAL]) / LOG_INTERVAL:.4f} (mean of the last {LOG_INTERVAL} steps)"
         for i in range(0, STEPS, LOG_INTERVAL)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_cuda_sync_between_reading_steps(tmp_path, monkeypatch):
    """CUDA's sync debug mode set to error for every step that neither logs nor collects: a sync fails it."""
    cuda = torch.device("cuda")
    run = setup(tmp_path, monkeypatch, cuda, optimizer="adamw")  # the fused AdamW
    assert run.optimizer.defaults["fused"]
    reading = {s for s in range(STEPS) if (s + 1) % LOG_INTERVAL == 0 or s % COLLECT_INTERVAL == 0}
    data = batches(cuda)

    def guarded():
        for step, batch in enumerate(data):
            torch.cuda.set_sync_debug_mode("default" if step in reading else "error")
            yield batch
        torch.cuda.set_sync_debug_mode("default")

    class Loader:
        def __iter__(self):
            return guarded()

        def __len__(self):
            return STEPS

    try:
        with run.dbg:
            sums = loop.train_one_epoch(run, State(), run.model, Loader(), None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sums.seen == 4 * STEPS and len(run.dbg.collector.points["TRAIN"]) == STEPS // COLLECT_INTERVAL
