"""config.json as serving reads it (imgclf.artifacts.read_config): every model artifact is untrusted, and serving
sizes its buffers from these fields, so each is checked and a bad one named."""

from __future__ import annotations

import json

import pytest
from imgclf.artifacts import read_config
from imgclf.errors import WeightsError

GOOD = {"format_version": 1, "architecture": "resnet18", "class_names": ["001.A", "002.B", "003.C"],
        "image_size": 224, "resize_size": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear", "crop_pct": None, "crop_mode": "center", "onnx": {"int8": None}}


def written(tmp_path, config) -> str:
    (tmp_path / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    return str(tmp_path)


def test_a_training_config_reads_back(tmp_path):
    assert read_config(written(tmp_path, GOOD)) == GOOD


@pytest.mark.parametrize("change, said", [
    ({"image_size": 100_000}, "image_size 100000 is not a side of 16-1024 pixels"),
    ({"image_size": -5}, "image_size -5"),
    ({"image_size": "224"}, "image_size 224 is not"),
    ({"image_size": True}, "image_size True"),
    ({"crop_pct": 0}, "crop_pct 0 is not a ratio of 0.5-2.0"),
    ({"crop_pct": "x"}, "crop_pct x"),
    ({"class_names": "abc"}, "class_names must be a list"),
    ({"class_names": []}, "class_names must be a list"),
    ({"class_names": [{"a": 1}]}, "class_names must be a list"),
    ({"class_names": ["a", "a"]}, "class_names repeats a name"),
    ({"architecture": 5}, "architecture '5' is not a model name"),
    ({"mean": [0.5]}, "mean [0.5] is not 3 numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "each above 0"),
    ({"std": [0.2, float("nan"), 0.2]}, "std"),
    ({"interpolation": "sinc"}, "interpolation 'sinc' is not one of"),
    ({"crop_mode": ["center"]}, "crop_mode"),
    ({"onnx": "yes"}, "onnx is not the export's record"),
])
def test_each_bad_field_is_named(tmp_path, change, said):
    with pytest.raises(WeightsError, match="config.json is not usable") as refused:
        read_config(written(tmp_path, {**GOOD, **change}))
    assert said in str(refused.value)


@pytest.mark.parametrize("raw, said", [
    (b"\xff\xfe{", "is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b"[1, 2]", "a JSON object"),
    (json.dumps({"architecture": "resnet18"}).encode(), "lacks class_names"),
])
def test_files_that_are_not_a_config_are_refused(tmp_path, raw, said):
    with pytest.raises(WeightsError, match=said):
        read_config(written(tmp_path, raw))
