"""torch.onnx's dynamo exporter makes model.onnx for every family of backbones the project offers, and the TorchScript
exporter takes over where it fails. In-process: small models of each family's own classes (the operators of the
full-size ones, a fraction of the export time), random weights and images."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from imgclf import artifacts, config, export, models
from imgclf.errors import ExportError
from imgclf.preprocessing import Preprocessing
from torch import nn
from torchvision import models as tv
from torchvision.models import convnext, efficientnet, mobilenetv3, regnet, resnet, swin_transformer, vgg
from torchvision.models.googlenet import BasicConv2d, Inception
from torchvision.models.inception import InceptionA, InceptionB

CLASSES = 5


def small_vgg() -> nn.Module:
    net = tv.VGG(vgg.make_layers([8, "M", 512, "M"], batch_norm=True), num_classes=CLASSES, init_weights=False)
    net.classifier[0], net.classifier[3] = nn.Linear(512 * 7 * 7, 32), nn.Linear(32, 32)  # not 4096 wide
    net.classifier[6] = nn.Linear(32, CLASSES)
    return net


def inception_blocks() -> nn.Module:
    """GoogLeNet's and Inception v3's layers: their blocks in a row, not their 57 and 94 convolutions (7 and 12 s
    to export here)."""
    return nn.Sequential(BasicConv2d(3, 8, kernel_size=3), nn.MaxPool2d(3, 2, ceil_mode=True),
                         Inception(8, 4, 4, 8, 2, 4, 4), InceptionA(20, pool_features=8), InceptionB(232),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(712, CLASSES))


# family: (the names of models.available_models() it stands for, by prefix; its small model; image size). 64 px: the
# feature maps of VGG and AlexNet end smaller than their 7x7 and 6x6 pooling, which the TorchScript exporter refuses.
FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[], nn.Module], int]] = {
    "vgg": (("vgg", "alexnet"), small_vgg, 64),  # AlexNet: the same layers, without BatchNorm
    # Bottleneck blocks with grouped convolutions: ResNeXt's; BasicBlock's layers are a subset (resnet18 at full
    # size: tests/integration/test_export.py, the demo's model)
    "resnet": (("resnet", "resnext", "wide_resnet"),
               lambda: tv.ResNet(resnet.Bottleneck, [1, 1, 1, 1], CLASSES, groups=4, width_per_group=8), 64),
    "densenet": (("densenet",), lambda: tv.DenseNet(8, (2, 2), 16, bn_size=2, num_classes=CLASSES), 64),
    "efficientnet": (("efficientnet_b",), lambda: tv.EfficientNet(
        [efficientnet.MBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.MBConvConfig(6, 3, 2, 8, 16, 1)], 0.2,
        num_classes=CLASSES, last_channel=32), 64),
    "efficientnet_v2": (("efficientnet_v2",), lambda: tv.EfficientNet(
        [efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.FusedMBConvConfig(4, 3, 2, 8, 16, 1),
         efficientnet.MBConvConfig(4, 3, 2, 16, 24, 1)], 0.2, num_classes=CLASSES, last_channel=32), 64),
    # MNASNet: the same inverted residual blocks (ReLU for ReLU6), 17 of them (7 s to export here)
    "mobilenet_v2": (("mobilenet_v2", "mnasnet"), lambda: tv.MobileNetV2(CLASSES, inverted_residual_setting=[
        [1, 8, 1, 1], [6, 16, 2, 2]]), 64),
    "mobilenet_v3": (("mobilenet_v3",), lambda: tv.MobileNetV3([
        mobilenetv3.InvertedResidualConfig(8, 3, 8, 8, True, "RE", 2, 1, 1.0),
        mobilenetv3.InvertedResidualConfig(8, 5, 24, 16, True, "HS", 2, 1, 1.0)], 32, CLASSES), 64),
    "shufflenet_v2": (("shufflenet_v2",), lambda: tv.ShuffleNetV2([1, 1, 1], [8, 16, 32, 64, 128], CLASSES), 64),
    "squeezenet": (("squeezenet",), lambda: tv.SqueezeNet("1_1", CLASSES), 64),
    "regnet": (("regnet_x", "regnet_y"), lambda: tv.RegNet(regnet.BlockParams.from_init_params(  # Y: X + SE
        depth=2, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25), num_classes=CLASSES), 64),
    "convnext": (("convnext",), lambda: tv.ConvNeXt(
        [convnext.CNBlockConfig(8, 16, 1), convnext.CNBlockConfig(16, None, 1)], num_classes=CLASSES), 64),
    # windows of 3 on 16x16 patches: the padded and shifted windows of swin_t at 64 px
    "swin": (("swin_t", "swin_s", "swin_b"), lambda: tv.SwinTransformer(
        [4, 4], 8, [1, 1], [1, 2], [3, 3], num_classes=CLASSES), 64),
    "swin_v2": (("swin_v2",), lambda: tv.SwinTransformer(
        [4, 4], 8, [1, 1], [1, 2], [3, 3], num_classes=CLASSES, block=swin_transformer.SwinTransformerBlockV2,
        downsample_layer=swin_transformer.PatchMergingV2), 64),
    "vit": (("vit_",), lambda: tv.VisionTransformer(32, 8, 1, 2, 16, 32, num_classes=CLASSES), 32),
    "maxvit": (("maxvit",), lambda: tv.MaxVit((64, 64), 8, 2, [8], [1], 4, 0.0, num_classes=CLASSES), 64),
    "inception": (("googlenet", "inception_v3"), inception_blocks, 64),
}


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)  # the same random weights every run


def test_every_torchvision_model_has_a_family_here():
    """A torchvision upgrade that adds a family fails here until the family has a case below."""
    uncovered = [n for n in models.available_models()
                 if not any(n.startswith(p) for prefixes, _, _ in FAMILIES.values() for p in prefixes)]
    assert not uncovered, f"add a small model of their family to FAMILIES: {uncovered}"


def export_checked(net: nn.Module, name: str, image_size: int, tmp_path) -> tuple[export.Graph, np.ndarray]:
    """export's own choice of exporter and parity check, on 3 random images (a batch size other than the
    example's 2); returns the graph and the images."""
    net.eval()
    x = np.random.default_rng(0).normal(size=(3, 3, image_size, image_size)).astype(np.float32)
    return export.export_checked(net, name, image_size, tmp_path / "model.onnx", x, export.torch_logits(net, x),
                                 "3 random images"), x


def check_int8(path, x: np.ndarray) -> None:
    """ONNX Runtime's quantizer works on the graph: every convolution but the first and every fully connected
    layer (Gemm) but the classifier get int8 weights, as export.quantize_int8 says."""
    int8 = path.with_name("model.int8.onnx")
    export.quantize_int8(path, int8, x)
    nodes = onnx.load(str(int8)).graph.node
    dequantized = {name for n in nodes if n.op_type == "DequantizeLinear" for name in n.output}
    fp32 = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm")]
    quantized = [n for n in nodes if n.op_type in ("Conv", "Gemm") and n.input[1] in dequantized]
    kept_fp32 = int(any(n.op_type == "Conv" for n in fp32)) + int(any(n.op_type == "Gemm" for n in fp32))
    assert len(quantized) == len(fp32) - kept_fp32, (len(quantized), len(fp32))
    assert np.isfinite(export.run_session(export.session(int8), x)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_each_torchvision_family_exports_with_dynamo(family, tmp_path):
    _, build, image_size = FAMILIES[family]
    graph, x = export_checked(build(), family, image_size, tmp_path)
    assert graph.exporter == "dynamo" and graph.parity["passed"] and not graph.failures, graph.failures
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    one = export.run_session(export.session(tmp_path / "model.onnx"), x[:1])  # torch.export's special size
    np.testing.assert_allclose(one, graph.logits[:1], atol=export.PARITY_ATOL, rtol=export.PARITY_RTOL)
    check_int8(tmp_path / "model.onnx", x)


def test_the_suites_timm_vit_exports_with_dynamo(tmp_path):
    """timm/test_vit, at its 160 px (its position embedding is resampled at others); timm/test_resnet, every job
    test's model: test_export_records_the_exporter_and_why_it_fell_back."""
    net, _ = models.build_model("timm/test_vit", CLASSES)
    image_size = models.preprocessing("timm/test_vit", net).image_size
    graph, x = export_checked(net, "timm/test_vit", image_size, tmp_path)
    assert graph.exporter == "dynamo" and not graph.failures, graph.failures
    check_int8(tmp_path / "model.onnx", x)


class DataDependentBranch(nn.Module):
    """A Python `if` on a tensor's value: torch.export cannot trace it; the TorchScript exporter records the branch
    the example took (the one every input takes here)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, CLASSES)

    def forward(self, x):
        x = x.mean((2, 3))
        if x.abs().sum() >= 0:
            x = x * 2
        return self.fc(x)


def test_a_model_the_dynamo_exporter_cannot_trace_falls_back_to_torchscript(tmp_path):
    graph, _ = export_checked(DataDependentBranch(), "branchy", 8, tmp_path)
    assert graph.exporter == "torchscript" and graph.parity["passed"]
    assert len(graph.failures) == 1 and graph.failures[0].startswith(
        "the dynamo exporter failed: GuardOnDataDependentSymNode: Could not guard on data-dependent expression"), \
        graph.failures


class FixedBatch(nn.Module):
    """Runs on any batch in PyTorch; int() makes the batch size a constant of a traced graph (the example's 2)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, CLASSES)

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1))


def test_a_model_that_fixes_the_batch_size_fails_both_ways_and_the_error_names_both_reasons(tmp_path):
    """torch.onnx's dynamo exporter gives such a model a graph for batches of 2, which is refused; the TorchScript
    exporter's graph claims a dynamic batch, and fails on 3 images."""
    with pytest.raises(ExportError, match=r"^cannot export fixed-batch to model\.onnx: the dynamo exporter failed: "
                                          r"ExportError: the graph takes batches of 2 images only: the model's code "
                                          r"fixes the batch size; the torchscript exporter failed: .*\. No model\.onnx "
                                          r"was written"):
        export_checked(FixedBatch(), "fixed-batch", 8, tmp_path)


def small_model_dir(tmp_path):
    net, _ = models.build_model("timm/test_resnet", 3)
    artifacts.save_model(tmp_path, net, {"architecture": "timm/test_resnet", "class_names": ["a", "b", "c"],
                                         **Preprocessing(32).to_config()})
    return tmp_path


def test_export_records_the_exporter_and_why_it_fell_back(tmp_path, monkeypatch, caplog):
    """config.json's onnx entry and one log line say which exporter made model.onnx, and why not the dynamo one."""
    model_dir = small_model_dir(tmp_path)
    caplog.set_level(logging.INFO, "imgclf.export")
    entry = export.export(model_dir)
    assert entry["exporter"] == "dynamo" and entry["fallback_reason"] is None and entry["opset"] == export.OPSET
    assert [(r.levelno, r.getMessage()[:48]) for r in caplog.records] == [
        (logging.INFO, "exported model.onnx with the dynamo exporter in ")]
    caplog.clear()

    real = export.export_graph

    def dynamo_refuses(net, image_size, path, exporter):
        if exporter == "dynamo":
            raise RuntimeError("Failed to export the model with torch.export.") from KeyError("an unknown operator")
        real(net, image_size, path, exporter)

    monkeypatch.setattr(export, "export_graph", dynamo_refuses)
    export.export(model_dir)
    onnx_entry = json.loads((model_dir / artifacts.CONFIG_FILE).read_text())["onnx"]
    assert onnx_entry["exporter"] == "torchscript" and onnx_entry["parity"]["passed"]
    assert onnx_entry["fallback_reason"] == "the dynamo exporter failed: KeyError: 'an unknown operator'"
    lines = [r for r in caplog.records if r.getMessage().startswith("exported model.onnx")]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, caplog.text
    assert lines[0].getMessage().startswith("exported model.onnx with the torchscript exporter (the dynamo exporter "
                                            "failed: KeyError: 'an unknown operator') in "), lines[0].getMessage()


def test_the_onnx_exporter_hyperparameter_picks_one_exporter_only(tmp_path):
    """onnx-exporter=torchscript (what the suite's training runs use, for speed) makes model.onnx with TorchScript's
    exporter and never tries dynamo's; the schema offers exactly auto and the two exporters."""
    assert {p.name: p.choices for p in config.SCHEMA}["onnx-exporter"] == ("auto", *export.EXPORTERS)
    entry = export.export(small_model_dir(tmp_path), exporter="torchscript")
    assert entry["exporter"] == "torchscript" and entry["fallback_reason"] is None and entry["parity"]["passed"]
