"""Model files any user can read (the atomic writer, model.tar.gz), and the epoch selection and export check that
keep a diverged model from being written or exported. In-process: no training, no server."""

from __future__ import annotations

import contextlib
import math
import os
import stat
import tarfile
from pathlib import Path

import pytest
import torch
from imgclf import artifacts, atomic, config, export, local, models
from imgclf.errors import ExportError, TrainingDiverged
from imgclf.preprocessing import Preprocessing
from imgclf.training.checkpoint import State
from imgclf.training.evaluate import Evaluation
from imgclf.training.loop import check_selected, select_best


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set a umask for the test, restore the process's afterwards."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=oct)
def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    artifacts.save_model(tmp_path, torch.nn.Linear(1, 1), {"architecture": "linear"})  # safetensors makes 0600
    atomic.write_bytes(tmp_path / "model.bin", b"\0" * 10)
    artifacts.torch_save(tmp_path / "checkpoint.pt", {"w": torch.zeros(2)})
    with atomic.atomic_path(tmp_path / "replaced") as tmp:
        tmp.unlink()
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))  # a writer that replaces the file with its own
    written = [artifacts.WEIGHTS_FILE, artifacts.CONFIG_FILE, "model.bin", "checkpoint.pt", "replaced"]
    for name in written:
        assert mode(tmp_path / name) == mode(plain) == 0o666 & ~mask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*written, "plain.txt"])  # no temporary left


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic.atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_text("half")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_model_tarball_members_are_readable_by_anyone(tmp_path, umask):
    umask(0o077)  # the packed folder's own modes must not matter
    model = tmp_path / "model"
    (model / "code").mkdir(parents=True)
    atomic.write_json(model / "config.json", {"a": 1})
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    (model / "code" / "notes.txt").write_text("z")
    assert mode(model / "config.json") == mode(model / "model.safetensors") == 0o600
    umask(0o022)
    local.pack_model(model, tmp_path / "model.tar.gz")
    with tarfile.open(tmp_path / "model.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"code", "code/notes.txt", "config.json", "model.safetensors"}
        assert {name: m.mode for name, m in members.items()} == {
            "code": 0o755, "code/notes.txt": 0o644, "config.json": 0o644, "model.safetensors": 0o644}
        assert tar.extractfile("config.json").read() == (model / "config.json").read_bytes()
    assert mode(tmp_path / "model.tar.gz") == 0o644


# --- a diverged run is never selected, and fails the job -------------------------------------------------------

HP = config.parse_hyperparameters({"lr": "1"})


def run_epochs(losses_and_accuracies: list[tuple[float, float]], select_by: str = "accuracy",
               ) -> tuple[State, dict | None]:
    """select_best over epochs of the given (validation loss, accuracy); the weights record their epoch."""
    state, best, model = State(), None, torch.nn.Linear(1, 1)
    for loss, accuracy in losses_and_accuracies:
        torch.nn.init.constant_(model.bias, state.epoch + 1)
        valid = Evaluation(loss, accuracy, torch.zeros(2, 2, dtype=torch.long))
        state.history.append({"epoch": state.epoch + 1, "valid_loss": loss, "valid_accuracy": accuracy})
        best = select_best(state, valid, model, best, select_by)
        state.next_epoch()
    return state, best


def test_accuracy_ties_keep_the_epoch_with_the_lower_validation_loss(caplog):
    # 28 validation images: accuracy moves in steps of 1/28, and the loss keeps falling after it stops moving.
    epochs = [(0.90, 0.75), (0.81, 0.875), (0.70, 0.875), (0.62, 0.857), (0.55, 0.875), (0.58, 0.875)]
    with caplog.at_level("INFO"):
        state, best = run_epochs(epochs)
    assert (state.best_epoch, state.best_accuracy, state.best_loss) == (5, 0.875, 0.55)
    assert best["bias"].item() == 5.0 and state.epochs_without_improvement == 1
    assert ("epoch 3 replaces epoch 2 as the selected one: same validation accuracy, lower validation loss"
            in caplog.text)
    state, best = run_epochs(epochs, select_by="loss")
    assert (state.best_epoch, best["bias"].item()) == (5, 5.0)
    state, _ = run_epochs([(0.9, 0.5), (0.4, 0.4)], select_by="loss")  # loss alone, whatever the accuracy
    assert state.best_epoch == 2
    state, _ = run_epochs([(0.9, 0.5), (0.4, 0.4)])  # accuracy first
    assert state.best_epoch == 1


def test_a_checkpoint_without_best_loss_takes_it_from_the_history():
    old = State(history=[{"epoch": 1, "valid_loss": 0.7, "valid_accuracy": 0.8}], best_epoch=1, best_accuracy=0.8,
                epoch=1).to_dict()
    del old["best_loss"]
    assert State.from_dict(old).best_loss == 0.7


def test_an_epoch_with_a_non_finite_validation_loss_is_never_selected():
    # A NaN model's argmax is one class: its accuracy (that class's share) can beat a finite epoch's.
    state, best = run_epochs([(1.2, 0.10), (math.nan, 0.25), (math.inf, 0.30)])
    assert (state.best_epoch, state.best_accuracy, state.epochs_without_improvement) == (1, 0.10, 2)
    assert best["bias"].item() == 1.0
    check_selected(HP, state)  # epoch 1 is finite: the job goes on with it


def test_a_run_that_diverged_in_every_epoch_fails_with_the_reason():
    state, best = run_epochs([(math.nan, 0.2), (math.nan, 0.2)])
    assert best is None and state.best_epoch == -1
    with pytest.raises(TrainingDiverged) as e:
        check_selected(HP, state)
    message = str(e.value)
    assert message.startswith("validation loss is not finite in any epoch (epoch 1: nan, epoch 2: nan): the model "
                              "diverged and nothing was exported; lower lr (now 1: try a tenth of it)"), message
    assert "rules.json" in message and len(message.splitlines()[0]) < 1024  # SageMaker's FailureReason


def test_a_selected_non_finite_epoch_of_an_older_checkpoint_fails_too():
    state = State(history=[{"epoch": 1, "valid_loss": math.nan, "valid_accuracy": 0.2}], best_epoch=1,
                  best_accuracy=0.2, epoch=1)
    with pytest.raises(TrainingDiverged, match=r"^validation loss is nan at the selected epoch 1: the model "
                                               r"diverged and nothing was exported; lower lr"):
        check_selected(HP, state)


def test_export_refuses_a_model_with_non_finite_logits(tmp_path):
    """A model directory written before training checked for divergence: `python -m imgclf.export` exports nothing
    from it, and removes a graph of those weights that an earlier export left."""
    net, _ = models.build_model("squeezenet1_1", 3)
    with torch.no_grad():
        next(p for name, p in net.named_parameters() if name.startswith("classifier")).fill_(math.nan)
    artifacts.save_model(tmp_path, net, {"architecture": "squeezenet1_1", "class_names": ["a", "b", "c"],
                                         **Preprocessing(32).to_config()})
    (tmp_path / artifacts.ONNX_FILE).write_bytes(b"a stale graph")
    config_before = (tmp_path / artifacts.CONFIG_FILE).read_text()
    with pytest.raises(ExportError, match=r"^the model's logits are not finite \(NaN/Inf\) on 8 of the 8 synthetic "
                                          r"images \(no --data given\): it diverged in training; nothing was exported"):
        export.export(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [artifacts.CONFIG_FILE, artifacts.WEIGHTS_FILE]
    assert (tmp_path / artifacts.CONFIG_FILE).read_text() == config_before


@pytest.mark.parametrize("data_filter", [True, False], ids=["python-3.11.4+", "python-3.11.2-of-the-images"])
def test_extract_takes_plain_files_and_refuses_what_escapes(tmp_path, monkeypatch, data_filter):
    """Debian 12's Python 3.11.2 (the images) has no tarfile data filter: the same rule must hold there."""
    import io
    import tarfile

    from imgclf import artifacts

    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter")

    def archive(*members: tuple[str, bytes | None, bytes]) -> tarfile.TarFile:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, link, data in members:
                info = tarfile.TarInfo(name)
                if link is not None:
                    info.type, info.linkname = tarfile.SYMTYPE, link.decode()
                else:
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if link is None else None)
        buf.seek(0)
        return tarfile.open(fileobj=buf, mode="r:gz")

    good = tmp_path / "good"
    artifacts.extract(archive(("config.json", None, b"{}"), ("code/x.txt", None, b"x")), good)
    assert (good / "config.json").read_bytes() == b"{}" and (good / "code" / "x.txt").is_file()
    for i, member in enumerate([("../escape.txt", None, b"x"), ("link", b"/etc/passwd", b"")]):
        with pytest.raises(tarfile.TarError):
            artifacts.extract(archive(member), tmp_path / "bad" / str(i))
    assert not (tmp_path / "bad" / "escape.txt").exists()
    with contextlib.suppress(tarfile.TarError):  # refused, or (the data filter) extracted inside without its "/"
        artifacts.extract(archive(("/tmp/imgclf-absolute.txt", None, b"x")), tmp_path / "absolute")
    assert not Path("/tmp/imgclf-absolute.txt").exists()
