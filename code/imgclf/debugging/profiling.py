"""System monitor, step timer and torch.profiler capture: what the system rules and the profiler report read.

- SystemMonitor: a daemon thread sampling CPU, memory, disk and network I/O (psutil) and, when NVML finds
  a GPU, GPU utilisation and memory, every `interval_ms`; each sample is appended to system.jsonl.
- StepTimer: splits each training step into data wait, forward, backward and optimizer. On CUDA the last
  three come from CUDA events (kernels run asynchronously, wall clock would only time their launch),
  read one step later so that timing never adds a synchronisation.
- ProfilerCapture: torch.profiler over `steps` training steps from `start_step`, exported as a Chrome
  trace (Perfetto, chrome://tracing, TensorBoard's profile plugin) plus a table of the top operators.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

import psutil
import torch

log = logging.getLogger(__name__)

PHASES = ("data", "forward", "backward", "optimizer")
MAX_KEPT = 100_000  # samples/steps kept in memory for rules and report; the JSONL files keep everything


class JsonlFile:
    """Append-only JSON lines, flushed to the OS at least every `flush_seconds` (0: every record), so that a
    crash loses at most that much; per-step files use 1 s (a write per step would cost more than the rest)."""

    def __init__(self, path: Path, flush_seconds: float = 0.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.flush_seconds = path, flush_seconds
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self._flushed = time.monotonic()

    def write(self, record: dict) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
                now = time.monotonic()
                if now - self._flushed >= self.flush_seconds:
                    self._file.flush()
                    self._flushed = now

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _nvml_handles() -> list:
    """NVML device handles, or [] where there is no GPU, driver or nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return []


class SystemMonitor:
    """Samples the machine every `interval_ms` in a daemon thread (psutil's counters cost microseconds)."""

    def __init__(self, path: Path | None, interval_ms: int = 500):
        self.interval = interval_ms / 1000
        self.samples: deque[dict] = deque(maxlen=MAX_KEPT)
        self.file = JsonlFile(path) if path else None
        self.gpus = _nvml_handles()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-monitor", daemon=True)
        self._started = 0.0

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    def start(self) -> SystemMonitor:
        self._started = time.monotonic()
        psutil.cpu_times_percent(None)  # the first calls only prime the counters
        psutil.cpu_percent(None, percpu=True)
        self._last = (time.monotonic(), psutil.disk_io_counters(), psutil.net_io_counters())
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(timeout=5)
        if self.file:
            self.file.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                sample = self.sample()
            except Exception as e:  # a monitor must never take the training job down
                log.warning("system monitor stopped: %s", e)
                return
            self.samples.append(sample)
            if self.file:
                self.file.write(sample)

    def sample(self) -> dict:
        now, disk, net = time.monotonic(), psutil.disk_io_counters(), psutil.net_io_counters()
        then, disk0, net0 = self._last
        self._last = (now, disk, net)
        dt = max(now - then, 1e-6)
        cpu = psutil.cpu_times_percent(None)
        iowait = getattr(cpu, "iowait", 0.0)
        mb = 1024 * 1024
        sample = {
            "t": round(now - self._started, 3), "time": round(time.time(), 3),
            "cpu": round(max(0.0, 100.0 - cpu.idle - iowait), 1), "iowait": round(iowait, 1),
            # per core: one pinned core (a single-threaded loader) hides in the total of many cores
            "cpu_cores": psutil.cpu_percent(None, percpu=True),
            "memory": psutil.virtual_memory().percent,
            "disk_read_mb_s": round((disk.read_bytes - disk0.read_bytes) / mb / dt, 3) if disk and disk0 else 0.0,
            "disk_write_mb_s": round((disk.write_bytes - disk0.write_bytes) / mb / dt, 3) if disk and disk0 else 0.0,
            "net_recv_mb_s": round((net.bytes_recv - net0.bytes_recv) / mb / dt, 3),
            "net_sent_mb_s": round((net.bytes_sent - net0.bytes_sent) / mb / dt, 3),
        }
        if self.gpus:
            import pynvml

            util = [pynvml.nvmlDeviceGetUtilizationRates(h) for h in self.gpus]
            memory = [pynvml.nvmlDeviceGetMemoryInfo(h) for h in self.gpus]
            sample["gpu"] = [float(u.gpu) for u in util]
            sample["gpu_memory"] = [round(100.0 * m.used / max(m.total, 1), 1) for m in memory]
        return sample


class StepTimer:
    """Seconds per training step spent waiting for data, in forward, backward and the optimizer step."""

    def __init__(self, path: Path | None, device: torch.device):
        self.cuda = device.type == "cuda"
        self.file = JsonlFile(path, flush_seconds=1.0) if path else None
        self.steps: deque[dict] = deque(maxlen=MAX_KEPT)
        self.totals = dict.fromkeys((*PHASES, "total"), 0.0)
        self.count = 0
        self._t0 = self._last = time.perf_counter()
        self._wall = time.time()
        self._marks: dict[str, float] = {}
        self._events: dict[str, torch.cuda.Event] = {}
        self._pending: list[tuple[dict, dict]] = []

    def begin(self) -> None:
        """Start of the wait for the next batch (before the loop and after each step)."""
        self._t0 = self._last = time.perf_counter()
        self._wall = time.time()  # the step's start on the wall clock: matches steps to monitor samples
        self._marks, self._events = {}, {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self._marks[phase] = now - self._last
        self._last = now
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events[phase] = event

    def end(self, step: int) -> None:
        """Close `step` (after its optimizer step) and start timing the next batch's wait."""
        now = time.perf_counter()
        record = {"step": step, "time": round(self._wall, 3),
                  **{p: round(self._marks.get(p, 0.0), 6) for p in PHASES},
                  "total": round(now - self._t0, 6)}
        if self.cuda and len(self._events) == len(PHASES):
            self._pending.append((record, self._events))
        else:
            self._store(record)
        self._resolve()
        self.begin()

    def _resolve(self, wait: bool = False) -> None:
        """CUDA: fill in device times of finished steps (all but the latest finished by now, or `wait`)."""
        while self._pending and (wait or len(self._pending) > 1 or self._pending[0][1]["optimizer"].query()):
            record, ev = self._pending.pop(0)
            ev["optimizer"].synchronize()
            for previous, phase in zip(PHASES, PHASES[1:]):
                record[phase] = round(ev[previous].elapsed_time(ev[phase]) / 1000, 6)
            self._store(record)

    def _store(self, record: dict) -> None:
        self.steps.append(record)
        self.count += 1
        for key in self.totals:
            self.totals[key] += record[key]
        if self.file:
            self.file.write(record)

    def close(self) -> None:
        if self.cuda:
            self._resolve(wait=True)
        if self.file:
            self.file.close()


class ProfilerCapture:
    """torch.profiler over steps [start_step, start_step + steps); a Chrome trace and top-operator table."""

    def __init__(self, out_dir: Path, start_step: int, steps: int, device: torch.device):
        self.out_dir, self.start_step, self.steps = out_dir, start_step, steps
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        else:  # a CUDA build of torch on a CPU machine: kineto would log "gpuGetDeviceCount failed" as an ERROR
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self.device_type = device.type
        self.prof: torch.profiler.profile | None = None
        self._stopped: torch.profiler.profile | None = None
        self.captured: list[int] = []
        self.top_operators: list[dict] = []
        self.trace: Path | None = None

    def step_begin(self, step: int) -> None:
        if self.steps and self.prof is None and not self.captured and step >= self.start_step:
            self.prof = torch.profiler.profile(activities=self.activities, record_shapes=False)
            self.prof.start()

    def step_end(self, step: int) -> None:
        if self.prof is not None:
            self.captured.append(step)
            self.prof.step()
            if len(self.captured) >= self.steps:
                self.stop()

    def stop(self) -> None:
        """End the capture (also when training ends or fails inside it); `export` writes it out later."""
        if self.prof is not None:
            self.prof.stop()
            self._stopped, self.prof = self.prof, None

    def export(self) -> None:
        """Trace and top operators. At the end of the job: summarising costs seconds that no epoch should pay."""
        self.stop()
        prof, self._stopped = self._stopped, None
        if prof is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # The `<worker>.pt.trace.json.gz` name is what TensorBoard's profile plugin looks for; Perfetto opens it.
        self.trace = self.out_dir / f"{socket.gethostname()}.{int(time.time() * 1000)}.pt.trace.json.gz"
        prof.export_chrome_trace(str(self.trace))
        rows = []
        for e in prof.key_averages():
            rows.append({
                "name": e.key, "calls": e.count,
                "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3),
                "cpu_total_ms": round(e.cpu_time_total / 1000, 3),
                "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1000, 3),
            })
        sort_key = "self_device_ms" if self.device_type == "cuda" else "self_cpu_ms"
        self.top_operators = sorted((r for r in rows if not r["name"].startswith("ProfilerStep")),
                                    key=lambda r: r[sort_key], reverse=True)[:25]
        summary = {"steps": self.captured, "trace": self.trace.name, "sorted_by": sort_key,
                   "top_operators": self.top_operators}
        (self.out_dir / "top_operators.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("profiler: steps %s captured, trace %s", self.captured, self.trace)
