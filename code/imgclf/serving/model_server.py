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
- the request timeout is `default_response_timeout_seconds`, in seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
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


def write_config(folder: Path, port: int, management_port: int, handler: str, timeout_s: int, workers: int,
                 max_request_bytes: int, load_models: bool = True) -> Path:
    lines = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{management_port}",
        "enable_envvars_config": "false",  # this file is the whole configuration
        "decode_input_request": "false",
        # the --models names; a multi-model endpoint loads none at start (ALL would load every folder in the store)
        **({"load_models": "ALL"} if load_models else {}),
        "default_service_handler": handler,
        "default_response_timeout_seconds": str(timeout_s),
        "max_request_size": str(max_request_bytes),
        **({"default_workers_per_model": str(workers)} if workers else {}),
    }
    path = folder / "mms.properties"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return path


class ModelServer:
    """One multi-model-server (a launcher that waits for its Java process) serving `model_dir` on 127.0.0.1;
    with `model_dir` None (a multi-model endpoint), none until the management API loads them."""

    def __init__(self, folder: Path, model_dir: Path | None, port: int, management_port: int, handler: str,
                 timeout_s: int, workers: int, max_request_bytes: int) -> None:
        self.folder = folder
        for sub in ((folder / MODEL_NAME,) if model_dir else ()) + (folder / "logs", folder / "tmp"):
            sub.mkdir(parents=True, exist_ok=True)
        self.config = write_config(folder, port, management_port, handler, timeout_s, workers, max_request_bytes,
                                   load_models=model_dir is not None)
        log_config = resources.files("sagemaker_inference") / "etc" / "log4j2.xml"
        self.command = ["multi-model-server", "--start", "--foreground", "--mms-config", str(self.config),
                        "--log-config", str(log_config), "--model-store", str(folder)]
        if model_dir is not None:
            self.command += ["--models", f"{MODEL_NAME}={MODEL_NAME}"]  # in the model store
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
