"""`make demo`'s script end to end (data -> train -> serve -> predict -> stop), and a failing step."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DEMO

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py


def test_demo_end_to_end(demo_run, sample_dataset):
    """The session's demo run (tests/conftest.py: `make demo`'s script, plus export-int8 for test_export)."""
    output, result = demo_run
    out = result.stdout
    for step in ("[1/5] data", "[2/5] train", "[3/5] serve", "[4/5] predict", "[5/5] stop the server"):
        assert step in out
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", out).group(1))
    assert accuracy >= 0.5  # 5 breeds: chance is 0.2
    # three images, each with a top-3 table from the real server
    assert len(re.findall(r"^  1\. .+%  \(class \d: \d{3}\.\w+\)$", out, re.M)) == 3
    assert len(re.findall(r"^  3\. ", out, re.M)) == 3
    assert (output / "train" / "model.tar.gz").is_file()
    assert "demo finished: every step worked" in out
    # the sample data it generated is the tests' own sample_dataset (the serving tests compare the two)
    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.jpg")}

    assert files(output / "data") == files(sample_dataset)
    # the server is gone: nothing listens on its port any more
    port = int(re.search(r"server ready at http://127.0.0.1:(\d+)", out).group(1))
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_demo_names_the_failing_step(tmp_path, sample_dataset):
    bad = tmp_path / "nodata"
    (bad / "train").mkdir(parents=True)
    result = subprocess.run([*DEMO, "--output", str(tmp_path / "a"), "--data", str(bad)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "demo failed at step 1/5 (data):" in result.stderr and "valid" in result.stderr

    result = subprocess.run([*DEMO, "--output", str(tmp_path / "b"), "--data", str(sample_dataset),
                             "--model", "resnet18", "--hp", "epochs=zero"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "demo failed at step 2/5 (train): HyperparameterError:" in result.stderr
    assert "epochs='zero': expected int" in result.stderr
    assert not Path(tmp_path / "b" / "train" / "model.tar.gz").exists()
