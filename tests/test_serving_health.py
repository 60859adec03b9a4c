"""/ping tells the truth: the real `serve` entrypoint over a local /opt/ml tree (SAGEMAKER_BASE_DIR).

A bad serving setting answers 503 with the reason before multi-model-server starts; a server whose model
workers die and cannot load the model again stops saying Healthy (MMS itself keeps answering 200 "Healthy").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from imgclf.processes import free_port

from tests.photos import DOG

SERVE = str(Path(sys.executable).parent / "serve")


def start_serve(tree: Path, port: int, **env: str) -> subprocess.Popen:
    full = {**os.environ, "SAGEMAKER_BASE_DIR": str(tree), "SAGEMAKER_BIND_TO_PORT": str(port), **env}
    return subprocess.Popen([SERVE, "serve"], env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def first_ping(port: int, proc: subprocess.Popen, timeout: float = 240, status: int | None = None):
    """The first /ping answer (with `status`: the first answer with that status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            response = requests.get(f"http://127.0.0.1:{port}/ping", timeout=5)
            if status is None or response.status_code == status:
                return response
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy restarting its workers
            pass
        time.sleep(0.5)
    output = proc.communicate(timeout=30)[0] if proc.poll() is not None else stop(proc)  # its log says why
    pytest.fail(f"no /ping answer{'' if status is None else f' with status {status}'} (exit {proc.poll()}): "
                f"{output[-6000:]}")


def stop(proc: subprocess.Popen) -> str:
    if proc.returncode is not None:  # already stopped and read (first_ping does so to show the log)
        return ""
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.communicate(timeout=60)[0]


def model_tree(trained, tmp_path: Path) -> Path:
    tree = tmp_path / "opt_ml"
    shutil.copytree(trained[0] / "model", tree / "model")
    return tree


@pytest.mark.parametrize("env, reason", [
    ({"IMGCLF_SERVE_DTYPE": "float8"}, "IMGCLF_SERVE_DTYPE='float8'"),
    ({"SAGEMAKER_MODEL_SERVER_TIMEOUT": "soon"}, "SAGEMAKER_MODEL_SERVER_TIMEOUT='soon' is not an integer"),
    ({"SAGEMAKER_MODEL_SERVER_WORKERS": "-1"}, "workers must be 0"),
])
def test_bad_setting_answers_503_with_the_reason(trained, tmp_path, env, reason):
    port = free_port()
    proc = start_serve(model_tree(trained, tmp_path), port, **env)
    try:
        response = first_ping(port, proc)
        assert response.status_code == 503 and reason in response.json()["message"], response.text
        invocation = requests.post(f"http://127.0.0.1:{port}/invocations", data=DOG.read_bytes(), timeout=10,
                                   headers={"Content-Type": "image/jpeg"})
        assert invocation.status_code == 503 and reason in invocation.json()["message"]
    finally:
        output = stop(proc)
    assert output.count(reason) == 1 and "Traceback" not in output, output


def _workers(server: subprocess.Popen) -> list[psutil.Process]:
    """MMS's Python model workers among the server's descendants."""
    found = []
    for p in psutil.Process(server.pid).children(recursive=True):
        try:
            if "model_service_worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def test_ping_stops_saying_healthy_when_the_workers_die_for_good(trained, tmp_path):
    tree = model_tree(trained, tmp_path)
    port = free_port()
    proc = start_serve(tree, port, SAGEMAKER_MODEL_SERVER_WORKERS="1", IMGCLF_UNHEALTHY_AFTER_S="5")
    try:
        healthy = first_ping(port, proc, status=200)
        assert healthy.json()["status"] in ("Healthy", "Partial Healthy"), healthy.text
        deadline = time.monotonic() + 180  # MMS answers /ping before its worker has loaded the model
        while requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).json()["status"] != "Healthy":
            assert time.monotonic() < deadline, "the worker never came up"
            time.sleep(0.5)
        assert requests.post(f"http://127.0.0.1:{port}/invocations", data=DOG.read_bytes(), timeout=60,
                             headers={"Content-Type": "image/jpeg"}).status_code == 200
        for name in ("model.safetensors", "model.onnx"):  # a restarted worker cannot load the model any more
            (tree / "model" / name).unlink()
        workers = _workers(proc)  # each a backend server and the child it forked, which holds the model
        forked = [w for w in workers if w.ppid() in {other.pid for other in workers}]
        assert forked, [(w.pid, w.ppid()) for w in workers]
        for worker in forked:
            worker.kill()  # as the kernel's OOM killer would: the child is the big process
        unhealthy = first_ping(port, proc, timeout=240, status=503)
        message = unhealthy.json()["message"]
        assert "no model worker has been running for 5 s" in message and "model.safetensors is missing" in message, \
            unhealthy.text
    finally:
        output = stop(proc)
    assert proc.returncode == 1, output[-3000:]


def test_a_model_without_onnx_where_torch_is_missing_says_how_to_export(trained, tmp_path):
    """The slim serving image has no torch: a model trained before the export gets 503 saying what to run."""
    tree = model_tree(trained, tmp_path)
    (tree / "model" / "model.onnx").unlink()
    hidden = tmp_path / "no_torch" / "torch"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'torch' (hidden by the test)\")\n")
    port = free_port()
    proc = start_serve(tree, port, PYTHONPATH=f"{hidden.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    try:
        response = first_ping(port, proc)
        message = response.json()["message"]
        assert response.status_code == 503 and "model.onnx is missing" in message, response.text
        assert "python -m imgclf.export MODEL_DIR" in message
    finally:
        output = stop(proc)
    assert "Traceback" not in output, output
