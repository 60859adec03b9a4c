"""model.onnx: written and checked by the `train` entrypoint, and by `python -m imgclf.export` for an existing model;
what serving feeds it is what evaluation computes (that serving it imports no torch: test_import_graph)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import onnxruntime as ort
import pytest
import requests
import torch
from imgclf import artifacts, data, export, local, preprocessing
from imgclf.errors import ExportError
from imgclf.serving import inference
from PIL import Image
from torchvision import transforms

from tests.conftest import REPO
from tests.photos import DOG, forms

ENV = {"PYTHONPATH": str(REPO / "code"), "PATH": ""}


def valid_images(dataset):
    return sorted(p for p in (dataset / "valid").rglob("*") if p.is_file())


def test_training_writes_a_checked_dynamic_batch_graph(trained, sample_dataset):
    out, result = trained
    config = json.loads((out / "model" / "config.json").read_text())
    parity = config["onnx"]["parity"]
    assert parity["passed"] and parity["images"] == len(valid_images(sample_dataset)), parity
    assert parity["max_abs_logit_difference"] < export.PARITY_ATOL
    assert config["onnx"]["exporter"] == "dynamo" and config["onnx"]["fallback_reason"] is None, config["onnx"]
    assert config["onnx"]["opset"] == export.OPSET
    assert "exported model.onnx with the dynamo exporter in " in result.stdout
    assert "parity on 40 validation images" in result.stdout
    with tarfile.open(out / "model.tar.gz") as tar:
        assert "model.onnx" in tar.getnames()
    net, _ = artifacts.load_model(out / "model")
    session = ort.InferenceSession(str(out / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # any batch size: one request's images are one batch
        x = np.random.default_rng(batch).normal(size=(batch, 3, 64, 64)).astype(np.float32)
        (logits,) = session.run(None, {"images": x})
        with torch.inference_mode():
            expected = net(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(logits, expected, atol=export.PARITY_ATOL, rtol=export.PARITY_RTOL)


def test_training_with_export_int8_writes_the_quantized_graph_it_checked(trained, sample_dataset):
    """export-int8=true (the session's shared run sets it): the int8 graph is accepted (top-1 agrees with float32
    on every validation image, the largest probability difference under the bound), it is a quantized graph, it is
    on disk and in model.tar.gz, and running it and model.onnx on the validation images gives the figures
    config.json records."""
    import onnx

    # The demo's 5 epochs: a model sure of its answers (int8 moves probabilities by 0.03; measured with one
    # OpenMP thread, as `make test` trains). After 4 epochs int8 flipped a near tie: 39 of 40, rejected.
    out, result = trained
    config = json.loads((out / "model" / "config.json").read_text())
    int8 = config["onnx"]["int8"]
    images = valid_images(sample_dataset)
    assert int8["images"] == len(images) == 40
    assert int8["bound"] == export.INT8_MAX_PROBABILITY_DIFFERENCE
    assert int8["accepted"] is True and int8["reason"] is None, int8
    assert int8["top1_agreements"] == int8["images"], int8  # acceptance needs every image; this is the minimum
    assert 0 <= int8["max_probability_difference"] < int8["bound"], int8
    assert (f"int8 graph accepted: top-1 agrees on {int8['images']} of {int8['images']} images, largest probability "
            f"difference {int8['max_probability_difference']:.4f}") in result.stdout + result.stderr

    path = out / "model" / export.INT8_FILE
    nodes = onnx.load(str(path)).graph.node
    fp32_convs = [n for n in onnx.load(str(out / "model" / "model.onnx")).graph.node if n.op_type == "Conv"]
    dequantized = {name for n in nodes if n.op_type == "DequantizeLinear" for name in n.output}
    quantized_convs = [n for n in nodes if n.op_type == "Conv" and n.input[1] in dequantized]  # QDQ int8 weights
    assert any(n.op_type == "QuantizeLinear" for n in nodes), "no activation is quantized"
    assert len(quantized_convs) == len(fp32_convs) - 1, (len(quantized_convs), len(fp32_convs))  # all but the first
    with tarfile.open(out / "model.tar.gz") as tar:
        assert tar.extractfile(export.INT8_FILE).read() == path.read_bytes()

    x = export.preprocess(images, preprocessing.Preprocessing.from_config(config))
    p32 = export.softmax(export.run_session(export.session(out / "model" / "model.onnx"), x))
    p8 = export.softmax(export.run_session(export.session(path), x))
    assert int((p32.argmax(1) == p8.argmax(1)).sum()) == int8["top1_agreements"]
    assert float(np.abs(p32 - p8).max()) == pytest.approx(int8["max_probability_difference"], abs=1e-6)


def test_export_command_on_an_existing_model_with_int8(trained, sample_dataset, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained[0] / "model", model)
    (model / "model.onnx").unlink()
    (model / export.INT8_FILE).unlink()
    config = json.loads((model / "config.json").read_text())
    del config["onnx"]
    (model / "config.json").write_text(json.dumps(config))  # as trained before the export existed
    result = subprocess.run([sys.executable, "-m", "imgclf.export", str(model), "--data",
                             str(sample_dataset / "valid"), "--int8"], capture_output=True, text=True, env=ENV,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    config = json.loads((model / "config.json").read_text())
    assert config["onnx"]["parity"]["passed"] and (model / "model.onnx").is_file()
    assert config["onnx"]["exporter"] == "dynamo", config["onnx"]  # what int8 quantized: the dynamo exporter's graph
    int8 = config["onnx"]["int8"]
    assert int8["accepted"] and int8["top1_agreements"] == int8["images"] == 40, int8
    assert int8["max_probability_difference"] < int8["bound"] == export.INT8_MAX_PROBABILITY_DIFFERENCE
    assert (model / export.INT8_FILE).is_file()
    assert "int8 graph accepted: top-1 agrees on 40 of 40 images" in result.stderr

    # served: IMGCLF_SERVE_DTYPE=int8 through the real server, which logs the export's figures
    with local.serving(model, env={"IMGCLF_SERVE_DTYPE": "int8"}, log=tmp_path / "serve.log") as server:
        response = requests.post(f"{server.url}/invocations", data=DOG.read_bytes(), timeout=120,
                                 headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 200, response.text
    text = server.log.read_text()
    assert "ONNX Runtime" in text and "(model.int8.onnx)" in text, text[-3000:]
    assert "int8 graph checked at export on 40 validation images: top-1 agrees on 40" in text


def test_export_command_refuses_bad_input_clearly(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "imgclf.export", str(trained[0] / "model"), "--data", str(empty)],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2 and f"--data {empty}: no image files" in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "imgclf.export", str(tmp_path)], capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert result.returncode == 2 and "config.json is missing" in result.stderr and "Traceback" not in result.stderr


def test_a_graph_that_differs_from_pytorch_fails_the_export(trained, sample_dataset, tmp_path, monkeypatch):
    """The parity check itself: graphs of slightly different weights are refused, each exporter's, and nothing is
    left behind."""
    model = tmp_path / "model"
    shutil.copytree(trained[0] / "model", model)
    (model / "model.onnx").unlink()
    (model / export.INT8_FILE).unlink()
    real_export = export.export_graph

    def drifted(net, image_size, path, exporter):
        with torch.no_grad():
            net.fc.bias.add_(0.01)  # a small, uniform drift of every logit
        real_export(net, image_size, path, exporter)
        with torch.no_grad():
            net.fc.bias.sub_(0.01)

    monkeypatch.setattr(export, "export_graph", drifted)
    differs = r"graph does not match PyTorch on 40 validation images: largest logit difference 0\.01, allowed "
    with pytest.raises(ExportError, match=rf"^cannot export resnet18 to model\.onnx: the dynamo exporter's {differs}"
                                          rf".*; the torchscript exporter's {differs}.*\. No model\.onnx was written"):
        export.export(model, valid_images(sample_dataset))
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def torchvision_eval(config):
    """The eval transform as torchvision composes it: the reference the one numpy definition must equal."""
    return transforms.Compose([
        transforms.Resize(config["resize_size"], antialias=True), transforms.CenterCrop(config["image_size"]),
        transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])


def test_serving_feeds_the_graph_what_evaluation_computes(trained, tmp_path):
    """Every client image form (EXIF, CMYK, palette + alpha, 16-bit, huge, tiny...): the batch serving hands the
    runtime equals the evaluation DataLoader's tensor, bit for bit, and torchvision's transform."""
    model = inference.model_fn(str(trained[0] / "model"))
    fed = []
    run = model.run
    model.run = lambda batch: fed.append(batch) or run(batch)
    prep = model.preprocessing
    for name, (body, ctype) in forms().items():
        path = tmp_path / f"{name}.img"
        path.write_bytes(body)
        inference.predict_fn(inference.input_fn(body, ctype), model)
        evaluated, _ = data.ImageDataset([(path, 0)], data.eval_transform(prep), prep.resize_size)[0]
        assert fed[-1].shape == (1, 3, 64, 64) and fed[-1].dtype == np.float32
        assert np.array_equal(fed[-1][0], evaluated.numpy()), name
        decoded = preprocessing.load_rgb(io.BytesIO(body), draft_size=prep.resize_size)
        assert torch.equal(torchvision_eval(model.config)(decoded), evaluated), name


@pytest.mark.parametrize("size", [(40, 300), (300, 41), (50, 50), (73, 73)])
def test_the_numpy_transform_equals_torchvisions_on_any_shape(size):
    """Thin, wide, smaller than the crop (upscaled) and exactly the resize size."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    config = {"image_size": 64, "resize_size": 73, "mean": preprocessing.IMAGENET_MEAN,
              "std": preprocessing.IMAGENET_STD}
    assert torch.equal(data.eval_transform(preprocessing.Preprocessing(64))(img), torchvision_eval(config)(img))



def test_parity_holds_for_a_diverged_model_and_fails_on_any_other_difference():
    """NaN/Inf must be NaN/Inf in the graph too (export refuses a diverged model before: check_finite, in
    test_artifacts); anything else must match."""
    ref = np.array([[1.0, np.nan, 3.0], [np.inf, 2.0, -1.0]], dtype=np.float32)
    assert export.check_parity(ref, ref.copy())["passed"]
    assert export.check_parity(ref, ref + 5e-4)["passed"] is True
    assert not export.check_parity(ref, np.nan_to_num(ref))["passed"]  # NaN where PyTorch had a number
    shifted = ref.copy()
    shifted[0, 0] += 0.01
    result = export.check_parity(ref, shifted)
    assert not result["passed"] and abs(result["max_abs_logit_difference"] - 0.01) < 1e-6
