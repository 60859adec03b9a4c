"""Serving through the real `serve` entrypoint (multi-model-server + our handler) over HTTP on 127.0.0.1.

One server per module, started by `python -m imgclf.local serve` on the model.tar.gz of the session's
training run; predictions over HTTP are compared with the evaluation path computed in this process.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from imgclf import artifacts, data, local, preprocessing
from imgclf.processes import free_port
from PIL import Image

from tests import hostile
from tests.conftest import REPO, SERVED_PAYLOAD_MB
from tests.photos import DOG, encode
from tests.photos import forms as images
from tests.servers import model_workers, verdict

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py

PAYLOAD_MB = SERVED_PAYLOAD_MB


@pytest.fixture
def server(served):
    """(URL, log, process) of the session's shared server (tests/conftest.served)."""
    return served.url, served.log, served.proc


@pytest.fixture(scope="module")
def reference(trained):
    """The evaluation path in this process: load_rgb with the draft size, the config's eval transform (its size,
    mean, std, interpolation and crop), the saved weights."""
    net, config = artifacts.load_model(trained[0] / "model")
    transform = data.eval_transform(preprocessing.Preprocessing.from_config(config))

    def probabilities(image: bytes) -> list[float]:
        x = transform(preprocessing.load_rgb(io.BytesIO(image), draft_size=config["resize_size"]))
        with torch.inference_mode():
            return torch.softmax(net(x[None]), dim=1)[0].tolist()
    return probabilities, config


def invoke(url: str, body: bytes, content_type: str = "image/jpeg", timeout: float = 120, **headers):
    return requests.post(f"{url}/invocations", data=body, timeout=timeout,
                         headers={"Content-Type": content_type, **headers})


def assert_matches(prediction: dict, expected: list[float], classes: list[str], k: int) -> None:
    ranked = sorted(range(len(expected)), key=lambda i: -expected[i])[:k]
    got = prediction["top_k"]
    assert [item["index"] for item in got] == ranked
    for item in got:
        assert item["class_name"] == classes[item["index"]]
        assert item["label"] == classes[item["index"]].split(".", 1)[1].replace("_", " ")
        assert item["probability"] == pytest.approx(expected[item["index"]], abs=1e-4)


def test_ping_healthy(server):
    url, *_ = server
    response = requests.get(f"{url}/ping", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "Healthy"


@pytest.mark.parametrize("name", list(images()))
def test_prediction_equals_evaluation(server, reference, name):
    url, *_ = server
    probabilities, config = reference
    body, ctype = images()[name]
    response = invoke(url, body, ctype, **{"X-Amzn-SageMaker-Custom-Attributes": "top_k=5"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    (prediction,) = response.json()["predictions"]
    assert_matches(prediction, probabilities(body), config["class_names"], 5)


def test_exif_orientation_is_applied(server):
    """Lossless: a PNG stored sideways with an EXIF tag predicts exactly like the upright PNG."""
    url, *_ = server
    dog = Image.open(DOG).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = invoke(url, encode(dog, "PNG"), "image/png")
    sideways = invoke(url, encode(dog.rotate(90, expand=True), "PNG", exif=exif), "image/png")
    assert upright.status_code == sideways.status_code == 200, (upright.text, sideways.text)
    assert upright.json()["predictions"] == sideways.json()["predictions"]


def test_json_batch_and_top_k_precedence(server, reference):
    url, *_ = server
    probabilities, config = reference
    bodies = [body for body, _ in images().values()][:4]
    doc = {"instances": [{"b64": base64.b64encode(bodies[0]).decode()},
                         base64.encodebytes(bodies[1]).decode(),  # line-wrapped base64, plain string
                         {"b64": base64.b64encode(bodies[2]).decode()},
                         {"b64": "data:image/png;base64," + base64.b64encode(bodies[3]).decode()}],
           "top_k": 2}
    response = invoke(url, json.dumps(doc).encode(), "application/json",
                      **{"X-Amzn-SageMaker-Custom-Attributes": "top_k=4"})  # the JSON field wins
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 4
    for prediction, body in zip(predictions, bodies):
        assert_matches(prediction, probabilities(body), config["class_names"], 2)


def test_top_k_from_header_and_environment_default(server):
    url, *_ = server
    body = DOG.read_bytes()
    assert len(invoke(url, body).json()["predictions"][0]["top_k"]) == 3  # IMGCLF_TOP_K=3
    header = {"X-Amzn-SageMaker-Custom-Attributes": "trace=abc, top_k=1"}
    assert len(invoke(url, body, **header).json()["predictions"][0]["top_k"]) == 1
    many = {"X-Amzn-SageMaker-Custom-Attributes": "top_k=500"}  # more than there are classes: all of them
    assert len(invoke(url, body, **many).json()["predictions"][0]["top_k"]) == 5


def _bad_requests() -> dict[str, tuple[bytes, dict, int, str]]:
    """name -> (body, headers, status, a word the message must contain)."""
    jpeg = DOG.read_bytes()
    bomb = encode(Image.new("1", (8000, 6000)), "PNG")  # 48 MP, a few kB: over the 40 MP default
    big_bomb = encode(Image.new("1", (12000, 10000)), "PNG")  # 120 MP: over twice the limit, where PIL refuses it
    return {
        "unsupported_content_type": (b"a,b\n1,2\n", {"Content-Type": "text/csv"}, 415, "image/jpeg"),
        "no_content_type": (jpeg, {"Content-Type": ""}, 415, "application/json"),
        "unsupported_accept": (jpeg, {"Content-Type": "image/jpeg", "Accept": "text/csv"}, 406, "application/json"),
        "empty_body": (b"", {"Content-Type": "image/jpeg"}, 400, "empty"),
        "not_an_image": (b"hello, this is text" * 10, {"Content-Type": "image/jpeg"}, 400, "not a readable image"),
        "truncated_image": (jpeg[: len(jpeg) // 2], {"Content-Type": "image/jpeg"}, 400, "truncated"),
        "bad_base64": (b'{"instances": [{"b64": "@@not base64@@"}]}', {"Content-Type": "application/json"}, 400,
                       "base64"),
        "bad_json": (b'{"instances": [', {"Content-Type": "application/json"}, 400, "JSON"),
        "json_without_instances": (b'{"images": []}', {"Content-Type": "application/json"}, 400, "instances"),
        "bad_top_k": (jpeg, {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=zero"}, 400,
                      "top_k"),
        "decompression_bomb": (bomb, {"Content-Type": "image/png"}, 413, "pixels"),
        "decompression_bomb_over_twice_the_limit": (big_bomb, {"Content-Type": "image/png"}, 413,
                                                    "120000000 pixels is over the limit of 40000000 "
                                                    "(IMGCLF_MAX_IMAGE_PIXELS)"),
        "payload_over_limit": (os.urandom(PAYLOAD_MB * 1024 * 1024 + 1000), {"Content-Type": "image/jpeg"}, 413,
                               "limit"),
    }


@pytest.mark.parametrize("name", list(_bad_requests()))
def test_bad_input_gets_json_error_and_server_stays_healthy(server, name):
    url, *_ = server
    body, headers, status, word = _bad_requests()[name]
    response = requests.post(f"{url}/invocations", data=body, headers=headers, timeout=120)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()
    assert error["code"] == status and word.lower() in error["message"].lower(), error
    after = invoke(url, DOG.read_bytes())
    assert after.status_code == 200 and len(after.json()["predictions"]) == 1


def test_32_concurrent_requests(server, reference):
    url, *_ = server
    probabilities, config = reference
    payloads = [body for body, _ in images().values()]
    work = [payloads[i % len(payloads)] for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda b: invoke(url, b, "application/x-image", timeout=180), work))
    assert [r.status_code for r in responses] == [200] * 32
    for response, body in zip(responses, work):
        assert_matches(response.json()["predictions"][0], probabilities(body), config["class_names"], 3)
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200


def _workers_memory(proc: subprocess.Popen) -> dict[int, int]:
    """pid -> resident bytes of the server's model workers (MMS's backend servers and the children holding the
    model), once all have loaded it."""
    return {w.pid: w.memory_info().rss for w in model_workers(proc)}


def test_hostile_requests_get_json_4xx_and_leave_the_workers_alone(server):
    """The management API, shape bombs, deep JSON, odd top_k, lying framing: each a JSON 4xx within 2 s; the
    same workers serve afterwards, none over 1 GB."""
    url, _, proc = server
    port = int(url.rsplit(":", 1)[1])
    assert invoke(url, DOG.read_bytes()).status_code == 200
    before = _workers_memory(proc)
    hostile.assert_battery(port)
    after = _workers_memory(proc)
    assert set(after) == set(before), "a model worker was replaced"
    assert max(after.values()) < 1024**3, after
    models = requests.get(f"{url}/models", timeout=10)  # still registered, still served
    assert models.status_code == 404
    for _ in range(4):  # every relay thread still answers (a request that broke one left it mid-request)
        assert invoke(url, DOG.read_bytes()).status_code == 200
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200


def test_idle_and_half_open_connections_do_not_starve_the_server(server):
    url, *_ = server
    port = int(url.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(300):  # half a request head each, then nothing
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /invocations HTTP/1.1\r\nContent-Type: ima")
            held.append(s)
        start = time.monotonic()
        assert invoke(url, DOG.read_bytes(), timeout=10).status_code == 200
        assert time.monotonic() - start < 8  # served, not queued behind the held connections (slack for load)
    finally:
        for s in held:
            s.close()


def test_fuzz_soak_only_200_or_4xx_same_workers_bounded_memory(server):
    """2,000 mixed good and bad requests at 8 at a time: nothing but 200 and 4xx, no worker replaced, and the
    workers' memory grows by under 10%."""
    url, _, proc = server
    good = [(body, ctype) for body, ctype in images().values() if len(body) < PAYLOAD_MB * 1024 * 1024]
    bad = [(body, headers["Content-Type"]) for body, headers, _, _ in _bad_requests().values()]
    thin = hostile.png(1, 3000)
    rng = random.Random(0)

    def one(i: int) -> int:
        if i % 2:
            body, ctype = good[i % len(good)]
        else:
            body, ctype = bad[i % len(bad)]
            if i % 6 == 0:  # a byte flipped, cut, or a thin image: the decoder's odd paths
                body = bytearray(body or b"x")
                body[rng.randrange(len(body))] ^= 0xFF
                body = bytes(body[: rng.randrange(1, len(body) + 1)])
            elif i % 10 == 0:
                body, ctype = thin, "image/png"
        return invoke(url, body, ctype, timeout=60).status_code

    for i in range(40):  # warm: every worker has served, its arenas are grown
        one(i)
    before = _workers_memory(proc)
    deadline = time.monotonic() + 600
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(2000)))
    assert time.monotonic() < deadline
    after = _workers_memory(proc)
    unexpected = {s for s in statuses if s != 200 and not 400 <= s < 500}
    assert not unexpected, sorted(unexpected)
    assert statuses.count(200) >= 900
    assert set(after) == set(before), "a model worker was replaced"
    assert sum(after.values()) < 1.10 * sum(before.values()), (before, after)


def run_predict(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), *args], capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_predict_cli_against_the_server(server, tmp_path):
    url, *_ = server
    webp = tmp_path / "dog.webp"
    webp.write_bytes(images()["webp"][0])
    result = run_predict(str(DOG), str(webp), "--url", url, "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(DOG) and lines[3] == str(webp) and len(lines) == 6
    assert lines[1].lstrip().startswith("1. ") and "%" in lines[1] and "(class " in lines[1]
    raw = run_predict(str(DOG), "--url", url + "/invocations", "--json")
    assert raw.returncode == 0 and len(json.loads(raw.stdout)["predictions"][0]["top_k"]) == 3


def test_predict_cli_reports_refused_image(server, tmp_path):
    url, *_ = server
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    result = run_predict(str(bad), str(DOG), "--url", url)
    assert result.returncode == 1
    assert "broken.jpg: refused: HTTP 400" in result.stderr and "not a readable image" in result.stderr
    assert str(DOG) in result.stdout  # the good image is still predicted


# --- start-up failures: no MMS, the stand-in answers 503 ----------------------------------------------------

def _broken_model(kind: str, model_dir: Path, target: Path) -> None:
    target.mkdir(parents=True)
    config = json.loads((model_dir / "config.json").read_text())
    if kind == "config_mismatch":
        config["class_names"].append("999.Extra_breed")
        (target / "config.json").write_text(json.dumps(config))
        (target / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    else:  # a model.tar.gz holding config.json only: `serve` extracts it, then finds no weights
        (target.parent / "config.json").write_text(json.dumps(config))
        with tarfile.open(target / "model.tar.gz", "w:gz") as tar:
            tar.add(target.parent / "config.json", arcname="config.json")


@pytest.mark.parametrize("kind,reason", [("config_mismatch", "does not match config.json"),
                                         ("missing_weights", "model.safetensors is missing")])
def test_unloadable_model_makes_ping_unhealthy(trained, tmp_path, kind, reason):
    _broken_model(kind, trained[0] / "model", tmp_path / "opt_ml" / "model")
    port = free_port()
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(tmp_path / "opt_ml"), "SAGEMAKER_BIND_TO_PORT": str(port)}
    serve = str(Path(sys.executable).parent / "serve")
    proc = subprocess.Popen([serve, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # the leading "serve" is what `docker run IMAGE serve` adds
    try:
        response = verdict(f"http://127.0.0.1:{port}", proc.poll)
        assert response is not None, f"no answer on /ping (exit {proc.poll()})"
        assert response.status_code == 503 and reason in response.json()["message"]
        requests.get(f"http://127.0.0.1:{port}/ping", timeout=5)
        invocation = requests.post(f"http://127.0.0.1:{port}/invocations", data=b"x", timeout=5)
        assert invocation.status_code == 503 and reason in invocation.json()["message"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert output.count(reason) == 1, output  # said once, however often it was pinged
    assert "Traceback" not in output


def test_serve_rejects_unknown_arguments():
    result = subprocess.run([str(Path(sys.executable).parent / "serve"), "--port", "9"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "usage: serve" in result.stderr


def test_batch_transform_gets_execution_parameters_and_the_same_answers(trained, tmp_path):
    """With SAGEMAKER_BATCH (set by batch transform) `serve` answers GET /execution-parameters, which MMS does not
    serve, and passes everything else to MMS unchanged: predictions and JSON errors alike. Batch transform and
    asynchronous inference take large payloads: with the limit raised, a 41 MiB PNG (14.4 megapixels, within the
    pixel bounds) is served."""
    env = {"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "64"}
    with local.serving(trained[0] / "model.tar.gz", env=env, log=tmp_path / "batch.log") as server:
        url = server.url
        parameters = requests.get(f"{url}/execution-parameters", timeout=10)
        assert parameters.json() == {"MaxConcurrentTransforms": 1, "BatchStrategy": "SINGLE_RECORD",
                                     "MaxPayloadInMB": 64}
        answer = invoke(url, DOG.read_bytes(), "application/x-image")
        assert answer.status_code == 200 and answer.json()["predictions"][0]["top_k"], answer.text
        refused = invoke(url, b"not an image", "application/x-image")
        assert refused.status_code == 400 and refused.json()["code"] == 400, refused.text
        noise = Image.frombytes("RGB", (3800, 3800), random.Random(0).randbytes(3800 * 3800 * 3))
        large = encode(noise, "PNG", compress_level=0)
        assert len(large) > 40 << 20
        answer = invoke(url, large, "image/png")
        assert answer.status_code == 200 and answer.json()["predictions"][0]["top_k"], answer.text[:500]
        leftovers = server.stop()
    assert not leftovers, f"server processes survived SIGTERM: {leftovers}"
