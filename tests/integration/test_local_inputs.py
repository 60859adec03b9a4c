"""`python -m imgclf.local` with bad input exits 2 with one `error:` line before anything runs or is created, and a
training run that fails, is interrupted or writes no model leaves the model and reports of an earlier run in the
same --output as they were. In process (local.main) except where a signal is the subject."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from unittest import mock

import pytest
from imgclf import local, sample_data
from imgclf.processes import free_port

from tests.conftest import TINY_HPS

HPS = [arg for key, value in {**TINY_HPS, "epochs": "1", "image-size": "32", "batch-size": "8"}.items()
       for arg in ("--hp", f"{key}={value}")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return sample_data.generate(tmp_path_factory.mktemp("inputs") / "data", classes=3,
                                per_split={"train": 6, "valid": 3, "test": 3}, size=64)


@pytest.fixture(scope="module")
def tiny_run(data, tmp_path_factory) -> Path:
    """An --output folder of one successful tiny run (tests that rerun into it copy it first)."""
    output = tmp_path_factory.mktemp("trained") / "out"
    assert local.main(["train", "--data", str(data), "--output", str(output), *HPS]) == 0
    return output


def snapshot(output: Path) -> dict[str, str]:
    """model.tar.gz, model/ and reports/: path -> digest."""
    files = [output / "model.tar.gz", *(output / "model").rglob("*"), *(output / "reports").rglob("*")]
    return {str(p.relative_to(output)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def copy_of(run: Path, tmp_path: Path) -> Path:
    return shutil.copytree(run, tmp_path / "out", symlinks=True)


def fake_train(tmp_path: Path, body: str) -> Path:
    """A `train` entrypoint that runs `body` with `base` (SAGEMAKER_BASE_DIR, a Path) and exits 0."""
    script = tmp_path / "train"
    script.write_text(f"#!{sys.executable}\nimport os, pathlib\nbase = pathlib.Path(os.environ['SAGEMAKER_BASE_DIR'])\n"
                      f"{body}\n")
    script.chmod(0o755)
    return script


def test_bad_output_or_hyperparameters_exit_2_before_anything_runs(data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    layouts = {"model": "file", "reports": "file", "checkpoints": "file", "tensorboard": "file",
               "model.tar.gz": "folder", "failure": "folder"}
    cases: dict[str, tuple[list[str], str]] = {
        "a file": (["--output", str(afile)], f"error: --output {afile}: is a file; give a folder"),
        "under a file": (["--output", str(afile / "out")], f"error: --output {afile / 'out'}: cannot create it"),
        "bad value": (["--output", str(tmp_path / "o1"), "--hp", "epochs=0"],
                      "error: hyperparameter epochs=0: must be between 1 and 1000"),
        "unknown name": (["--output", str(tmp_path / "o1"), "--hp", "colour=red"],
                         "error: unknown hyperparameter(s) colour; known: lr,"),
        "bad file": (["--output", str(tmp_path / "o1"), "--hyperparameters", str(afile)],
                     f"error: --hyperparameters {afile}: cannot read a JSON object"),
    }
    for name, kind in layouts.items():
        out = tmp_path / f"with-{name}"
        out.mkdir()
        (out / name).mkdir() if kind == "folder" else (out / name).write_text("")
        cases[name] = (["--output", str(out)], f"error: --output {out}: {name} is a {kind}, not a")
    for case, (args, message) in cases.items():
        before = sorted(p.name for p in tmp_path.rglob("*"))
        assert local.main(["train", "--data", str(data), *HPS, *args]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, (case, err)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, case  # nothing created
    assert afile.read_text() == "keep me"


def test_a_failed_rerun_keeps_the_earlier_model_and_reports(data, tiny_run, tmp_path, capsys):
    """The job fails (weights that do not load): OUTPUT/failure and the message say why, naming the user's --weights
    folder (not the temporary tree's); its reports go to failed-reports/. A folder given as --weights is the
    channel as it is: not its parent, whose weight files would make the job refuse an ambiguous channel."""
    out = copy_of(tiny_run, tmp_path)
    before = snapshot(out)
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "backbone.pth").write_bytes(b"not a state_dict")  # the folder's one file, whatever its name
    for decoy in ("a.pth", "b.pth"):
        (tmp_path / decoy).write_bytes(b"decoy")
    code = local.main(["train", "--data", str(data), "--output", str(out), *HPS,
                       "--hp", "pretrained=true", "--weights", str(weights)])
    err = capsys.readouterr().err
    assert code == 1, err
    failure = (out / "failure").read_text()
    assert failure.startswith(f"WeightsError: weights file {weights / 'backbone.pth'} "), failure
    assert f"training failed (exit 1): {failure.splitlines()[0]}\n" in err
    assert f"reason in {out / 'failure'}; this run's reports in {out / 'failed-reports'}; the earlier model" in err
    assert ".opt_ml" not in failure + err
    assert snapshot(out) == before
    assert (out / "failed-reports").is_dir()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the run's tree is gone


def test_a_run_that_exits_0_without_a_model_is_a_failure_and_a_success_replaces_all(data, tiny_run, tmp_path,
                                                                                     capsys, monkeypatch):
    """What Ctrl-C did once (the toolkit exited 0 with an empty model folder): exit 1 and nothing replaced; so too
    when the results cannot be written (a full disk). The next successful run replaces model.tar.gz, model/ and
    reports/, and clears the failure's files."""
    out = copy_of(tiny_run, tmp_path)
    before = snapshot(out)
    monkeypatch.setattr(local, "venv_bin", lambda name: str(fake_train(tmp_path, "(base / 'model' / 'x').touch()")))
    assert local.main(["train", "--data", str(data), "--output", str(out), *HPS]) == 1
    err = capsys.readouterr().err
    assert "training failed (exit 0): the run ended without writing a model (config.json and model.safetensors)" \
           in err, err
    assert snapshot(out) == before and (out / "failure").is_file()

    writes = ("(base / 'model' / 'config.json').write_text('{}')\n(base / 'model' / 'model.safetensors')"
              ".write_text('new')\n(base / 'output' / 'data' / 'metrics.json').write_text('{\"new\": 1}')")
    monkeypatch.setattr(local, "venv_bin", lambda name: str(fake_train(tmp_path, writes)))
    with mock.patch.object(local, "pack_model", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        assert local.main(["train", "--data", str(data), "--output", str(out), *HPS]) == 1
    assert "training succeeded, but its results could not be put in" in capsys.readouterr().err
    assert snapshot(out) == before

    assert local.main(["train", "--data", str(data), "--output", str(out), *HPS]) == 0
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in (out / "reports").iterdir()] == ["metrics.json"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "model", "model.tar.gz", "reports"]
    with tarfile.open(out / "model.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["config.json", "model.safetensors"]


def test_ctrl_c_keeps_the_earlier_model(data, tiny_run, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) in the middle of a run: exit non-zero, the earlier model and
    reports as they were, and the reason in OUTPUT/failure."""
    out = copy_of(tiny_run, tmp_path)
    before = snapshot(out)
    shutil.rmtree(out / "checkpoints")  # a run that trains again
    hps = [*HPS, "--hp", "epochs=50"]
    proc = subprocess.Popen([sys.executable, "-m", "imgclf.local", "train", "--data", str(data),
                             "--output", str(out), *hps], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "epoch=1 " in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[0]
    assert "epoch=1 " in "".join(seen), "".join(seen)[-3000:]
    assert proc.returncode not in (0, None), rest[-3000:]
    assert "training failed" in rest and (out / "failure").is_file()
    assert snapshot(out) == before


def test_serve_refuses_bad_input_before_starting(tiny_run, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        cases = {
            "workers": (["--model", str(tiny_run), "--port", "8191", "--workers", "-1"],
                        "error: --workers: SAGEMAKER_MODEL_SERVER_WORKERS=-1: must be 0-1024"),
            "no config": (["--model", str(empty), "--port", "8191"], f"error: --model {empty}: its config.json is "
                                                                     "missing: the model directory must be"),
            "busy port": (["--model", str(tiny_run), "--port", str(port)],
                          f"error: --port {port}: cannot listen there (Address already in use); pick another --port"),
        }
        for case, (args, message) in cases.items():
            assert local.main(["serve", *args]) == 2, case
            err = capsys.readouterr().err
            assert err.startswith(message) and err.count("\n") == 1, (case, err)
    monkeypatch.setenv("IMGCLF_TOP_K", "0")  # serve's own settings check
    assert local.main(["serve", "--model", str(tiny_run), "--port", "8191"]) == 2
    assert capsys.readouterr().err == "error: IMGCLF_TOP_K=0: must be at least 1\n"


def test_serve_takes_a_training_output_folder(tiny_run, monkeypatch):
    """--model OUTPUT serves OUTPUT/model (the `serve` entrypoint replaced by a stand-in that lists its model)."""
    seen = {}

    def stand_in(cmd, env):
        model = Path(env["SAGEMAKER_BASE_DIR"]) / "model"
        seen.update(files=sorted(p.name for p in model.iterdir()), workers=env["SAGEMAKER_MODEL_SERVER_WORKERS"])
        return 0

    monkeypatch.setattr(local, "run_forwarding_signals", stand_in)
    assert local.main(["serve", "--model", str(tiny_run), "--port", "8191", "--workers", "2"]) == 0
    assert seen == {"files": ["config.json", "model.onnx", "model.safetensors"], "workers": "2"}
