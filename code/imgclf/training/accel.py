"""Throughput settings of the training step: device, mixed precision, channels_last, torch.compile.

Each setting is a hyperparameter whose `auto` picks what is faster on the machine the job runs on:
  amp           auto: bf16 on a GPU that has it (else fp16 with a GradScaler); on CPU bf16 where the CPU has
                native bf16 instructions (AVX512-BF16/AMX), else fp32 (emulated bf16 is slower than fp32)
  channels-last auto: on for convolutional networks (cuDNN and oneDNN convolutions are faster in NHWC)
  compile       auto: on with CUDA when a C compiler is present (Inductor needs one); off on CPU, where the
                minutes of compilation rarely pay back within a job
"""

from __future__ import annotations

import logging
import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from imgclf.config import AmpMode, AutoOnOff, Hyperparameters
from imgclf.devices import default_device
from imgclf.errors import HyperparameterError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls/convolutions in hardware (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `amp` = auto/bf16/fp16/off on `device`; None means full fp32."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if mode == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if mode == "bf16" and not torch.cuda.is_bf16_supported():
            raise HyperparameterError("hyperparameter amp=bf16: this GPU has no bf16 support; use amp=fp16 or auto")
        return DTYPES[mode]
    if mode == "auto":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if mode == "fp16":
        raise HyperparameterError("hyperparameter amp=fp16 needs a GPU; on CPU use amp=bf16, auto or off")
    if not cpu_has_native_bf16():
        log.warning("amp=bf16 on a CPU without native bf16 instructions: expect it to be slower than amp=off")
    return torch.bfloat16


def is_convolutional(model: nn.Module) -> bool:
    """More than one 2-d convolution: a CNN (a ViT has one, its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def compiler_available() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


def _choice(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


@dataclass
class Accel:
    """How the training step runs: `with speed.autocast(): ...`, `speed.backward(loss)`, `speed.step(optimizer)`."""
    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device (asynchronously from pinned memory), NHWC when channels_last is on."""
        fmt = torch.channels_last if self.channels_last and images.dim() == 4 else torch.preserve_format
        return images.to(self.device, non_blocking=True, memory_format=fmt)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def prepare(self, model: nn.Module) -> nn.Module:
        """Memory format and compilation, in place (state_dict keys stay those of the plain model)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            model.compile()
        return model

    def describe(self) -> str:
        amp = "off" if self.dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return f"amp={amp} channels_last={self.channels_last} compile={self.compile} on {self.device}"


@dataclass(frozen=True)
class SpeedSettings:
    """The hyperparameters amp, channels-last and compile; `for_model` resolves their `auto` for a model, a device."""
    amp: AmpMode
    channels_last: AutoOnOff
    compile: AutoOnOff

    @classmethod
    def from_hyperparameters(cls, hp: Hyperparameters) -> SpeedSettings:
        return cls(amp=hp.amp, channels_last=hp.channels_last, compile=hp.compile)

    def for_model(self, model: nn.Module, device: torch.device | None = None) -> Accel:
        device = device or default_device()
        dtype = amp_dtype(self.amp, device)
        compile_ = _choice(self.compile, device.type == "cuda" and compiler_available())
        if compile_ and not compiler_available():
            raise HyperparameterError("hyperparameter compile=on: torch.compile needs a C compiler (gcc) on PATH; "
                                      "install one in the image or set compile=off")
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        return Accel(device, dtype, _choice(self.channels_last, is_convolutional(model)), compile_, scaler)
