"""The feature cache decisions and its extracted features, in process."""

from __future__ import annotations

import pytest
import torch
from imgclf import config, models
from imgclf.training import accel, features


def hp(**overrides):
    return config.parse_hyperparameters({"freeze": "head", "augment": "false", "epochs": 3, **overrides})


@pytest.mark.parametrize(("overrides", "expected", "reason"), [
    ({}, True, "no augmentation"),
    ({"augment": "true"}, False, "augment=flip changes the pixels"),
    ({"augment": "none", "random-erase": 0.25, "mixup": 0.2}, False, "random-erase=0.25, mixup=0.2 changes"),
    ({"feature-cache": "off"}, False, "feature-cache=off"),
    ({"freeze": "none"}, False, "trains from the first epoch"),
    ({"epochs": 1}, False, "one epoch only"),
    ({"epochs": 1, "feature-cache": "on"}, True, "no augmentation"),
    ({"freeze": "head-then-all", "head-epochs": 2}, True, "2 epoch(s)"),
])
def test_auto_decision_and_its_reason(overrides, expected, reason):
    use, why = features.should_cache(hp(**overrides))
    assert use is expected and reason in why


def batches(size: int = 32, count: int = 2, n: int = 3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, 3, size, size, generator=g), torch.tensor([0, 1, 2])[:n]) for _ in range(count)]


def test_extracted_features_reproduce_the_model_output():
    """MobileNetV3: Dropout before the head layer; in eval it is the identity, as the frozen backbone runs."""
    torch.manual_seed(0)
    model, head = models.build_model("mobilenet_v3_small", 3)
    models.train_mode(model, head, backbone_trains=False)
    acc = accel.Accel(torch.device("cpu"))
    data = batches()
    cache = features.extract(model, head, data, acc)
    assert cache.features.shape == (6, 1024) and cache.labels.tolist() == [0, 1, 2, 0, 1, 2]
    layer = features.head_module(model, head)
    with torch.no_grad():
        full = torch.cat([model(x) for x, _ in data])
        torch.testing.assert_close(layer(cache.features), full)
    got = list(features.SamplerBatches(cache, [(5, 0), (0, 0), (3, 0)], batch_size=2))
    assert [y.tolist() for _, y in got] == [[2, 0], [0]]


def test_a_model_that_transforms_its_head_output_is_refused():
    """SqueezeNet's head is a convolution followed by ReLU and pooling: its features cannot stand alone."""
    model, head = models.build_model("squeezenet1_1", 3)
    models.train_mode(model, head, backbone_trains=False)
    with pytest.raises(features.FeatureCacheUnsupported, match="transforms the output"):
        features.extract(model, head, batches(64, count=1), accel.Accel(torch.device("cpu")))
