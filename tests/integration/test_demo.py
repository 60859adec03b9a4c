"""`make demo`'s script end to end (data -> train -> serve -> predict -> stop), and a failing step."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from imgclf.cli import demo as demo_cli

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


def test_demo_refuses_bad_options_and_data_before_anything_runs(tmp_path, capsys):
    """Bad input exits 2 with one `error:` line, and nothing is trained or created (docs/aws.md's exit codes)."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    (tmp_path / "nodata" / "train").mkdir(parents=True)
    out = tmp_path / "out"
    cases = {
        ("--images", "0"): "error: --images 0: give 1 or more test images to send",
        ("--port", "70000"): "error: --port 70000: multi-model-server takes ports 1-32767",
        ("--startup-timeout", "-1"): "error: --startup-timeout -1: give the seconds to wait for the server, above 0",
        ("--hp", "foo"): "error: --hp 'foo': write NAME=VALUE",
        ("--hp", "epochs=zero"): "error: hyperparameter epochs='zero': expected int",
        ("--weights", str(tmp_path / "none.pth")): f"error: --weights {tmp_path / 'none.pth'}: no such file",
        ("--data", str(tmp_path / "nodata")): f"error: --data {tmp_path / 'nodata'}: expected sub-folders train/ "
                                              "and valid/",
        ("--output", str(afile)): f"error: --output {afile}: is a file; give a folder",
    }
    for args, message in cases.items():
        assert demo_cli.main(["--output", str(out), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, (args, err)
        assert not out.exists(), args
    assert afile.read_text() == "keep me"


def test_demo_names_the_failing_step(tmp_path, sample_dataset, capfd):
    """A step that fails once the input is good: its number and the reason (weights that the job cannot read)."""
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"not a state_dict")
    code = demo_cli.main(["--output", str(tmp_path / "b"), "--data", str(sample_dataset), "--model", "resnet18",
                          "--weights", str(weights), "--hp", "image-size=32"])
    err = capfd.readouterr().err
    assert code == 2, err[-3000:]
    assert f"demo failed at step 2/5 (train): WeightsError: weights file {weights} " in err
    assert (tmp_path / "b" / "train" / "failure").is_file()
    assert not (tmp_path / "b" / "train" / "model.tar.gz").exists()
