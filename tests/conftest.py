"""Shared fixtures: a generated dataset and a model trained once per session by the real `train` entrypoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from unittest import mock

# pytest-xdist runs one test process per core, and each training or server it starts would take one OpenMP thread
# per core as well: two trainings side by side then spin-wait on each other (measured on 2 cores: two 3-epoch
# resnet18 runs 131 s side by side with the default threads, 43 s with one thread each; 37 s for one run alone).
# Set before torch is imported here, and inherited by every process the tests start.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import pytest  # noqa: E402
from imgclf import local, sample_data  # noqa: E402

if TYPE_CHECKING:
    from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, str(REPO / "scripts" / "demo.py")]
# The demo's run is the session's trained model; export-int8: test_export reads the int8 graph the job wrote and
# checked (a run of its own cost 100 s). The demo's 5 epochs make a model sure of its answers: int8 is accepted.
DEMO_HPS = ["--hp", "export-int8=true"]
# Small and fast on 2 CPU cores, and learns the sample data well above chance.
# onnx-exporter=torchscript: torch.onnx's dynamo exporter costs about 3 s more per export, in every training run;
# the export's own tests, the demo's run and the images' training runs keep the default (auto: dynamo first).
FAST_HPS = {"model": "resnet18", "pretrained": "false", "freeze": "none", "augment": "false",
            "image-size": "64", "epochs": "4", "batch-size": "16", "num-workers": "0", "lr": "0.001",
            "onnx-exporter": "torchscript"}
# For runs whose subject is the job's mechanics (resume, ranks, stops, speed options), not the model: timm's
# 0.4 M-parameter ResNet for tests trains 6x faster than resnet18 and writes 1.5 MB instead of 45. (Its int8
# graph is refused: near ties flip.)
TINY_HPS = {**FAST_HPS, "model": "timm/test_resnet", "debugging": "false"}


def local_train(data: Path, output: Path, hps: dict[str, str], weights: Path | None = None,
                timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m imgclf.local train` (the real CLI, which runs the real `train` entrypoint)."""
    cmd = [sys.executable, "-m", "imgclf.local", "train", "--data", str(data), "--output", str(output)]
    for key, value in hps.items():
        cmd += ["--hp", f"{key}={value}"]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def train_in_process(tmp: Path, data: Path | None, hps: dict[str, str], weights: Path | None = None,
                     channels: dict[str, Path] | None = None) -> Path:
    """The training job's own function (`imgclf.training.job.run`) over an /opt/ml tree laid out as local mode
    does, in this process: what the `train` entrypoint runs, without its two interpreter starts. Debugging is off
    unless `hps` turns it on. The channels are `data`'s splits, or `channels`. Checkpoints go to tmp/checkpoints,
    where local mode keeps them (`python -m imgclf.local train --output tmp`). Returns the tree (model/,
    output/data/); raises what the job raises."""
    from imgclf import config, local, splits
    from imgclf.training import job

    hps = {"debugging": "false", **hps}
    base = tmp / "opt_ml"
    channels = dict(channels) if channels is not None else splits.split_channels(data)
    if weights is not None:  # a channel is a folder: this one holds just the file, as local mode's
        channels["weights"] = tmp / "weights_channel"
        channels["weights"].mkdir(parents=True)
        (channels["weights"] / weights.name).symlink_to(weights.resolve())
    local.write_tree(base, hps, channels)
    inputs = base / "input" / "data"
    paths = job.Paths(base / "model", base / "output" / "data", tmp / "checkpoints",
                      {name: str(inputs / name) for name in channels})
    hp = config.parse_hyperparameters(hps)  # the strings write_tree put in hyperparameters.json
    env = {"SAGEMAKER_BASE_DIR": str(base), "IMGCLF_CHECKPOINT_DIR": str(paths.checkpoints)}  # nothing in /opt/ml
    with mock.patch.dict(os.environ, env):
        job.run(hp, paths)
    return base


def random_resnet18_weights(path: Path) -> Path:
    """A file in torchvision's format (1000-class state_dict) with random tensors: no download needed."""
    import torch
    from imgclf import models

    torch.manual_seed(0)
    torch.save(models.build_backbone("resnet18").state_dict(), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    return sample_data.generate(tmp_path_factory.mktemp("data") / "sample", classes=5)


def run_shared(tmp_path_factory, name: str) -> tuple[Path, FileLock]:
    """A folder and its lock that every pytest-xdist worker of this run sees (`make test` runs on every core):
    the first worker to take the lock makes what the folder holds, the others read it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base: each worker has its own folder under it
    return root / name, FileLock(str(root / f"{name}.lock"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(output folder, completed process) of `make demo`'s script, once per test run: the sample data, the real
    `train` and `serve` entrypoints, predictions, the server stopped. Its model is the session's `trained`."""
    out, lock = run_shared(tmp_path_factory, "demo")
    done = out / "completed.json"  # the run's process, written last: a folder without it is a failed try
    with lock:
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            result = subprocess.run([*DEMO, "--output", str(out), *DEMO_HPS], capture_output=True, text=True,
                                    timeout=900)
            assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
            done.write_text(json.dumps({"args": result.args, "stdout": result.stdout, "stderr": result.stderr}))
    run = json.loads(done.read_text())
    return out, subprocess.CompletedProcess(run["args"], 0, run["stdout"], run["stderr"])


@pytest.fixture(scope="session")
def trained(demo_run) -> tuple[Path, subprocess.CompletedProcess]:
    """(output folder, completed process) of the demo's training on the sample data (demo.SAMPLE_HPS: resnet18
    from scratch, 64 px, 5 epochs; data equal to `sample_dataset`'s): model.tar.gz, model/, reports/."""
    return demo_run[0] / "train", demo_run[1]


SERVED_PAYLOAD_MB = 1  # small, so that over-size requests stay small


@pytest.fixture(scope="session")
def served(trained, tmp_path_factory):
    """The session's one shared model server (`python -m imgclf.local serve --ui` on the trained model.tar.gz, 2
    workers, top_k 3 by default): the read-only serving and page tests use it; those that kill workers or need
    other settings start their own. Stopped at the end, and it must stop cleanly."""
    from tests.hostile import BODY_TIMEOUT_S

    env = {"IMGCLF_TOP_K": "3", "SAGEMAKER_MAX_PAYLOAD_IN_MB": str(SERVED_PAYLOAD_MB),
           "IMGCLF_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    with local.serving(trained[0] / "model.tar.gz", workers=2, ui=True, env=env,
                       log=tmp_path_factory.mktemp("served") / "server.log") as server:
        yield server
        leftovers = server.stop()
        assert not leftovers, f"server processes survived SIGTERM: {leftovers}"


@pytest.fixture(scope="session")
def moto_server():
    """A real moto HTTP server on 127.0.0.1; yields its URL. Scripts reach it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(moto_server, monkeypatch) -> dict[str, str]:
    """Environment for a script subprocess talking to the moto server with dummy credentials."""
    import os

    env = {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return {**os.environ, **env}


# The tier is the folder (`make test-unit`, `make test`, `make test-images`): tests/unit runs in-process only
# (tests/unit/conftest.py refuses processes and non-loopback sockets), tests/integration runs the real
# entrypoints, servers, scripts and moto, tests/images builds and runs the images. Each test gets its tier as a
# marker, so `-m unit` works from anywhere too.
TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "images")


def pytest_collection_modifyitems(items):
    for item in items:
        tier = Path(item.path).resolve().relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in tests/unit (in-process), tests/integration "
                                    "(processes, servers, moto) or tests/images (the built images)")
        item.add_marker(getattr(pytest.mark, tier))
    # Modules marked `long` (minutes of training runs) go first, and test_demo.py before them: its run is the
    # session's trained model, which half the long modules wait for. pytest-xdist hands out whole files in this
    # order (`make test` turns off its own reordering by test count): a long one handed out last would leave the
    # other workers idle at the end; the unit tier's seconds-long files go last, to fill that end.
    items.sort(key=lambda item: (item.get_closest_marker("long") is None, item.path.name != "test_demo.py",
                                 item.get_closest_marker("unit") is not None))


# In CI (CI=true) a skip because something is missing (an engine, a program, a package) would turn a broken
# environment into a green run: such a skip fails there. Skips for other reasons (the image tests outside
# `make test-images`, an empty parameter list) stay skips. tests/integration/test_ci_skips.py runs this on real skips.
MISSING = re.compile(r"not found|not installed|cannot import|could not import|no module named|"
                     r"not on path|no (podman|docker|java|chromium|container engine)\b|\bmissing\b", re.I)


def fails_in_ci(reason: str) -> bool:
    return os.environ.get("CI") == "true" and MISSING.search(reason) is not None


def _fail_missing_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if fails_in_ci(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: a skip for something missing fails here (install it); skip reason: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_missing_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level pytest.skip or importorskip
    _fail_missing_skip(report)
    return report
