"""Fail in the first seconds when this machine has NVIDIA GPUs that PyTorch cannot use, instead of quietly
training on the CPU for hours: a driver older than the CUDA line of the installed torch (torch.version.cuda:
13.0 or 12.8, by the GPU image's build), no driver visible in the container, a GPU that the installed torch
has no kernels for, or a CPU build of torch on a GPU instance. A driver too old for this build names the build
that runs on it (imgclf.instances.GPU_BUILDS).

The machine "has NVIDIA GPUs" when SageMaker's resourceconfig.json names a GPU instance type of
imgclf.instances.GPU_FAMILIES, or when NVML (the driver's library) counts GPUs.
"""

from __future__ import annotations

import logging
import re

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


def driver_problem(where: str, driver: str) -> str | None:
    """Why this driver cannot run the installed torch's CUDA, and which build of the image can; None when it can
    (or when its version or the CUDA line is one this check cannot read)."""
    cuda = torch.version.cuda or ""
    needed, branch = instances.min_driver_for(cuda), instances.driver_branch(driver)
    if needed is None or branch is None or branch >= needed:
        return None
    reason = (f"{where} has NVIDIA driver {driver}, older than the R{needed} series that CUDA {cuda} "
              f"(PyTorch {torch.__version__}) needs")
    build = instances.gpu_build_for(branch)
    if build:
        return (f"{reason}. The {build.name} build of the GPU image (PyTorch {build.torch}, CUDA {build.cuda}) runs "
                f"on R{build.min_driver} and newer: {build.how_to_use()} (docs/images.md)")
    return (f"{reason}, and no build of the GPU image runs on it (the oldest driver one runs on is "
            f"R{instances.OLDEST_DRIVER}): "
            "choose an instance family whose hosts have a newer driver (docs/images.md)")


def has_kernels_for(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Whether a torch built for `arch_list` (torch.cuda.get_arch_list(): sm_75, sm_90a, compute_120) runs on a GPU
    of this compute capability: machine code of the same major and an equal or lower minor (sm_86 runs on 8.9;
    sm_90a only on 9.0), or PTX of an equal or lower capability, which the driver compiles."""
    major, minor = capability
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
        if not found:
            continue
        kind, a_major, a_minor, variant = found[1], int(found[2]), int(found[3]), found[4]
        if kind == "sm" and a_major == major and (a_minor == minor if variant == "a" else a_minor <= minor):
            return True
        if kind == "compute" and not variant and (a_major, a_minor) <= (major, minor):
            return True
    return False


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
        return (driver_problem(where, driver)
                or f"{where} has NVIDIA GPUs and driver {driver}, but torch.cuda.is_available() is False")
    capability = torch.cuda.get_device_capability(0)
    arch_list = torch.cuda.get_arch_list()
    if not (has_kernels_for(arch_list, capability) if arch_list else capability >= instances.MIN_CAPABILITY):
        kernels = ", ".join(arch_list) or "compute capability " + ".".join(map(str, instances.MIN_CAPABILITY)) + "+"
        return (f"{where}'s {torch.cuda.get_device_name(0)} has compute capability {'.'.join(map(str, capability))}; "
                f"this image's PyTorch {torch.__version__} (CUDA {torch.version.cuda}) has kernels for {kernels} only")
    return None


def compatibility_note(driver: str | None) -> str:
    """' (through CUDA minor version compatibility)' when the driver is older than the installed torch's own CUDA
    toolkit driver (the cu128 build on R535 or R550: no PTX JIT there), else ''."""
    build = next((b for b in instances.GPU_BUILDS if b.cuda == torch.version.cuda), None)
    branch = instances.driver_branch(driver)
    if build and branch is not None and branch < build.native_driver:
        return f" (older than CUDA {build.cuda}'s R{build.native_driver}: through CUDA minor version compatibility)"
    return ""


def check(instance_type: str | None) -> None:
    """Raise CudaUnusableError (-> /opt/ml/output/failure) when GPUs are there and CUDA cannot use them."""
    gpus, driver, nvml_error = nvml_gpus()
    reason = problem(instance_type, gpus, driver, nvml_error)
    if reason:
        raise CudaUnusableError(reason)
    if torch.cuda.is_available():
        log.info("CUDA %s (PyTorch %s): %d GPU(s), %s, driver %s%s", torch.version.cuda, torch.__version__,
                 torch.cuda.device_count(), torch.cuda.get_device_name(0), driver, compatibility_note(driver))
