"""The images, built and run for real (make test-images): train, fail, stop and resume, serve, cache (the GPU serving
image's own tests: test_serve_gpu.py).

This is AWS's bring-your-own-container check, automated, in every place the images run: `docker run -v
TREE:/opt/ml IMAGE train` (and `serve`), the Makefile's local-train/local-serve/local-predict flow that the
docs give, and the SageMaker SDK's own local mode through the scripts' --local path (train, deploy, predict,
batch transform; the SDK's own classes: test_sdk.py), on images built by `make build`. Works with
Docker or podman (DOCKER=); containers run detached, because podman's API service spins a core while a
client stays attached. Only under `make test-images` (IMGCLF_IMAGE_TESTS=1): the builds take minutes. The
test images and containers are removed at the end (the `images` fixture: conftest.py).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import requests
from imgclf import local

from tests import hostile
from tests.conftest import REPO, free_port
from tests.images.conftest import (
    ENGINE,
    HPS,
    IMAGE_NAMES,
    LABEL,
    MAKE_ENV,
    PREFIX,
    TAG,
    TORCH_SOURCE,
    build_args,
    engine,
    finish,
    image,
    make,
    make_tree,
    remove_containers,
    require_image_tests,
    run_detached,
    wait_healthy,
)
from tests.photos import DOG, forms
from tests.servers import verdict

pytestmark = pytest.mark.images
require_image_tests()
def wait_for_log(name: str, text: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = engine("logs", name, check=False)
        if text in logs.stdout + logs.stderr:
            return logs.stdout + logs.stderr
        time.sleep(0.5)
    pytest.fail(f"{text!r} not in the logs of {name} after {timeout} s:\n{(logs.stdout + logs.stderr)[-3000:]}")


def inspect(img: str) -> dict:
    return json.loads(engine("image", "inspect", img).stdout)[0]


# ---- what the images are ----------------------------------------------------------------------------------

def test_images_are_labelled_and_configured_for_sagemaker(images):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    version = next(line.split('"')[1] for line in (REPO / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version ="))
    for name in IMAGE_NAMES:
        info = inspect(image(name))
        labels = info["Config"]["Labels"]
        assert labels["org.opencontainers.image.revision"] == sha
        assert labels["org.opencontainers.image.version"] == version
        assert labels["org.opencontainers.image.source"]
        assert info["Architecture"] == "amd64"
    for name in ("train-cpu", "train-gpu"):
        config = inspect(image(name))["Config"]
        assert config["Cmd"] == ["train"] and not config.get("Entrypoint")
        assert "SAGEMAKER_TRAINING_MODULE=imgclf.train:main" in config["Env"]
    serve = inspect(image("serve"))["Config"]
    assert serve["Entrypoint"] == ["serve"]
    assert serve["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert serve["Labels"]["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"
    assert "(CPU)" in serve["Labels"]["org.opencontainers.image.description"]  # serve-gpu's: test_serve_gpu.py


@pytest.mark.parametrize("name,torch_build,compiler", [
    ("train-cpu", TORCH_SOURCE, False), ("train-gpu", "pypi", True)])
def test_image_contents(images, name, torch_build, compiler):
    """The torch build each image should carry, and a C compiler exactly where compile=on needs one."""
    probe = ("import shutil, torch, torchvision; "
             "print(torch.__version__, torch.version.cuda, bool(shutil.which('gcc')), bool(shutil.which('g++')))")
    out = engine("run", "--rm", "--entrypoint", "python", image(name), "-c", probe).stdout.split()
    version, cuda, gcc, gxx = out[0], out[1], out[2] == "True", out[3] == "True"
    if torch_build == "cpu":
        assert version.endswith("+cpu") and cuda == "None", out
    else:
        assert not version.endswith("+cpu") and cuda.startswith("13."), out
    assert (gcc and gxx) == compiler, out


def test_serving_image_has_onnx_runtime_and_no_torch(images):
    """It serves the exported graph: ONNX Runtime, PIL, numpy, MMS and Java; torch would only add gigabytes."""
    probe = ("import importlib.util as u, onnxruntime, PIL, numpy; "
             "print(onnxruntime.__version__, [m for m in ('torch', 'torchvision', 'timm') if u.find_spec(m)])")
    out = engine("run", "--rm", "--entrypoint", "python", image("serve"), "-c", probe).stdout.strip()
    assert out.endswith(" []"), out
    engine("run", "--rm", "--entrypoint", "sh", image("serve"), "-c", "java -version && command -v multi-model-server")


# ---- training ------------------------------------------------------------------------------------------------

def test_train_cpu_writes_the_model(trained_tree):
    tree, status, logs = trained_tree
    assert status == 0, logs[-3000:]
    assert (tree / "model" / "config.json").is_file() and (tree / "model" / "model.safetensors").is_file()
    assert json.loads((tree / "model" / "config.json").read_text())["onnx"]["parity"]["passed"]  # what serve runs
    assert not (tree / "output" / "failure").exists()
    assert "valid_accuracy=" in logs


def test_train_gpu_image_trains_on_the_cpu(images, tmp_path, sample_dataset):
    """With no GPU on this machine (and no GPU instance type in resourceconfig.json) it trains on the CPU."""
    tree = make_tree(tmp_path / "opt_ml", sample_dataset, {**HPS, "epochs": "1"})
    status, logs = finish(run_detached(image("train-gpu"), tree=tree))  # no arguments: the image's CMD trains
    assert status == 0, logs[-3000:]
    assert (tree / "model" / "model.safetensors").is_file()


def test_train_gpu_on_a_gpu_instance_without_cuda_fails_fast(images, tmp_path, sample_dataset):
    """SageMaker says ml.g5.xlarge, and the container sees no NVIDIA driver: stop with the reason, do not train."""
    tree = make_tree(tmp_path / "opt_ml", sample_dataset, HPS)
    resources = tree / "input/config/resourceconfig.json"
    resources.write_text(json.dumps({**json.loads(resources.read_text()), "current_instance_type": "ml.g5.xlarge"}))
    status, logs = finish(run_detached(image("train-gpu"), "train", tree=tree))
    assert status != 0 and "epoch=" not in logs
    failure = (tree / "output" / "failure").read_text()
    assert "ml.g5.xlarge has NVIDIA GPUs, but no NVIDIA driver is visible" in failure, failure


def test_failing_job_exits_non_zero_with_the_reason(images, tmp_path, sample_dataset):
    tree = make_tree(tmp_path / "opt_ml", sample_dataset, {**HPS, "model": "resnet9000"})
    status, logs = finish(run_detached(image("train-cpu"), "train", tree=tree))
    assert status != 0, logs[-2000:]
    assert "resnet9000" in (tree / "output" / "failure").read_text()


def test_stopped_container_resumes_from_its_checkpoint(images, tmp_path, sample_dataset):
    tree = make_tree(tmp_path / "opt_ml", sample_dataset, {**HPS, "epochs": "3", "batch-size": "4"})
    name = run_detached(image("train-cpu"), "train", tree=tree)
    wait_for_log(name, "epoch=1 ")
    engine("stop", "-t", "30", name)  # SIGTERM in epoch 2, as SageMaker stops a spot job
    status, logs = finish(name)
    assert status != 0
    assert "stopped by SIGTERM in epoch 2" in (tree / "output" / "failure").read_text(), logs[-2000:]
    assert (tree / "checkpoints" / "checkpoint.pt").is_file()
    (tree / "output" / "failure").unlink()  # SageMaker starts the rerun with a fresh output folder

    status, logs = finish(run_detached(image("train-cpu"), "train", tree=tree))
    assert status == 0, logs[-3000:]
    assert "resuming from checkpoint" in logs and "epoch=1 " not in logs and "epoch=3 " in logs
    assert (tree / "model" / "model.safetensors").is_file()


# ---- serving ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(trained_tree):
    """The serving image on the trained model, mounted read-only as SageMaker mounts it, in 2 GB of memory."""
    tree, status, logs = trained_tree
    assert status == 0, "training failed; see test_train_cpu_writes_the_model"
    port = free_port()
    name = run_detached(image("serve"), "serve", options=(
        "-p", f"127.0.0.1:{port}:8080", "-v", f"{tree / 'model'}:/opt/ml/model:ro", "--memory", "2g",
        "-e", f"IMGCLF_BODY_TIMEOUT_S={hostile.BODY_TIMEOUT_S}"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, name)
    yield url, name, tree
    engine("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def host_model(server):
    """The same model served by the handler functions in this process: what the image must answer."""
    from imgclf.serving import inference

    return inference.model_fn(str(server[2] / "model"))


@pytest.mark.parametrize("form", list(forms()))
def test_serving_predicts_every_image_form(server, host_model, form):
    """The image's answer equals the host's predict_fn on the same bytes: class order and probabilities."""
    from imgclf.serving import inference

    url, _, _ = server
    body, content_type = forms()[form]
    response = requests.post(f"{url}/invocations", data=body, timeout=120,
                             headers={"Content-Type": content_type, "X-Amzn-SageMaker-Custom-Attributes": "top_k=5"})
    assert response.status_code == 200, response.text
    expected = json.loads(inference.output_fn(inference.predict_fn(
        inference.ImageRequest([body], top_k=5), host_model), "application/json"))["predictions"][0]["top_k"]
    got = response.json()["predictions"][0]["top_k"]
    assert [g["class_name"] for g in got] == [e["class_name"] for e in expected]
    assert [g["probability"] for g in got] == pytest.approx([e["probability"] for e in expected], abs=1e-4)


@pytest.mark.parametrize("body,headers,status", [
    (b"not an image", {"Content-Type": "image/jpeg"}, 400),
    (b"a,b\n1,2\n", {"Content-Type": "text/csv"}, 415),
    (b'{"instances": [', {"Content-Type": "application/json"}, 400)])
def test_serving_answers_bad_requests_with_json_4xx(server, body, headers, status):
    url, _, _ = server
    response = requests.post(f"{url}/invocations", data=body, headers=headers, timeout=60)
    assert response.status_code == status and response.json()["code"] == status, response.text


# What the model workers are and hold, read inside the container: {pid: resident bytes}.
WORKERS_MEMORY = """
import json, os, pathlib
found = {}
for proc in pathlib.Path("/proc").glob("[0-9]*"):
    try:
        if proc.name != str(os.getpid()) and b"model_service_worker" in (proc / "cmdline").read_bytes():
            rss = [l for l in (proc / "status").read_text().splitlines() if l.startswith("VmRSS:")]
            found[proc.name] = int(rss[0].split()[1]) * 1024
    except (OSError, IndexError):
        pass
print(json.dumps(found))
"""


def workers_memory(name: str) -> dict[str, int]:
    return json.loads(engine("exec", name, "python", "-c", WORKERS_MEMORY).stdout)


def test_serving_image_answers_the_hostile_battery_with_json_4xx(server):
    """The management API, shape bombs, deep JSON, odd top_k, lying framing (tests/hostile.py) against the image
    under --memory 2g: each a JSON 4xx within 2 s, the same workers afterwards, none over 1 GB."""
    url, name, _ = server
    assert requests.post(f"{url}/invocations", data=DOG.read_bytes(), headers={"Content-Type": "image/jpeg"},
                         timeout=120).status_code == 200
    before = workers_memory(name)
    hostile.assert_battery(int(url.rsplit(":", 1)[1]))
    after = workers_memory(name)
    assert before and set(after) == set(before), (before, after)
    assert max(after.values()) < 1024**3, after


PLANTED = "import sys; print('PLANTED CODE RAN', __file__, file=sys.stderr)\n"


def exec_http(name: str, path: str, body_file: str | None = None) -> tuple[int, dict]:
    """(status, JSON) of a request made inside the container: with --network none nothing reaches it from outside."""
    code = ("import json, sys, urllib.request, urllib.error\n"
            f"path = {body_file!r}\ndata = open(path, 'rb').read() if path else None\n"
            f"req = urllib.request.Request('http://127.0.0.1:8080{path}', data=data, "
            "headers={'Content-Type': 'image/jpeg'})\n"
            "try:\n    r = urllib.request.urlopen(req, timeout=60); print(r.status, r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n    print(e.code, e.read().decode())\n"
            "except OSError as e:\n    print(0, json.dumps({'error': str(e)}))\n")
    status, _, text = engine("exec", name, "python", "-c", code).stdout.strip().partition(" ")
    return int(status), json.loads(text)


def test_serving_image_offline_read_only_runs_no_code_from_the_artifact(trained_tree, tmp_path):
    """--network none, --read-only with a tmpfs /tmp, and an artifact carrying sitecustomize.py, code/inference.py
    and code/requirements.txt: the image serves, runs none of that code and installs nothing."""
    model = tmp_path / "model"
    shutil.copytree(trained_tree[0] / "model", model)
    (model / "code").mkdir()
    for planted in ("sitecustomize.py", "code/sitecustomize.py", "code/inference.py"):
        (model / planted).write_text(PLANTED)
    (model / "code" / "requirements.txt").write_text("imgclf-planted-package==1.0\n")
    probe = tmp_path / "probe"
    probe.mkdir()
    shutil.copy(DOG, probe / "dog.jpg")
    name = run_detached(image("serve"), "serve", options=(
        "--network", "none", "--read-only", "--tmpfs", "/tmp", "-v", f"{model}:/opt/ml/model:ro",
        "-v", f"{probe}:/probe:ro"))
    try:
        deadline = time.monotonic() + 240
        while (ping := exec_http(name, "/ping"))[0] != 200:
            assert time.monotonic() < deadline, (ping, engine("logs", name, check=False).stderr[-3000:])
            time.sleep(1)
        status, answer = exec_http(name, "/invocations", "/probe/dog.jpg")
        assert status == 200 and answer["predictions"][0]["top_k"], answer
        logs = engine("logs", name, check=False)
        output = logs.stdout + logs.stderr
        assert "PLANTED CODE RAN" not in output and "installing packages" not in output
        assert "code/requirements.txt" in output and "never installed or run" in output
    finally:
        engine("rm", "-f", name, check=False)


def test_serving_image_read_only_tarball_answers_503_naming_what_it_cannot_write(trained_tree, tmp_path):
    """A model.tar.gz mounted read-only cannot be extracted: /ping answers 503 and says so."""
    model = tmp_path / "model"
    model.mkdir()
    with tarfile.open(model / "model.tar.gz", "w:gz") as tar:
        for path in (trained_tree[0] / "model").iterdir():
            tar.add(path, arcname=path.name)
    port = free_port()
    name = run_detached(image("serve"), "serve", options=(
        "-p", f"127.0.0.1:{port}:8080", "--read-only", "--tmpfs", "/tmp", "-v", f"{model}:/opt/ml/model:ro"))
    try:
        response = verdict(f"http://127.0.0.1:{port}")
        assert response is not None and response.status_code == 503, engine("logs", name, check=False).stderr
        assert "Read-only file system" in response.json()["message"], response.text
    finally:
        engine("rm", "-f", name, check=False)


def test_serving_a_model_without_onnx_says_how_to_export_it(trained_tree, tmp_path):
    """A model trained before the export existed: /ping answers 503 with the command to run, no traceback."""
    model = tmp_path / "model"
    shutil.copytree(trained_tree[0] / "model", model)
    (model / "model.onnx").unlink()
    port = free_port()
    name = run_detached(image("serve"), "serve", options=("-p", f"127.0.0.1:{port}:8080", "-v",
                                                           f"{model}:/opt/ml/model:ro"))
    try:
        response = verdict(f"http://127.0.0.1:{port}")
        assert response is not None and response.status_code == 503, engine("logs", name, check=False).stderr
        assert "python -m imgclf.export MODEL_DIR" in response.json()["message"], response.text
        logs = engine("logs", name, check=False)
        assert "Traceback" not in logs.stdout + logs.stderr
    finally:
        engine("rm", "-f", name, check=False)


def test_serving_image_multi_model_endpoint(trained_tree, tmp_path):
    """SAGEMAKER_MULTI_MODEL=true, the models where SageMaker puts them (/opt/ml/models/<name>/model, read-only):
    two models loaded into one container answer with their own classes; a model that cannot load is refused with
    the reason while the others serve; an unloaded model answers 404."""
    store = tmp_path / "models"
    shutil.copytree(trained_tree[0] / "model", store / "a/model")
    shutil.copytree(trained_tree[0] / "model", store / "b/model")
    config = json.loads((store / "b/model/config.json").read_text())
    renamed = [f"{100 + i}.Other_{i}" for i in range(len(config["class_names"]))]
    (store / "b/model/config.json").write_text(json.dumps({**config, "class_names": renamed}))
    (store / "bad/model").mkdir(parents=True)
    (store / "bad/model/config.json").write_text("{}")
    port = free_port()
    name = run_detached(image("serve"), "serve", options=(
        "-p", f"127.0.0.1:{port}:8080", "-v", f"{store}:/opt/ml/models:ro", "-e", "SAGEMAKER_MULTI_MODEL=true",
        "-e", "SAGEMAKER_MODEL_SERVER_WORKERS=1"))
    url = f"http://127.0.0.1:{port}"

    def load(model: str) -> requests.Response:
        return requests.post(f"{url}/models", json={"model_name": model, "url": f"/opt/ml/models/{model}/model"},
                             timeout=300)

    def top(model: str) -> list[str] | int:
        answer = requests.post(f"{url}/models/{model}/invoke", data=DOG.read_bytes(), timeout=120,
                               headers={"Content-Type": "image/jpeg"})
        return [p["class_name"] for p in answer.json()["predictions"][0]["top_k"]] if answer.ok else answer.status_code

    try:
        wait_healthy(url, name)
        assert load("a").status_code == 200 and load("b").status_code == 200
        got_a, got_b = top("a"), top("b")
        assert set(got_a) <= set(config["class_names"]) and set(got_b) <= set(renamed), (got_a, got_b)
        bad = load("bad")
        assert bad.status_code == 400 and "config.json lacks" in bad.json()["message"], bad.text
        assert top("a") == got_a
        assert requests.delete(f"{url}/models/a", timeout=60).status_code == 200
        assert top("a") == 404 and top("b") == got_b
    finally:
        engine("rm", "-f", name, check=False)


def test_serving_stops_within_sagemakers_30_s(server):
    url, name, _ = server
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200
    started = time.monotonic()
    engine("stop", "-t", "30", name)
    assert time.monotonic() - started < 30, "serve did not stop on SIGTERM before SageMaker's SIGKILL"


# ---- the documented local flow: make local-train, local-serve, local-predict ---------------------------------
# Ctrl-C on `make local-train` / `make local-serve` (SIGINT to make's process group, as a terminal sends it) must
# stop the container as SageMaker does and remove it within SageMaker's 30 s, and make must exit non-zero.
STOP_S = 30


@pytest.fixture
def make_label():
    """RUN_OPTS for the make targets: a label of this test's own; its containers are removed at teardown."""
    label = f"{LABEL}-case={uuid.uuid4().hex[:12]}"
    yield f"RUN_OPTS=--label {LABEL}={TAG} --label {label}"
    if left := remove_containers(label):
        print(f"\nremoved containers the test left: {left}", file=sys.stderr)


def start_make(log: Path, *args: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(["make", "--no-print-directory", *args, f"DOCKER={ENGINE}", f"IMAGE_PREFIX={PREFIX}"],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=MAKE_ENV)


def ctrl_c(process: subprocess.Popen, log: Path, label: str) -> float:
    """SIGINT to the make's process group; seconds until make has exited and the container is gone."""
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(STOP_S + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"make still running {STOP_S + 30} s after Ctrl-C:\n{log.read_text()[-3000:]}")
    label_filter = f"label={label.split()[-1]}"
    while engine("ps", "-aq", "--filter", label_filter, check=False).stdout.strip():
        assert time.monotonic() - started < STOP_S + 30, f"container not removed:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    return time.monotonic() - started


def kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:  # the test failed before make ended: take make and its script with it
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def test_make_local_train_serve_predict(images, tmp_path, sample_dataset, make_label):
    tree, port = tmp_path / "opt_ml", free_port()
    common = [f"LOCAL_TREE={tree}", f"LOCAL_TAG={TAG}", f"PORT={port}", make_label]
    hps = " ".join(f"{k}={v}" for k, v in {**HPS, "epochs": "1"}.items())
    train = make("local-train", *common, f"DATA={sample_dataset}", f"HPS={hps}", "NETWORK=none", timeout=1200)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "valid_accuracy=" in train.stdout and (tree / "model" / "config.json").is_file()
    log = tmp_path / "serve.log"
    serving = start_make(log, "local-serve", *common)
    try:
        try:
            local.wait_healthy(f"http://127.0.0.1:{port}/ping", 240,
                               lambda: None if serving.poll() is None else f"make exited with {serving.returncode}")
        except local.ServerFailed as e:
            pytest.fail(f"{e}:\n{log.read_text()}")
        published = engine("ps", "--filter", f"label={make_label.split()[-1]}", "--format", "{{.Ports}}").stdout
        assert f"127.0.0.1:{port}->8080" in published, published  # not on every interface
        predict = make("local-predict", *common, f"PREDICT_FILE={DOG}", timeout=120)
        assert predict.returncode == 0, predict.stdout + predict.stderr
        assert json.loads(predict.stdout.strip().splitlines()[-1])["predictions"][0]["top_k"]

        took = ctrl_c(serving, log, make_label)
        assert serving.returncode != 0, log.read_text()[-3000:]
        assert took < STOP_S, f"stopped and removed in {took:.1f} s:\n{log.read_text()[-3000:]}"
        assert "stopped and removed" in log.read_text()
    finally:
        kill_group(serving)


def test_make_local_train_ctrl_c_stops_removes_and_checkpoints(images, tmp_path, sample_dataset, make_label):
    """Ctrl-C in epoch 2: the job gets SIGTERM and writes its checkpoint, the container is removed, make fails."""
    tree = tmp_path / "opt_ml"
    hps = " ".join(f"{k}={v}" for k, v in {**HPS, "epochs": "3", "batch-size": "4"}.items())
    log = tmp_path / "train.log"
    training = start_make(log, "local-train", f"LOCAL_TREE={tree}", f"LOCAL_TAG={TAG}", f"DATA={sample_dataset}",
                          f"HPS={hps}", "NETWORK=none", make_label)
    try:
        deadline = time.monotonic() + 900
        while "epoch=1 " not in log.read_text():
            assert training.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        took = ctrl_c(training, log, make_label)
        assert training.returncode != 0, log.read_text()[-3000:]
        # The job's own shutdown (finish the batch, checkpoint, profiler trace and report) took 18 s of it on 2
        # busy cores; the engine kills it at 30 s, and removing it takes a few more.
        assert took < STOP_S + 10, f"stopped and removed in {took:.1f} s:\n{log.read_text()[-3000:]}"
        assert "stopped by SIGTERM in epoch 2" in (tree / "output" / "failure").read_text(), log.read_text()[-3000:]
        assert (tree / "checkpoints" / "checkpoint.pt").is_file()
    finally:
        kill_group(training)


# ---- layers: a code-only change rebuilds and re-pushes only the package layer ----------------------------------

PACKAGE_LAYERS = 3


def test_code_only_change_keeps_the_dependency_layers(images, tmp_path):
    context = tmp_path / "context"
    context.mkdir()
    for rel in ("pyproject.toml", "README.md", "Makefile", ".dockerignore"):
        shutil.copy2(REPO / rel, context / rel)
    for rel in ("code", "containers", "requirements"):
        shutil.copytree(REPO / rel, context / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (context / "README.md").write_text((context / "README.md").read_text() + "\nAn edit.\n")
    with open(context / "code" / "imgclf" / "errors.py", "a") as f:
        f.write("\n# an edit\n")
    subprocess.run(["git", "init", "-q"], cwd=context, check=True)  # the Makefile reads the sha; any will do
    before = {name: inspect(image(name))["RootFS"]["Layers"] for name in ("train-cpu", "serve")}
    for name in ("train-cpu", "serve"):
        result = subprocess.run(["make", f"build-{name}", f"DOCKER={ENGINE}", f"IMAGE_PREFIX={PREFIX}",
                                 "TAG=edited", *build_args()], cwd=context, capture_output=True, text=True,
                                timeout=1800)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        after = inspect(image(name, "edited"))["RootFS"]["Layers"]
        engine("rmi", image(name, "edited"), check=False)
        # The package is the last PACKAGE_LAYERS layers (COPY pyproject.toml README.md, COPY code, pip install).
        assert len(after) == len(before[name])
        assert after[:-PACKAGE_LAYERS] == before[name][:-PACKAGE_LAYERS], f"{name}: a dependency layer was rebuilt"
        assert after[-1] != before[name][-1], f"{name}: the package layer did not change with the code"


# ---- the cloud workflow in SageMaker's local mode, through the scripts' --local path --------------------------

def script(name: str, *args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=env["HOME"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_scripts_local_mode_train_deploy_predict_batch_delete(images, tmp_path, sample_dataset):
    """train.py, deploy.py, predict.py and batch_predict.py with --local: their own requests go to the SageMaker
    SDK's local clients, which run them on the images with docker-compose. docker-compose stays attached to its
    containers (under podman that spins a core), so the job is tiny: one epoch at 64 px."""
    home, port = tmp_path / "home", free_port()
    (home / ".sagemaker").mkdir(parents=True)
    # The SDK's own local-mode settings: its endpoint's port (default 8080, which something else may hold).
    (home / ".sagemaker" / "config.yaml").write_text(f"local:\n  serving_port: {port}\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "HOME": str(home),
           "PYTHONPATH": str(REPO / "code")}

    hps = [f"--hp={k}={v}" for k, v in {**HPS, "epochs": "1"}.items()]
    train = script("train.py", "--local", "--data", str(sample_dataset), "--image", image("train-cpu"),
                   "--job-name", f"{PREFIX}-local", *hps, env=env)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-4000:]
    model = train.stdout.strip()
    assert model == (home / "sagemaker-local" / f"{PREFIX}-local" / "output" / "model.tar.gz").as_uri()
    assert (home / "reports" / f"{PREFIX}-local" / "metrics.json").is_file()  # the reports, as on AWS

    name = f"{PREFIX}-endpoint"
    with (tmp_path / "deploy.log").open("w") as log:
        deploy = subprocess.Popen([sys.executable, str(REPO / "scripts" / "deploy.py"), "--local", "--name", name,
                                   "--model-data", model, "--image", image("serve"), "--top-k", "2"],
                                  cwd=home, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                  start_new_session=True)
    try:
        assert deploy.stdout.readline().strip() == name, (tmp_path / "deploy.log").read_text()[-4000:]
        predict = script("predict.py", str(DOG), "--local", "--endpoint", name, "--json", env=env, timeout=120)
        assert predict.returncode == 0, predict.stderr[-2000:]
        [prediction] = json.loads(predict.stdout)["predictions"]
        assert len(prediction["top_k"]) == 2  # the model's environment (IMGCLF_TOP_K) reached the container

        photos = tmp_path / "photos"  # the SDK's local mode reads the files directly in the folder
        photos.mkdir()
        originals = [p for p in sorted((sample_dataset / "test").rglob("*")) if p.is_file()][:3]
        for i, path in enumerate(originals):
            shutil.copy(path, photos / f"{i}{path.suffix}")
        batch = script("batch_predict.py", "--local", "--input", str(photos), "--model-data", model,
                       "--image", image("serve"), "--job-name", f"{PREFIX}-batch", env=env)
        assert batch.returncode == 0, batch.stderr[-4000:]
        assert '"BatchStrategy": "SINGLE_RECORD"' in batch.stderr  # serve's /execution-parameters, in batch mode
        summary = Path(batch.stdout.strip())
        assert summary == home / "sagemaker-local" / "batch" / f"{PREFIX}-batch" / "summary.csv"
        rows = list(csv.DictReader(summary.open()))
        assert [r["file"] for r in rows] == [f"{i}{p.suffix}" for i, p in enumerate(originals)]
        assert all(r["class_name"] and 0 < float(r["probability"]) <= 1 and not r["error"] for r in rows), rows
        assert all((summary.parent / f"{r['file']}.out").is_file() for r in rows)
    finally:
        deploy.send_signal(signal.SIGTERM)  # deletes the endpoint, its config and model
        deploy.wait(120)
    assert deploy.returncode == 0, (tmp_path / "deploy.log").read_text()[-4000:]
    assert "deleting local endpoint" in (tmp_path / "deploy.log").read_text()
    running = engine("ps", "--format", "{{.Image}}", check=False).stdout.split()
    assert not [i for i in running if i.split("/")[-1] == image("serve")], running


def test_scripts_local_mode_failed_training_exits_1_with_the_reason(images, tmp_path, sample_dataset):
    """docker-compose 1.x exits 0 when the container fails, and the SDK then calls the job Completed: train.py
    reads the job's output/failure, as SageMaker does, and fails with it."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, "HOME": str(home),
           "PYTHONPATH": str(REPO / "code")}
    train = script("train.py", "--local", "--data", str(sample_dataset), "--image", image("train-cpu"),
                   "--hp", "model=resnet9000", env=env)
    assert train.returncode == 1, train.stderr[-3000:]
    assert "Failed: HyperparameterError: hyperparameter model='resnet9000'" in train.stderr, train.stderr[-3000:]
    assert not train.stdout.strip()  # no model URI for deploy.py to take


# ---- push progress of a real podman push (moved from test_push_images.py: here podman is installed) ----------

def test_push_progress_reads_a_real_podman_push(tmp_path):
    """A real podman push (to a directory: no registry can run here) read by push_images.py's parser
    (imgclf.aws.push.PushProgress). Where the image tests run on podman (DOCKER=podman, or the Docker API of
    containers/podman.sh as in CI), a podman that cannot import or push fails the test."""
    from imgclf.aws.push import PushProgress

    if shutil.which("podman") is None:
        pytest.skip(f"the image tests run on {ENGINE}, a Docker engine with no podman beside it: this test reads "
                    "podman's own push output")
    (tmp_path / "f.txt").write_text("hi")
    with tarfile.open(tmp_path / "layer.tar", "w") as tar:
        tar.add(tmp_path / "f.txt", arcname="f.txt")
    pushed_image = f"localhost/{PREFIX}-push:{TAG}"
    imported = subprocess.run(["podman", "import", str(tmp_path / "layer.tar"), pushed_image], capture_output=True,
                              text=True, timeout=120)
    assert imported.returncode == 0, f"podman import: {imported.stderr[-1000:]}"
    try:
        pushed = subprocess.run(["podman", "push", pushed_image, f"dir:{tmp_path / 'out'}"], capture_output=True,
                                text=True, timeout=120)
    finally:
        subprocess.run(["podman", "rmi", pushed_image], capture_output=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    progress = PushProgress(pushed_image)
    assert any([progress.feed(line) for line in (pushed.stdout + pushed.stderr).splitlines()])
    assert len(progress.layers) == 1  # one blob: the imported layer (the config is no layer)
