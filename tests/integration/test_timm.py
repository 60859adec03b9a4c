"""timm backbones (`model=timm/<name>`): offline weights in timm's key format, the head-only feature cache,
the data config stored in config.json, serving's transform equal to timm's own (the recipes: test_recipes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests
import timm
import torch
from imgclf import local
from imgclf.serving import inference
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import local_train

MODEL = "test_vit"  # 0.37 M parameters; its own data config: 160 px, bicubic, crop 0.95, mean/std 0.5
HPS = {"model": f"timm/{MODEL}", "pretrained": "true", "freeze": "head", "epochs": "2", "batch-size": "16",
       "num-workers": "0", "lr": "0.01"}


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """Empty caches and no network: weights can only come from the weights channel."""
    return {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "TORCH_HOME": str(tmp_path / "torch_home"),
            "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def timm_trained(tmp_path_factory, sample_dataset) -> Path:
    """One training run of timm/test_vit with weights from a .safetensors file in timm's key format."""
    tmp = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    weights = tmp / f"{MODEL}.safetensors"
    save_file(timm.create_model(MODEL, pretrained=False).state_dict(), str(weights))
    out = tmp / "out"
    result = local_train(sample_dataset, out, HPS, weights=weights, env=_offline_env(tmp))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert f"pretrained timm/{MODEL} weights loaded from" in log and f"{MODEL}.safetensors" in log
    assert "feature cache on" in log
    # freeze=head on cached features: the head is fitted once (head-solver=auto -> lbfgs), recorded as one epoch
    assert "head solver lbfgs" in log and "head-solver=lbfgs: C=" in log, log[-3000:]
    assert len(json.loads((out / "reports" / "metrics.json").read_text())["history"]) == 1
    return out


def _timm_model():
    return timm.create_model(MODEL, pretrained=False)


def test_config_stores_timm_data_config(timm_trained):
    cfg = json.loads((timm_trained / "model" / "config.json").read_text())
    timm_cfg = timm.data.resolve_data_config({}, model=_timm_model())
    assert cfg["architecture"] == f"timm/{MODEL}"
    assert cfg["image_size"] == timm_cfg["input_size"][1] == 160
    assert cfg["mean"] == pytest.approx(list(timm_cfg["mean"])) and cfg["std"] == pytest.approx(list(timm_cfg["std"]))
    assert cfg["interpolation"] == timm_cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == pytest.approx(timm_cfg["crop_pct"]) and cfg["crop_mode"] == "center"
    assert cfg["resize_size"] == int(160 / timm_cfg["crop_pct"])


def test_serving_transform_equals_timms(timm_trained, sample_dataset):
    model = inference.model_fn(str(timm_trained / "model"))
    timm_tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=_timm_model()))
    paths = sorted((sample_dataset / "test").rglob("*.jpg"))[:4]
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        for size in [(96, 96), (123, 77), (300, 200)]:  # landscape, portrait, upscaling and downscaling
            image = rgb.resize(size)
            ours, theirs = torch.from_numpy(model.preprocessing.eval_array(image)), timm_tf(image)
            assert ours.shape == theirs.shape == (3, 160, 160)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_serving_top1_equals_evaluation(timm_trained, sample_dataset):
    """In process through model_fn/input_fn/predict_fn: the test split's confusion matrix of evaluation."""
    model = inference.model_fn(str(timm_trained / "model"))
    classes = model.class_names
    confusion = [[0] * len(classes) for _ in classes]
    for true, name in enumerate(classes):
        for path in sorted((sample_dataset / "test" / name).glob("*.jpg")):
            request = inference.input_fn(path.read_bytes(), "image/jpeg")
            prediction = inference.predict_fn(request, model)
            confusion[true][int(prediction.probabilities[0].argmax())] += 1
    rows = (timm_trained / "reports" / "confusion_matrix_test.csv").read_text().splitlines()[1:]
    assert [[int(v) for v in row.split(",")[1:]] for row in rows] == confusion
    metrics = json.loads((timm_trained / "reports" / "metrics.json").read_text())
    correct = sum(confusion[i][i] for i in range(len(classes)))
    assert metrics["test_accuracy"] == pytest.approx(correct / sum(map(sum, confusion)))


def test_real_serve_entrypoint_gives_evaluations_top1(timm_trained, sample_dataset, tmp_path):
    """Over HTTP through `python -m imgclf.local serve` (the real `serve`, multi-model-server): the same top-1
    as evaluation for every test image (the rows of evaluation's confusion matrix, image by image)."""
    model = inference.model_fn(str(timm_trained / "model"))  # evaluation's own transform and weights, in process
    with local.serving(timm_trained / "model.tar.gz", log=tmp_path / "serve.log") as server:
        url = server.url
        for path in sorted((sample_dataset / "test").rglob("*.jpg")):
            response = requests.post(f"{url}/invocations", data=path.read_bytes(), timeout=120,
                                     headers={"Content-Type": "image/jpeg"})
            assert response.status_code == 200, response.text
            expected = inference.predict_fn(inference.input_fn(path.read_bytes(), "image/jpeg"), model)
            served = response.json()["predictions"][0]["top_k"][0]
            assert served["index"] == int(expected.probabilities[0].argmax()), path
        assert not server.stop()


def test_missing_timm_weights_name_the_places_searched(tmp_path, sample_dataset):
    env = _offline_env(tmp_path)
    result = local_train(sample_dataset, tmp_path / "out", {**HPS, "epochs": "1"}, env=env)
    assert result.returncode != 0, result.stdout[-2000:]
    text = (tmp_path / "out" / "failure").read_text()
    assert text.startswith(f"WeightsError: pretrained weights for timm/{MODEL} not found offline; looked in:")
    assert "Hugging Face hub cache" in text and str(tmp_path / "hf_home") in text
    assert "--weights FILE" in text and "download-weights=true" in text and "pretrained=false" in text
