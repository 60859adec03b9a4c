"""What the training job checks before it trains (hyperparameters, splits, data, weights), by calling the job in
process (tests/conftest.train_in_process); the failure channel (exit code, failure file) is in
tests/integration/test_train.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from imgclf import config, models, splits
from imgclf.errors import DataError, HyperparameterError, WeightsError

from tests.conftest import FAST_HPS, random_resnet18_weights, train_in_process


def test_hyperparameter_validation():
    hp = config.parse_hyperparameters({"lr": "0.01", "batch-size": 256.0, "augment": "false", "model": "ResNet50"})
    assert hp.lr == 0.01 and hp.batch_size == 256 and hp.augment == "none" and hp.model == "resnet50"
    with pytest.raises(HyperparameterError, match=r"unknown hyperparameter\(s\) learning-rate; known: lr, batch-size"):
        config.parse_hyperparameters({"learning-rate": 0.1})
    with pytest.raises(HyperparameterError, match="batch-size='big': expected int"):
        config.parse_hyperparameters({"batch-size": "big"})
    with pytest.raises(HyperparameterError, match="freeze='some': choose one of auto, head, none, head-then-all"):
        config.parse_hyperparameters({"freeze": "some"})
    with pytest.raises(HyperparameterError, match="lr=-1.0: must be between"):
        config.parse_hyperparameters({"lr": -1})
    with pytest.raises(HyperparameterError, match="not a torchvision classification model"):
        models.check_model_name("resnet9000")
    # NaN passes every comparison: refused as such (it used to crash or silently do nothing after start)
    for name in ("lr", "momentum", "label-smoothing", "model-ema-decay", "weight-decay"):
        for value in ("nan", float("nan"), "inf"):
            with pytest.raises(HyperparameterError, match=f"{name}=.*: expected a finite number"):
                config.parse_hyperparameters({name: value})
    with pytest.raises(HyperparameterError, match="log-interval=-1: must be at least 0$"):
        config.parse_hyperparameters({"log-interval": -1})
    with pytest.raises(HyperparameterError, match="seed=.*: must be between 0 and 4294967295"):
        config.parse_hyperparameters({"seed": str(2**70)})


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _break_empty_class(root: Path) -> str:
    folder = root / "valid" / "003.Ringed_retriever"
    for f in folder.iterdir():
        f.unlink()
    return f"empty class folder {folder}"


def _break_corrupt_file(root: Path) -> str:
    bad = root / "train" / "001.Spotted_pointer" / "not_really.jpg"
    bad.write_bytes(b"this is not a JPEG")
    return f"{bad}: cannot decode"


def _break_truncated_file(root: Path) -> str:
    victim = next((root / "test" / "002.Striped_terrier").iterdir())
    victim.write_bytes(victim.read_bytes()[:600])
    return f"{victim}: cannot decode"


def _break_class_sets(root: Path) -> str:
    (root / "test" / "005.Triangle_spaniel").rename(root / "test" / "005.Triangle_spaniels")
    return "only in test: 005.Triangle_spaniels; missing from test: 005.Triangle_spaniel"


def _break_empty_split(root: Path) -> str:
    shutil.rmtree(root / "valid")
    (root / "valid").mkdir()
    return f"valid split {root / 'valid'}: no class folders"


def _break_to_one_class(root: Path) -> str:
    for split in ("train", "valid", "test"):
        for folder in sorted((root / split).iterdir())[1:]:
            shutil.rmtree(folder)
    return "one class folder (001."


def _break_two_ways(root: Path) -> str:  # every problem is reported at once, undecodable files too
    _break_class_sets(root)
    return _break_truncated_file(root)


@pytest.mark.parametrize("breaker", [_break_empty_class, _break_corrupt_file, _break_truncated_file,
                                     _break_class_sets, _break_empty_split, _break_to_one_class, _break_two_ways])
def test_bad_data_is_reported_by_path_before_training(tmp_path, sample_dataset, breaker):
    root = _copy(sample_dataset, tmp_path / "data")
    expected = breaker(root)
    # The validator names the real path; the job names the path as its channel sees it.
    with pytest.raises(DataError) as err:
        splits.validate_splits(splits.find_split_dirs({s: str(root / s) for s in splits.SPLITS}))
    assert expected in str(err.value)
    with pytest.raises(DataError, match="^dataset is not usable") as err:  # the job's own check, before training
        train_in_process(tmp_path, root, FAST_HPS)
    assert not list((tmp_path / "opt_ml" / "model").iterdir()) and not (tmp_path / "checkpoints").exists()


def test_images_in_linked_folders_are_found_once(tmp_path):
    (tmp_path / "a/extra").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("a/x.jpg", "a/extra/y.jpg", "elsewhere/z.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a/linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "a/extra/loop").symlink_to(tmp_path / "a")
    found = [p.relative_to(tmp_path / "a").as_posix() for p in splits.image_files(tmp_path / "a")]
    assert found == ["extra/y.jpg", "linked/z.jpg", "x.jpg"]


def test_missing_split_names_the_channels(tmp_path, sample_dataset):
    with pytest.raises(DataError, match="missing data split.s. valid: give channels train, valid"):
        splits.find_split_dirs({"train": str(sample_dataset / "train")})


def test_pretrained_weights_missing_offline(tmp_path, sample_dataset, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(WeightsError) as err:
        train_in_process(tmp_path, sample_dataset, {**FAST_HPS, "pretrained": "true"})
    text = str(err.value)
    assert text.startswith("pretrained weights for resnet18 not found offline; looked in:")
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in text
    assert "--weights FILE" in text and "pretrained=false" in text


def test_weights_of_another_architecture_are_refused(tmp_path, sample_dataset):
    weights = random_resnet18_weights(tmp_path / "resnet18.pth")
    with pytest.raises(WeightsError, match="does not fit architecture resnet34"):
        train_in_process(tmp_path, sample_dataset, {**FAST_HPS, "pretrained": "true", "model": "resnet34"},
                         weights=weights)


def test_weights_files_users_actually_have(tmp_path):
    """A DataParallel/DDP state_dict ('module.' names) loads; a whole pickled model is refused without torch's
    advice to unpickle it anyway; another model's weights say what to give within the 1,024 characters SageMaker
    shows of a failure reason."""
    from torchvision.models import mobilenet_v3_small, resnet18

    net = resnet18(num_classes=10)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "ddp.pth")
    state = models.read_state_dict(tmp_path / "ddp.pth")
    assert set(state) == set(net.state_dict())
    torch.save(net, tmp_path / "whole.pth")
    with pytest.raises(WeightsError, match="not loaded, since unpickling can run code; save model.state_dict"
                       ) as refused:
        models.read_state_dict(tmp_path / "whole.pth")
    assert "weights_only=False" not in str(refused.value) and "\x1b" not in str(refused.value)
    (tmp_path / "channel").mkdir()
    torch.save(mobilenet_v3_small().state_dict(), tmp_path / "channel" / "mobilenet.pth")
    with pytest.raises(WeightsError) as refused:
        models.load_pretrained(resnet18(), "resnet18", tmp_path / "channel", download=False)
    assert "give the torchvision weights of resnet18 itself" in str(refused.value)[:1024]
    assert len(str(refused.value)) < 1024


def test_a_weights_channel_with_pretrained_false_is_refused(tmp_path, sample_dataset):
    weights = random_resnet18_weights(tmp_path / "resnet18.pth")
    with pytest.raises(HyperparameterError, match="a weights channel is given, but pretrained=false"):
        train_in_process(tmp_path, sample_dataset, {**FAST_HPS, "pretrained": "false"}, weights=weights)
