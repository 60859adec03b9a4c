"""Fail in the first seconds when this machine has NVIDIA GPUs that PyTorch cannot use, instead of quietly
training on the CPU for hours: a driver older than the CUDA line of the image, no driver visible in the
container, a GPU too old for the image's kernels, or a CPU build of torch on a GPU instance.

The machine "has NVIDIA GPUs" when SageMaker's resourceconfig.json names a GPU instance type of
imgclf.instances.GPU_FAMILIES, or when NVML (the driver's library) counts GPUs.
"""

from __future__ import annotations

import logging

import torch

from imgclf import instances
from imgclf.errors import UserError

log = logging.getLogger(__name__)


class CudaUnusableError(UserError):
    """NVIDIA GPUs are there, and this PyTorch cannot use them."""


def nvml_gpus() -> tuple[int, str | None, str | None]:
    """(GPU count, driver version, why NVML could not answer) from the NVIDIA driver's own library."""
    try:
        import pynvml
    except ImportError:
        return 0, None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return 0, None, f"NVML: {e}"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        return pynvml.nvmlDeviceGetCount(), driver.decode() if isinstance(driver, bytes) else driver, None
    finally:
        pynvml.nvmlShutdown()


def problem(instance_type: str | None, gpus: int, driver: str | None, nvml_error: str | None) -> str | None:
    """Why CUDA cannot be used although GPUs are there; None when there are none, or CUDA works."""
    expected = bool(instance_type and instances.has_nvidia_gpus(instance_type))
    if not expected and gpus == 0:
        return None
    where = f"this {instance_type}" if expected else f"this machine ({gpus} NVIDIA GPU(s) per NVML)"
    if torch.version.cuda is None:
        return (f"{where} has NVIDIA GPUs, but this image's PyTorch ({torch.__version__}) is a CPU build: "
                "train on GPU instances with the train-gpu image (scripts/train.py picks it by instance type)")
    if not torch.cuda.is_available():
        if driver is None:
            return (f"{where} has NVIDIA GPUs, but no NVIDIA driver is visible in the container ({nvml_error}); "
                    "run it with the GPUs passed through (SageMaker does; docker: --gpus all)")
        if int(driver.split(".")[0]) < instances.MIN_DRIVER:
            return (f"{where} has NVIDIA driver {driver}, older than the R{instances.MIN_DRIVER} series that CUDA "
                    f"{torch.version.cuda} (PyTorch {torch.__version__}) needs; see docs/images.md")
        return f"{where} has NVIDIA GPUs and driver {driver}, but torch.cuda.is_available() is False"
    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < instances.MIN_CAPABILITY:
        return (f"{where}'s {torch.cuda.get_device_name(0)} has compute capability {major}.{minor}; this image's "
                f"PyTorch (CUDA {torch.version.cuda}) needs {'.'.join(map(str, instances.MIN_CAPABILITY))} or newer")
    return None


def check(instance_type: str | None) -> None:
    """Raise CudaUnusableError (-> /opt/ml/output/failure) when GPUs are there and CUDA cannot use them."""
    gpus, driver, nvml_error = nvml_gpus()
    reason = problem(instance_type, gpus, driver, nvml_error)
    if reason:
        raise CudaUnusableError(reason)
    if torch.cuda.is_available():
        log.info("CUDA %s: %d GPU(s), %s, driver %s", torch.version.cuda, torch.cuda.device_count(),
                 torch.cuda.get_device_name(0), driver)
