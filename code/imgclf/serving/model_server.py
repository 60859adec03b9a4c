"""multi-model-server, started our way: on 127.0.0.1, from a private folder, with nothing run from the model.

sagemaker-inference's `start_model_server` would bind the inference and management APIs to 0.0.0.0 on the
serving port, pip-install the artifact's code/requirements.txt, put the artifact's code/ first on PYTHONPATH
(with a trailing ':', the worker's working directory, which MMS sets to the model folder), and count its
timeout in minutes. Here:

- MMS listens on 127.0.0.1: inference on `port` (the front relays the SageMaker contract to it), management
  on a port of its own that nothing relays to;
- the "model" MMS is given is an empty private folder: MMS puts it on the workers' PYTHONPATH and makes it
  their working directory. The handler finds the real model through MODEL_DIR_ENV, and PYTHONPATH keeps no
  empty entry, so no `sitecustomize.py` or module in the artifact is ever imported; nothing is installed;
- config, pid file, logs and temporary files live in that private folder (a read-only /opt/ml is fine);
- the request timeout is `default_response_timeout_seconds`, in seconds;
- the model is registered through the management API once MMS is up (`register`), not given with `--models`:
  only a registration sets MMS's batching (batch_size, max_batch_delay; `--models` always gets 1 and 100 ms) and
  the number of workers; it answers once they are up, so the front says 503 "starting" until then. The front
  relays /invocations to /predictions/model (MMS's own /invocations knows `--models` models only).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import subprocess
import sys
import time
import urllib.parse
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "IMGCLF_MODEL_DIR"  # the model folder the workers load (handler_service reads it)
# Multi-model endpoints: each model's stand-in folder holds only this file, the real folder's path.
POINTER_FILE = "imgclf-model-dir.txt"
WORKER_STATE_ENV = "IMGCLF_WORKER_STATE_DIR"  # where each worker reports whether it holds the model
JAVA_MAIN = "com.amazonaws.ml.mms.ModelServer"
MODEL_NAME = "model"
# What an artifact could use to run code: warned about once, never installed or imported.
CODE_PATTERNS = ("*.py", "*.pth", "requirements.txt", "*.so")


def code_in_artifact(model_dir: Path, limit: int = 20) -> list[str]:
    """Files in the model folder that a toolkit would install or import (relative paths, at most `limit`)."""
    found = sorted({str(p.relative_to(model_dir)) for pattern in CODE_PATTERNS for p in model_dir.rglob(pattern)})
    return found[:limit]


def model_folder(given: str | None) -> str:
    """The folder a worker loads: MODEL_DIR_ENV (single model), else the one the stand-in MMS gave points to."""
    if os.environ.get(MODEL_DIR_ENV):
        return os.environ[MODEL_DIR_ENV]
    pointer = Path(given or ".") / POINTER_FILE
    return pointer.read_text() if pointer.is_file() else (given or "")


def clean_python_path(value: str | None) -> str:
    """PYTHONPATH without empty entries: an empty entry is the working directory."""
    return os.pathsep.join(p for p in (value or "").split(os.pathsep) if p)


def write_config(folder: Path, port: int, management_port: int, handler: str, timeout_s: int,
                 max_request_bytes: int) -> Path:
    lines = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{management_port}",
        "enable_envvars_config": "false",  # this file is the whole configuration
        "decode_input_request": "false",
        # no model at start (ALL would load every folder in the store): `register` adds them
        "default_service_handler": handler,
        "default_response_timeout_seconds": str(timeout_s),
        "max_request_size": str(max_request_bytes),
    }
    path = folder / "mms.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return path


def registration(name: str, workers: int, batch_size: int, max_batch_delay_ms: int) -> str:
    """The management API's call that registers the model in folder `name` of the model store as `name`; it answers
    once its workers are up (synchronous)."""
    return "/models?" + urllib.parse.urlencode({
        "url": name, "model_name": name, "initial_workers": workers, "batch_size": batch_size,
        "max_batch_delay": max_batch_delay_ms, "synchronous": "true"})


def management_call(port: int, method: str, path: str, timeout: float) -> tuple[int, str]:
    """(status, body) of a call to MMS's management API on 127.0.0.1:`port`; OSError when it does not answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


class ModelServer:
    """One multi-model-server (a launcher that waits for its Java process) on 127.0.0.1, for `model_dir` (`register`
    loads it); with `model_dir` None (a multi-model endpoint), none until the management API loads them."""

    def __init__(self, folder: Path, model_dir: Path | None, port: int, management_port: int, handler: str,
                 timeout_s: int, max_request_bytes: int) -> None:
        self.folder, self.management_port = folder, management_port
        for sub in ((folder / MODEL_NAME,) if model_dir else ()) + (folder / "logs", folder / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)
        self.config = write_config(folder, port, management_port, handler, timeout_s, max_request_bytes)
        log_config = resources.files("sagemaker_inference") / "etc" / "log4j2.xml"
        self.command = ["multi-model-server", "--start", "--foreground", "--mms-config", str(self.config),
                        "--log-config", str(log_config), "--model-store", str(folder)]
        self.env = {**os.environ, MODEL_DIR_ENV: str(model_dir or ""), "TMPDIR": str(folder / "tmp"),
                    "TEMP": str(folder / "tmp"), "LOG_LOCATION": str(folder / "logs"),
                    "METRICS_LOCATION": str(folder / "logs"), "PYTHONPATH": clean_python_path(os.environ.get(
                        "PYTHONPATH"))}
        for name in ("PYTHONPATH", MODEL_DIR_ENV):  # empty: none (multi-model: each model's stand-in says)
            if not self.env[name]:
                del self.env[name]
        # `multi-model-server` (a launcher that runs Java and waits for it) lives beside this Python
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.launcher: subprocess.Popen | None = None

    def start(self) -> None:
        self.launcher = subprocess.Popen(self.command, env=self.env, cwd=self.folder)

    def register(self, workers: int, batch_size: int, max_batch_delay_ms: int, up_timeout: float,
                 load_timeout: float) -> str | None:
        """Register the model (MODEL_NAME) once the management API answers; why it failed, or None. Waits at most
        `up_timeout` seconds for MMS to come up, then `load_timeout` for its workers to load the model."""
        deadline = time.monotonic() + up_timeout
        while True:
            if self.launcher is None or self.launcher.poll() is not None:
                return "it exited before the model was registered (its log above says why)"
            try:
                status, text = management_call(self.management_port, "POST", registration(
                    MODEL_NAME, workers, batch_size, max_batch_delay_ms), timeout=load_timeout)
            except ConnectionRefusedError:  # not listening yet
                if time.monotonic() > deadline:
                    return f"its management API did not answer within {up_timeout:g} s"
                time.sleep(0.2)
                continue
            except OSError as e:
                return f"registering the model failed ({e})"
            if status != 200:
                return f"registering the model was answered {status}: {text[:500]}"
            log.info("multi-model-server: model registered (%d worker(s), batches of up to %d request(s) within %d "
                     "ms)", workers, batch_size, max_batch_delay_ms)
            return None

    def java(self):
        """The Java process (psutil.Process), or None when it is not (or no longer) running."""
        import psutil

        if self.launcher is None:
            return None
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.launcher.pid).children():
                if JAVA_MAIN in child.cmdline():
                    return child
        return None

    def wait(self) -> int:
        """Block until MMS has exited; its launcher's exit code."""
        if self.launcher is None:
            raise RuntimeError("ModelServer.wait() before start()")
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.launcher.wait(timeout=1.0)

    def stop(self) -> None:
        """SIGTERM to Java (the launcher exits with it); SIGKILL if it is still there after 20 s."""
        java = self.java()
        if java is not None:
            java.terminate()
        elif self.launcher and self.launcher.poll() is None:
            self.launcher.terminate()
        deadline = time.monotonic() + 20
        while self.launcher and self.launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.launcher and self.launcher.poll() is None:
            java = self.java()
            (java or self.launcher).kill()
