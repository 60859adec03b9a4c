"""The CPU images in a Docker engine (make test-docker): build, `train` on generated data, `serve` + /invocations.

This is AWS's bring-your-own-container check, automated: `docker run -v TREE:/opt/ml IMAGE train`, then
`docker run -p 8080:8080 -v TREE:/opt/ml IMAGE serve` and a POST to /invocations. It needs a Docker engine
and builds images for minutes, so it runs only under `make test-docker` (IMGCLF_DOCKER_TESTS=1); anywhere
else it is skipped with the reason. The rest of the suite checks the Dockerfiles without an engine
(tests/test_containers.py) and runs the same entrypoints as host processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import FAST_HPS, PHOTOS, REPO, free_port

pytestmark = pytest.mark.docker
PREFIX, TAG = "imgclf-pytest", f"t{uuid.uuid4().hex[:8]}"


def engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker command on PATH"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                              timeout=60)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer in 60 s"
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"no Docker engine ({lines[-1] if lines else 'docker info failed'})"
    return None


_problem = engine_problem()
if _problem:
    pytest.skip(f"{_problem}: the image tests need a running Docker engine (make test-docker)",
                allow_module_level=True)
if not os.environ.get("IMGCLF_DOCKER_TESTS"):
    pytest.skip("builds the images (minutes): run them with make test-docker", allow_module_level=True)


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:3])} ... exit {result.returncode}:\n{result.stdout[-3000:]}"
                    f"\n{result.stderr[-3000:]}")
    return result


def image(name: str) -> str:
    return f"{PREFIX}-{name}:{TAG}"


@pytest.fixture(scope="module")
def images():
    """Both CPU images, built through the Makefile target users run; removed afterwards."""
    build = subprocess.run(["make", "build", "IMAGES=train-cpu serve", f"IMAGE_PREFIX={PREFIX}", f"TAG={TAG}"],
                           cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
    yield
    for name in ("train-cpu", "serve"):
        docker("rmi", image(name), f"{PREFIX}-{name}:latest", check=False)


def make_tree(tree: Path, data: Path, hps: dict[str, str]) -> Path:
    cmd = [sys.executable, str(REPO / "containers/local_tree.py"), str(tree), "--data", str(data)]
    subprocess.run(cmd + [f"--hp={k}={v}" for k, v in hps.items()], check=True, capture_output=True)
    return tree


def give_back(tree: Path) -> None:
    """The containers run as root (as on SageMaker): hand their files back so pytest can clean up."""
    if os.getuid() != 0:
        docker("run", "--rm", "--entrypoint", "chown", "-v", f"{tree}:/opt/ml", image("serve"),
               "-R", f"{os.getuid()}:{os.getgid()}", "/opt/ml", check=False)


@pytest.fixture(scope="module")
def trained_tree(images, tmp_path_factory, sample_dataset):
    tree = make_tree(tmp_path_factory.mktemp("docker") / "opt_ml", sample_dataset, {**FAST_HPS, "epochs": "2"})
    result = docker("run", "--rm", "-v", f"{tree}:/opt/ml", image("train-cpu"), "train", timeout=1800, check=False)
    yield tree, result
    give_back(tree)


def test_images_are_configured_for_sagemaker(images):
    train = json.loads(docker("image", "inspect", image("train-cpu")).stdout)[0]["Config"]
    assert "SAGEMAKER_TRAINING_MODULE=imgclf.train:main" in train["Env"]
    serve = json.loads(docker("image", "inspect", image("serve")).stdout)[0]["Config"]
    assert serve["Entrypoint"] == ["serve"]
    assert serve["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    probe = ("import shutil, torch; assert torch.__version__.endswith('+cpu'), torch.__version__; "
             "assert shutil.which('gcc') is None; print(torch.__version__)")
    for name in ("train-cpu", "serve"):
        docker("run", "--rm", "--entrypoint", "python", image(name), "-c", probe)
    docker("run", "--rm", "--entrypoint", "sh", image("serve"), "-c", "java -version && command -v multi-model-server")


def test_train_writes_the_model(trained_tree):
    tree, result = trained_tree
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tree / "model" / "config.json").is_file() and (tree / "model" / "model.safetensors").is_file()
    assert not (tree / "output" / "failure").exists()


def test_train_failure_exits_non_zero_with_a_reason(images, tmp_path, sample_dataset):
    tree = make_tree(tmp_path / "opt_ml", sample_dataset, {**FAST_HPS, "model": "resnet9000"})
    try:
        result = docker("run", "--rm", "-v", f"{tree}:/opt/ml", image("train-cpu"), "train", check=False)
        assert result.returncode != 0
        assert "resnet9000" in (tree / "output" / "failure").read_text()
    finally:
        give_back(tree)


def test_serve_answers_ping_and_invocations(trained_tree):
    tree, result = trained_tree
    assert result.returncode == 0, "training failed; see test_train_writes_the_model"
    port = free_port()
    name = f"imgclf-pytest-serve-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:8080", "-v", f"{tree}:/opt/ml",
           image("serve"), "serve")
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, docker("logs", name, check=False).stderr[-5000:]
            time.sleep(2)
        photos = sorted((PHOTOS / "dogs").rglob("*.jpg")) or sorted((tree / "input/data/test").rglob("*.jpg"))
        request = urllib.request.Request(f"{url}/invocations", data=photos[0].read_bytes(), method="POST",
                                         headers={"Content-Type": "image/jpeg", "Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        classes = json.loads((tree / "model/config.json").read_text())
        top = answer["predictions"][0]["top_k"]
        assert top and 0 <= top[0]["probability"] <= 1 and top[0]["label"] in json.dumps(classes)
        bad = urllib.request.Request(f"{url}/invocations", data=b"not an image", method="POST",
                                     headers={"Content-Type": "image/jpeg"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=60)
        assert 400 <= err.value.code < 500
    finally:
        started = time.monotonic()
        docker("stop", "-t", "30", name, check=False)
        assert time.monotonic() - started < 30, "serve did not stop on SIGTERM within SageMaker's 30 s"
