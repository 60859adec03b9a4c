"""What the image tests share (tests/images/test_images.py, tests/images/test_sdk.py, ...): the engine, the names of
the test images, the session's `images` fixture, which builds them once for every module and removes them, and
every container the tests left, at the end; detached container runs, and the one model the serving tests serve
(`trained_tree`).

IMGCLF_TEST_TAG=<tag> reuses images built beforehand (`make build IMAGE_PREFIX=imgclf-test TAG=<tag> ...`, the
same PYTHON_IMAGE and TORCH_SOURCE) instead of building them, and keeps them afterwards: for rerunning the image
tests without the builds' minutes. Only the containers are removed then; the labels test still compares the images'
revision with HEAD, so rebuild after a commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from imgclf import local

from tests.conftest import FAST_HPS, REPO

ENGINE = os.environ.get("DOCKER") or "docker"
REUSE_TAG = os.environ.get("IMGCLF_TEST_TAG")
PREFIX, TAG = os.environ.get("IMGCLF_TEST_PREFIX") or "imgclf-test", REUSE_TAG or f"t{uuid.uuid4().hex[:8]}"
TORCH_SOURCE = os.environ.get("TORCH_SOURCE") or "cpu"
IMAGE_NAMES = ("train-cpu", "train-gpu", "serve", "serve-gpu")
# Every container a test starts carries LABEL=TAG (the make tests' also a label of their own), so that teardown
# finds and removes it whatever happened in the test, and no failure leaves one behind for the next test.
LABEL = "imgclf-test"


def _engine_problem() -> str | None:
    if shutil.which(ENGINE.split()[0]) is None:
        return f"no {ENGINE} command on PATH"
    try:
        info = subprocess.run([*ENGINE.split(), "info"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return f"`{ENGINE} info` did not answer in 60 s"
    return None if info.returncode == 0 else f"no container engine ({(info.stderr or info.stdout)[-300:]})"


def require_image_tests() -> None:
    """At the top of each image test module: skip it outside `make test-images`, fail it without an engine."""
    if not os.environ.get("IMGCLF_IMAGE_TESTS"):
        pytest.skip("builds the four images (minutes): run them with make test-images", allow_module_level=True)
    if problem := _engine_problem():
        pytest.fail(f"{problem}: make test-images needs Docker or podman (containers/podman.sh)", pytrace=False)


def engine(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*ENGINE.split(), *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{ENGINE} {' '.join(args[:4])} ... exit {result.returncode}:\n{result.stdout[-3000:]}"
                    f"\n{result.stderr[-3000:]}")
    return result


def image(name: str, tag: str = TAG) -> str:
    return f"{PREFIX}-{name}:{tag}"


# make's own variables: under `make test-images` they would make these makes print "Entering directory" lines.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def make(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args, f"DOCKER={ENGINE}", f"IMAGE_PREFIX={PREFIX}"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=MAKE_ENV)


def build_args() -> list[str]:
    return [f"TORCH_SOURCE={TORCH_SOURCE}"] + ([f"PYTHON_IMAGE={os.environ['PYTHON_IMAGE']}"]
                                               if os.environ.get("PYTHON_IMAGE") else [])


# The builds' peak on the engine's disk with TORCH_SOURCE=pypi: the torch stage's wheels, their 5.5 GB install and
# its commit (measured: 22.1 GB above the start, while the serving image builds beside it); the layers above it
# need less. The GPU serving image adds its 3.8 GB (CUDA and cuDNN wheels) and their install.
BUILD_DISK_GB = 28


def dangling() -> set[str]:
    return set(engine("images", "-q", "--no-trunc", "--filter", "dangling=true").stdout.split())


def check_disk() -> None:
    """Fail before a build that would stop half-way with `no space left on device` (and leave its layers)."""
    root = engine("info", "--format", "{{.DockerRootDir}}", check=False).stdout.strip()
    if root and Path(root).is_dir():  # a local engine: its storage is on this machine's disk
        free = shutil.disk_usage(root).free / 2**30
        if free < BUILD_DISK_GB:
            pytest.fail(f"{root} has {free:.1f} GB free; building the four images needs about {BUILD_DISK_GB} GB. "
                        f"Free some: `{ENGINE} image prune` (untagged images), `{ENGINE} rmi` old imgclf tags",
                        pytrace=False)


def check_reused_images() -> None:
    missing = [image(n) for n in IMAGE_NAMES if engine("image", "inspect", image(n), check=False).returncode != 0]
    if missing:
        pytest.fail(f"IMGCLF_TEST_TAG={TAG}: no image {', '.join(missing)}; build them first: make build "
                    f"IMAGE_PREFIX={PREFIX} TAG={TAG} {' '.join(build_args())} (or unset IMGCLF_TEST_TAG)",
                    pytrace=False)


def remove_image_containers() -> list[str]:
    """Remove every container, running or not, of a test image (the SDK's: docker-compose and docker-py name and
    label them themselves); their IDs."""
    ours = {image(n) for n in IMAGE_NAMES}
    found = []
    for line in engine("ps", "-a", "--format", "{{.ID}} {{.Image}}", check=False).stdout.splitlines():
        cid, _, used = line.partition(" ")
        if used.split("/")[-1] in ours:
            engine("rm", "-f", cid, check=False)
            found.append(cid)
    return found


@pytest.fixture(scope="session")
def images():
    """All four images, built by the Makefile target users run; removed, with the test containers and the
    untagged build-stage images the builds left, at the end (with IMGCLF_TEST_TAG: reused and kept)."""
    if REUSE_TAG:
        check_reused_images()
        try:
            yield
        finally:
            remove_containers(f"{LABEL}={TAG}")
            remove_image_containers()
        return
    check_disk()
    before = dangling()
    started = time.monotonic()
    try:
        build = make("build", f"TAG={TAG}", *build_args())
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-5000:]
        print(f"\nbuilt the four images in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield
    finally:
        # Containers first: ours by label, the SDK's (docker-compose labels them itself) by image name.
        remove_containers(f"{LABEL}={TAG}")
        remove_image_containers()
        for name in IMAGE_NAMES:
            engine("rmi", image(name), image(name, "latest"), check=False)
        # The deps and weights stages of the multi-stage builds stay as untagged images (7 GB each with PyPI's
        # torch, mostly shared), as do a failed build's layers: remove those this run made, not the user's own.
        if left := dangling() - before:
            engine("rmi", *left, check=False)


def remove_containers(label: str) -> list[str]:
    """Remove every container, running or not, that carries label (KEY=VALUE); their names."""
    found = engine("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}", check=False).stdout.split()
    if found:
        engine("rm", "-f", *found, check=False)
    return found


# ---- what the modules that run containers share: detached runs, and one trained model ------------------------
# Small and fast, and still several steps per epoch, so a stop lands inside one.
HPS = {**FAST_HPS, "epochs": "2", "onnx-exporter": "auto"}  # the image's onnxscript: dynamo first


def make_tree(tree: Path, data: Path, hps: dict[str, str]) -> Path:
    cmd = [sys.executable, str(REPO / "containers/local_tree.py"), str(tree), "--data", str(data)]
    subprocess.run(cmd + [f"--hp={k}={v}" for k, v in hps.items()], check=True, capture_output=True)
    return tree


def run_detached(img: str, *args: str, tree: Path | None = None, name: str | None = None,
                 options: tuple[str, ...] = ()) -> str:
    name = name or f"{PREFIX}-{uuid.uuid4().hex[:8]}"
    mounts = ("-v", f"{tree}:/opt/ml") if tree else ()
    engine("run", "-d", "--name", name, "--label", f"{LABEL}={TAG}", "--shm-size", "1g", "--hostname", "algo-1",
           *mounts, *options, img, *args)
    return name


def finish(name: str, timeout: float = 1200) -> tuple[int, str]:
    """Wait for a detached container to end: (exit status, its output); the container is removed.
    Polls `inspect`: under podman, a `wait` client held open makes the API service spin a core."""
    try:
        deadline = time.monotonic() + timeout
        while engine("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true":
            assert time.monotonic() < deadline, f"{name} still running after {timeout} s"
            time.sleep(1)
        status = int(engine("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
        logs = engine("logs", name, check=False)
        return status, logs.stdout + logs.stderr
    finally:
        engine("rm", "-f", name, check=False)



@pytest.fixture(scope="session")
def trained_tree(images, tmp_path_factory, sample_dataset):
    """One training run of train-cpu over a mounted tree, shared by the serving tests of both serving images:
    (tree, exit status, output). Its model folder is mounted read-only; a test that changes a model copies it."""
    tree = make_tree(tmp_path_factory.mktemp("train-cpu") / "opt_ml", sample_dataset, HPS)
    status, logs = finish(run_detached(image("train-cpu"), "train", tree=tree))
    return tree, status, logs


def wait_healthy(url: str, name: str, timeout: float = 240) -> float:
    try:
        return local.wait_healthy(f"{url}/ping", timeout)
    except local.ServerFailed as e:
        pytest.fail(f"{e}:\n{engine('logs', name, check=False).stderr[-5000:]}")
