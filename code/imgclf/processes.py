"""Child processes and ports on this machine: what local mode, the distributed launcher and serving share."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MAX_PORT = 32767  # multi-model-server refuses higher ports ("Invalid port number")


def venv_bin(name: str) -> str:
    """A console script of this Python's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd`; SIGTERM/SIGINT sent to this process go to it too (so it can checkpoint and stop cleanly)."""
    proc = subprocess.Popen(cmd, env=env)
    previous = {sig: signal.signal(sig, lambda signum, _: proc.send_signal(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port(low: int = 20000, high: int = MAX_PORT) -> int:
    """A free local port that multi-model-server accepts (the OS's ephemeral ports are above MAX_PORT)."""
    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {low}-{high}")


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> list[str]:
    """SIGTERM the process group that `proc` leads (started with start_new_session=True), wait up to `grace` s
    for all of it to end, SIGKILL what is left; return the command lines that had to be killed."""
    import psutil

    def members() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == proc.pid:
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while (proc.poll() is None or members()) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = members()
    for p in leftovers:
        p.kill()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return [" ".join(p.info["cmdline"] or [])[:100] for p in leftovers]
