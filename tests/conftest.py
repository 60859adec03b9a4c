"""Shared fixtures: a generated dataset and a model trained once per session by the real `train` entrypoint."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from imgclf import sample_data

REPO = Path(__file__).resolve().parents[1]
# Small and fast on 2 CPU cores, and learns the sample data well above chance.
FAST_HPS = {"model": "resnet18", "pretrained": "false", "freeze": "none", "augment": "false",
            "image-size": "64", "epochs": "4", "batch-size": "16", "num-workers": "0", "lr": "0.001"}


def local_train(data: Path, output: Path, hps: dict[str, str], weights: Path | None = None,
                timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m imgclf.local train` (the real CLI, which runs the real `train` entrypoint)."""
    cmd = [sys.executable, "-m", "imgclf.local", "train", "--data", str(data), "--output", str(output)]
    for key, value in hps.items():
        cmd += ["--hp", f"{key}={value}"]
    if weights is not None:
        cmd += ["--weights", str(weights)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    return sample_data.generate(tmp_path_factory.mktemp("data") / "sample", classes=5)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, sample_dataset) -> tuple[Path, subprocess.CompletedProcess]:
    """(output folder, completed process) of one real training run on the sample data."""
    out = tmp_path_factory.mktemp("trained")
    result = local_train(sample_dataset, out, FAST_HPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


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


# Tests that train, serve or build are `slow`: `make test-fast` (pytest -m "not slow and not images") skips them:
# those that use these fixtures, and every test of the modules that train or start servers themselves.
SLOW_FIXTURES = {"trained", "server", "ddp_run", "diverged", "images"}
SLOW_MODULES = {"test_train", "test_distributed", "test_tune_local", "test_demo", "test_bench_smoke", "test_features",
                "test_timm", "test_ui", "test_serving_health", "test_report", "test_containers", "test_accel"}


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
