"""Throughput settings: amp/channels-last/compile resolution and a real training run with them off."""

from __future__ import annotations

import logging

import pytest
import torch
from imgclf import config, models
from imgclf.errors import HyperparameterError
from imgclf.training import accel

from tests.conftest import TINY_HPS, train_in_process

CPU = torch.device("cpu")


def test_amp_modes_on_cpu():
    assert accel.amp_dtype("off", CPU) is None
    assert accel.amp_dtype("bf16", CPU) is torch.bfloat16
    assert accel.amp_dtype("auto", CPU) is (torch.bfloat16 if accel.cpu_has_native_bf16() else None)
    with pytest.raises(HyperparameterError, match="amp=fp16 needs a GPU"):
        accel.amp_dtype("fp16", CPU)


def test_bad_values_are_named():
    with pytest.raises(HyperparameterError, match="amp='fp8'.*auto, bf16, fp16, off"):
        config.parse_hyperparameters({"amp": "fp8"})
    with pytest.raises(HyperparameterError, match="channels-last='maybe'"):
        config.parse_hyperparameters({"channels-last": "maybe"})


def test_auto_settings_follow_the_model():
    auto = accel.SpeedSettings.from_hyperparameters(config.parse_hyperparameters({}))
    assert auto == accel.SpeedSettings(amp="auto", channels_last="auto", compile="auto")
    cnn, _ = models.build_model("resnet18", 3)
    vit, _ = models.build_model("vit_b_16", 3)
    assert auto.for_model(cnn, CPU).channels_last
    assert not auto.for_model(vit, CPU).channels_last  # one conv: the patch embedding
    assert not auto.for_model(cnn, CPU).compile  # auto: off on CPU
    forced = accel.SpeedSettings(amp="off", channels_last="off", compile="auto").for_model(cnn, CPU)
    assert not forced.channels_last and forced.dtype is None and forced.scaler is None


def test_inputs_are_moved_in_the_model_memory_format():
    acc = accel.Accel(CPU, channels_last=True)
    x = acc.inputs(torch.zeros(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert acc.inputs(torch.zeros(2, 5)).shape == (2, 5)  # cached features: not images


def test_training_with_every_speed_option_off(sample_dataset, tmp_path, caplog):
    """fp32, NCHW, one worker with its own prefetch depth: the plain path still trains end to end."""
    hps = {**TINY_HPS, "epochs": "1", "amp": "off", "channels-last": "off", "compile": "off",
           "num-workers": "1", "prefetch-factor": "2", "debugging": "false"}
    caplog.set_level(logging.INFO, "imgclf")
    tree = train_in_process(tmp_path, sample_dataset, hps)
    assert (tree / "model" / "model.onnx").is_file()
    assert "amp=off channels_last=False compile=False" in caplog.text
