"""/ping tells the truth: the real `serve` entrypoint over a local /opt/ml tree (SAGEMAKER_BASE_DIR).

A bad serving setting answers 503 with the reason before multi-model-server starts; a server whose model
workers die and cannot load the model again stops saying Healthy (MMS itself keeps answering 200 "Healthy").
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
from imgclf.processes import free_port
from PIL import Image

from tests.photos import DOG, encode
from tests.servers import model_workers

SERVE = str(Path(sys.executable).parent / "serve")


def start_serve(tree: Path, port: int, log: Path | None = None, **env: str) -> subprocess.Popen:
    """`serve` over `tree`; its output in a pipe (read by `stop`), or in `log` for a server that lives long."""
    full = {**os.environ, "SAGEMAKER_BASE_DIR": str(tree), "SAGEMAKER_BIND_TO_PORT": str(port), **env}
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as out:
        return subprocess.Popen([SERVE, "serve"], env=full, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def first_ping(port: int, proc: subprocess.Popen, timeout: float = 240, status: int | None = None):
    """The first /ping answer (with `status`: the first answer with that status)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            response = requests.get(f"http://127.0.0.1:{port}/ping", timeout=5)
            if (status is None or response.status_code == status) and "is starting" not in response.text:
                return response
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy restarting its workers
            pass
        time.sleep(0.5)
    output = (proc.communicate(timeout=30)[0] or "") if proc.poll() is not None else stop(proc)  # its log says why
    pytest.fail(f"no /ping answer{'' if status is None else f' with status {status}'} (exit {proc.poll()}): "
                f"{output[-6000:]}")


def stop(proc: subprocess.Popen) -> str:
    if proc.returncode is not None:  # already stopped and read (first_ping does so to show the log)
        return ""
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.communicate(timeout=60)[0] or ""


def model_tree(trained, tmp_path: Path) -> Path:
    tree = tmp_path / "opt_ml"
    shutil.copytree(trained[0] / "model", tree / "model")
    return tree


@pytest.mark.parametrize("env, reason", [
    ({"IMGCLF_SERVE_DTYPE": "float8"}, "IMGCLF_SERVE_DTYPE='float8'"),
    ({"SAGEMAKER_MODEL_SERVER_TIMEOUT": "soon"}, "SAGEMAKER_MODEL_SERVER_TIMEOUT='soon' is not an integer"),
    ({"SAGEMAKER_MODEL_SERVER_WORKERS": "-1"}, "SAGEMAKER_MODEL_SERVER_WORKERS=-1: must be 0-1024"),
    # A GPU demanded where ONNX Runtime has none (the CPU build): no paid GPU idles behind a healthy /ping.
    ({"IMGCLF_SERVE_DEVICE": "cuda"}, "IMGCLF_SERVE_DEVICE=cuda, but this ONNX Runtime has no CUDA execution provider"),
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
        workers = model_workers(proc)  # each a backend server and the child it forked, which holds the model
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


# --- an artifact that carries code, a request slower than the timeout, a model server that dies ---------------

@pytest.fixture(scope="module")
def planted(trained, tmp_path_factory):
    """A server on a model whose artifact carries code a toolkit would run: sitecustomize.py at its root and in
    code/, code/inference.py, and code/requirements.txt pointing pip at a port of ours. SAGEMAKER_MODEL_SERVER_
    TIMEOUT=2 (seconds) and no request pixel budget, so that a request can outlast the timeout."""
    tmp = tmp_path_factory.mktemp("planted")
    tree = model_tree(trained, tmp)
    marker = tmp / "code-ran"
    plant = f"open({str(marker)!r}, 'a').write(__file__ + '\\n')\n"
    (tree / "model" / "code").mkdir()
    for name in ("sitecustomize.py", "code/sitecustomize.py", "code/inference.py"):
        (tree / "model" / name).write_text(plant)
    index = socket.create_server(("127.0.0.1", 0))  # pip would connect here
    index.setblocking(False)
    (tree / "model" / "code" / "requirements.txt").write_text(
        f"--index-url http://127.0.0.1:{index.getsockname()[1]}/simple/\nimgclf-planted-package==1.0\n")
    port, log = free_port(), tmp / "serve.log"
    proc = start_serve(tree, port, log, SAGEMAKER_MODEL_SERVER_WORKERS="1", SAGEMAKER_MODEL_SERVER_TIMEOUT="2",
                       IMGCLF_MAX_REQUEST_PIXELS=str(10**10), PYTHONPATH=os.environ.get("PYTHONPATH", "") + ":")
    try:
        first_ping(port, proc, status=200)
        yield port, proc, marker, index, log
    finally:
        index.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def _invoke(port: int, body: bytes, content_type: str = "image/jpeg", timeout: float = 60) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{port}/invocations", data=body, timeout=timeout,
                         headers={"Content-Type": content_type})


def test_an_artifact_is_data_no_code_runs_and_nothing_is_installed(planted):
    port, proc, marker, index, _ = planted
    assert _invoke(port, DOG.read_bytes()).status_code == 200  # the worker has loaded the model
    assert not marker.exists(), marker.read_text()
    with pytest.raises(BlockingIOError):
        index.accept()  # nobody asked our "package index" for anything


def test_a_request_slower_than_the_timeout_gets_a_json_5xx_and_the_next_succeeds(planted):
    port, *_ = planted
    big = base64.b64encode(encode(Image.new("RGB", (3000, 3000), (40, 90, 10)), "PNG")).decode()
    slow = json.dumps({"instances": [{"b64": big}] * 64}).encode()  # 64 decodes of 9 MP: well over 2 s here
    start = time.monotonic()
    response = _invoke(port, slow, "application/json", timeout=120)
    seconds = time.monotonic() - start
    assert 500 <= response.status_code < 600 and response.json()["code"] == response.status_code, response.text
    assert seconds < 20, seconds
    deadline = time.monotonic() + 120  # MMS replaces the worker it timed out
    while (after := _invoke(port, DOG.read_bytes())).status_code != 200:
        assert time.monotonic() < deadline, after.text
        time.sleep(1)


def test_serve_exits_non_zero_when_the_model_server_dies(planted):
    port, proc, _, _, log = planted
    java = [p for p in psutil.Process(proc.pid).children(recursive=True) if "java" in p.name()]
    assert len(java) == 1, java
    java[0].kill()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running 60 s after its model server died: {log.read_text()[-3000:]}")
    output = log.read_text()
    assert proc.returncode == 1, output[-3000:]
    ours = [line for line in output.splitlines() if "com.amazonaws.ml.mms" not in line]  # not MMS's workers' log
    assert "multi-model-server exited by itself" in output and "Traceback" not in "\n".join(ours), output[-3000:]
    warnings = [line for line in output.splitlines() if "never installed or run" in line]
    assert len(warnings) == 1 and "code/requirements.txt" in warnings[0] and "sitecustomize.py" in warnings[0], \
        warnings


def test_sigterm_while_the_model_is_checked_stops_serve_at_once(trained, tmp_path):
    tree = model_tree(trained, tmp_path)
    port = free_port()
    proc = start_serve(tree, port)
    try:
        # The front opens the port, then serve checks the model (imports, load, warm-up: a second or more). Signal
        # as soon as the port accepts: an HTTP answer can come late under load, when the check is over and MMS is
        # starting (a SIGTERM then is a clean stop with exit 0: test_images' stop test).
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, stop(proc)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=10)[0]
    finally:
        if proc.poll() is None:
            stop(proc)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "multi-model-server" not in output, output[-3000:]  # stopped before it started


def test_requests_are_batched_as_configured(trained, tmp_path):
    """IMGCLF_BATCH_SIZE and IMGCLF_MAX_BATCH_DELAY_MS reach multi-model-server: with one worker, a lone request
    waits the delay for company, while as many requests as the batch size, sent together, are answered at once
    (one after the other, each would wait the delay)."""
    port = free_port()
    proc = start_serve(model_tree(trained, tmp_path), port, SAGEMAKER_MODEL_SERVER_WORKERS="1", IMGCLF_BATCH_SIZE="4",
                       IMGCLF_MAX_BATCH_DELAY_MS="3000")
    url = f"http://127.0.0.1:{port}/invocations"

    def invoke(body: bytes) -> tuple[int, float]:
        started = time.monotonic()
        answer = requests.post(url, data=body, timeout=60, headers={"Content-Type": "image/jpeg"})
        return answer.status_code, time.monotonic() - started

    try:
        assert first_ping(port, proc, status=200).json()["status"] == "Healthy"
        status, lone = invoke(DOG.read_bytes())
        assert status == 200 and lone >= 2.9, lone  # waited for the batch to fill
        bodies = [DOG.read_bytes()] * 3 + [b"not an image"]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(invoke, bodies))
        assert [s for s, _ in together] == [200, 200, 200, 400], together
        assert max(t for _, t in together) < 2.5, together  # the batch filled: nobody waited the delay
    finally:
        output = stop(proc)
    assert "batches of up to 4 request(s) within 3000 ms" in output, output[-3000:]
