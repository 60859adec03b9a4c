"""Servers the tests start as real processes: wait until healthy, stop the whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests

STARTUP_TIMEOUT = 240  # Java + one Python worker importing torch on 2 shared cores


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


def stop_group(proc: subprocess.Popen) -> list[str]:
    """SIGTERM the server's process group (serve, java, workers); return what had to be SIGKILLed."""
    pgid = proc.pid
    with_group = lambda: [p for p in psutil.process_iter(["cmdline"]) if _pgid(p) == pgid]  # noqa: E731
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while with_group() and time.monotonic() < deadline:
        time.sleep(0.3)
    leftovers = with_group()
    for p in leftovers:
        p.kill()
    proc.wait(10)
    return [" ".join(p.info["cmdline"] or [])[:100] for p in leftovers]


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid) if p.status() != psutil.STATUS_ZOMBIE else None
    except (ProcessLookupError, psutil.Error):
        return None
