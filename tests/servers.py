"""What the tests read of real servers (started with imgclf.local.serving): the first verdict, the workers."""

from __future__ import annotations

import subprocess
import time

import psutil
import requests


def verdict(url: str, exited=lambda: None, timeout: float = 120) -> requests.Response | None:
    """The first /ping answer after start-up: not "the model server is starting" (serve's 503 while it checks
    the model), nor a refused connection; None if there is none within `timeout` or `exited()` is not None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and exited() is None:
        try:
            response = requests.get(f"{url}/ping", timeout=5)
            if "is starting" not in response.text:
                return response
        except requests.RequestException:
            pass
        time.sleep(0.3)
    return None


def model_workers(server: subprocess.Popen) -> list[psutil.Process]:
    """MMS's Python model workers among the server's descendants (each a backend server and the child it forked,
    which holds the model)."""
    found = []
    for p in psutil.Process(server.pid).children(recursive=True):
        try:
            if "model_service_worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # exited meanwhile
            pass
    return found
