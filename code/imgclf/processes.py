"""Child processes and ports on this machine: what local mode, the distributed launcher and serving share."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
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
