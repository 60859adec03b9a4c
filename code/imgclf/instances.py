"""SageMaker instance families and the training image that runs on each: one table, read by the scripts (which
image to send a job to, and which families to refuse) and by the training job (fail in the first seconds when
the instance has NVIDIA GPUs that this image's PyTorch cannot use, instead of training on the CPU).

The GPU image comes in two builds (GPU_BUILDS, docs/images.md): cu130, the default, with PyPI's torch 2.14.1 on
CUDA 13.0 (an NVIDIA driver of the R580 series or newer), and cu128 with PyPI's torch 2.10.0, the newest PyPI
torch built on CUDA 12 (R525 or newer: also the R535 and R550 hosts that AWS documents for SageMaker). Both have
kernels for compute capability 7.5 and newer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imgclf.errors import UserError

# The oldest driver branch that runs each CUDA major version: CUDA minor version compatibility (NVIDIA's CUDA
# Compatibility guide, table 1: 12.x >= 525, 13.x >= 580; the toolkit release notes, table 3, give each release's
# own, newer driver).
MIN_DRIVER_BY_CUDA_MAJOR = {11: 450, 12: 525, 13: 580}


def min_driver_for(cuda: str) -> int | None:
    """The oldest driver branch that runs CUDA `cuda` ('12.8'); None for a CUDA line this table does not know."""
    major = cuda.split(".", 1)[0]
    return MIN_DRIVER_BY_CUDA_MAJOR.get(int(major)) if major.isdigit() else None


@dataclass(frozen=True)
class GpuBuild:
    """One build of the GPU training image: Dockerfile.gpu's TORCH_SOURCE, the Makefile's TRAIN_GPU_CUDA."""

    name: str  # cu130, cu128: TRAIN_GPU_CUDA, and the tag suffix of a build other than the default
    torch: str  # PyPI's torch that it installs (requirements/lock/torch-<torch_source>.txt)
    cuda: str  # the CUDA line that torch was built with: torch.version.cuda
    native_driver: int  # its toolkit's driver branch; older ones, down to min_driver, run it with that mode's limits
    torch_source: str
    suffix: str = ""  # of its tags: <git sha><suffix>, latest<suffix>

    @property
    def min_driver(self) -> int:
        return MIN_DRIVER_BY_CUDA_MAJOR[int(self.cuda.split(".")[0])]

    @property
    def tag(self) -> str:
        """The tag `make push` moves to its newest image: scripts/train.py --image-tag picks it."""
        return f"latest{self.suffix}"

    def how_to_use(self) -> str:
        if not self.suffix:
            return "the default train-gpu image (make build push; scripts/train.py picks it)"
        return (f"make build-train-gpu-{self.name} push-train-gpu-{self.name}, then scripts/train.py (or tune.py) "
                f"--image-tag {self.tag}")


# The default first, then by torch, newest first: gpu_build_for picks the first that runs on a driver.
GPU_BUILDS = (
    GpuBuild("cu130", "2.14.1", "13.0", native_driver=580, torch_source="pypi"),
    GpuBuild("cu128", "2.10.0", "12.8", native_driver=570, torch_source="pypi-cu128", suffix="-cu128"),
)
DEFAULT_BUILD = GPU_BUILDS[0]
OLDEST_DRIVER = min(b.min_driver for b in GPU_BUILDS)  # older hosts: no build runs there
CUDA_LINE = DEFAULT_BUILD.cuda
MIN_DRIVER = DEFAULT_BUILD.min_driver
MIN_CAPABILITY = (7, 5)  # both builds: sm_75 (T4) and newer
# What AWS documents for SageMaker's GPU hosts: the driver branch of each family's inference hosts (default AMI,
# docs.aws.amazon.com/sagemaker/latest/dg/inference-gpu-drivers.html; the al2-ami-sagemaker-inference-gpu-2 and
# -3-1 AMIs give 535 and 550 on request). AWS documents none for training jobs: the job logs its host's driver.
DOCUMENTED_DRIVERS: dict[str, int] = {"g4dn": 470, "g5": 470, "p4d": 470, "p4de": 470, "g6": 535, "p5": 535,
                                      "p5e": 550, "p5en": 550}


def driver_branch(version: str | None) -> int | None:
    """'535.183.01' -> 535 (NVML's and nvidia-smi's form); None for what is not a driver version."""
    match = re.fullmatch(r"\s*(\d{3,4})(?:\.\d+)*\s*", version or "")
    return int(match.group(1)) if match else None


def gpu_build_for(driver: str | int | None) -> GpuBuild | None:
    """The build to run on a host with this driver: the first of GPU_BUILDS (newest torch) that runs on it, None when
    none does (R470 and older) or the version cannot be read."""
    branch = driver if isinstance(driver, int) else driver_branch(driver)
    if branch is None:
        return None
    return next((b for b in GPU_BUILDS if branch >= b.min_driver), None)


# family -> (accelerator, compute capability): the NVIDIA families the GPU image runs on.
GPU_FAMILIES: dict[str, tuple[str, str]] = {
    "g4dn": ("NVIDIA T4", "7.5"),
    "g5": ("NVIDIA A10G", "8.6"),
    "g6": ("NVIDIA L4", "8.9"),
    "g6e": ("NVIDIA L40S", "8.9"),
    "p4d": ("NVIDIA A100 40 GB", "8.0"),
    "p4de": ("NVIDIA A100 80 GB", "8.0"),
    "p5": ("NVIDIA H100", "9.0"),
    "p5e": ("NVIDIA H200", "9.0"),
    "p5en": ("NVIDIA H200", "9.0"),
    "p6-b200": ("NVIDIA B200", "10.0"),
}
_OLD_NVIDIA = "PyPI's torch {} (CUDA {}) has no kernels for compute capability {}; it needs 7.5 or newer"
# family -> why no image of this project can train there.
UNSUPPORTED: dict[str, str] = {
    "p3": "NVIDIA V100: " + _OLD_NVIDIA.format("2.14.1", CUDA_LINE, "7.0"),
    "p3dn": "NVIDIA V100: " + _OLD_NVIDIA.format("2.14.1", CUDA_LINE, "7.0"),
    "p2": "NVIDIA K80: " + _OLD_NVIDIA.format("2.14.1", CUDA_LINE, "3.7"),
    "g3": "NVIDIA M60: " + _OLD_NVIDIA.format("2.14.1", CUDA_LINE, "5.2"),
    "g3s": "NVIDIA M60: " + _OLD_NVIDIA.format("2.14.1", CUDA_LINE, "5.2"),
    "g4ad": "AMD Radeon Pro V520: no CUDA (the images carry NVIDIA's CUDA build of PyTorch)",
    "trn1": "AWS Trainium: needs the Neuron SDK, not CUDA",
    "trn1n": "AWS Trainium: needs the Neuron SDK, not CUDA",
    "trn2": "AWS Trainium2: needs the Neuron SDK, not CUDA",
    "inf1": "AWS Inferentia: an inference chip, not for training",
    "inf2": "AWS Inferentia2: an inference chip, not for training",
    "dl1": "Habana Gaudi: needs the Habana SynapseAI stack, not CUDA",
}


class InstanceTypeError(UserError):
    """An instance type that no image of this project can train on."""


# The serve-gpu image: onnxruntime-gpu on CUDA 13.0, so an R580+ driver. SageMaker's endpoints get one with this
# InferenceAmiVersion (botocore's ProductionVariant documentation: NVIDIA driver 580, CUDA 13.0); the default hosts
# (R470, R535) cannot run it. Batch transform's AMIs stop at R535: no GPU batch transform with this image.
SERVE_GPU_CUDA = "13.0"
SERVE_GPU_DRIVER = MIN_DRIVER_BY_CUDA_MAJOR[13]
SERVE_GPU_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"


def family(instance_type: str) -> str:
    """ml.g4dn.xlarge -> g4dn; ml.p6-b200.48xlarge -> p6-b200."""
    return instance_type.removeprefix("ml.").rsplit(".", 1)[0]


def has_nvidia_gpus(instance_type: str) -> bool:
    return family(instance_type) in GPU_FAMILIES


def training_image(instance_type: str) -> str:
    """train-gpu for the families of GPU_FAMILIES, train-cpu for CPU families; the others are refused."""
    name = family(instance_type)
    if name in GPU_FAMILIES:
        return "train-gpu"
    if name in UNSUPPORTED:
        raise InstanceTypeError(f"{instance_type}: {UNSUPPORTED[name]}. Choose one of the families in "
                                "docs/images.md (GPU: " + ", ".join(GPU_FAMILIES) + "), or a CPU instance")
    if name[:1] in ("g", "p"):  # a GPU family this table does not know yet: refuse rather than guess
        raise InstanceTypeError(f"{instance_type}: GPU family {name!r} is not in imgclf.instances.GPU_FAMILIES; "
                                "add it there if its NVIDIA GPU has compute capability 7.5 or newer")
    return "train-cpu"


def serving_image(instance_type: str) -> str:
    """serve-gpu for the families of GPU_FAMILIES, serve for the others (local_gpu: serve-gpu, local: serve)."""
    if instance_type in ("local", "local_gpu"):
        return "serve-gpu" if instance_type == "local_gpu" else "serve"
    return "serve-gpu" if has_nvidia_gpus(instance_type) else "serve"


def documented_build(name: str) -> str:
    """The driver AWS documents for a family's hosts, and the build that runs on it (docs/images.md's table)."""
    branch = DOCUMENTED_DRIVERS.get(name)
    if branch is None:
        return "none documented"
    build = gpu_build_for(branch)
    return f"R{branch}: {build.name}" if build else f"R{branch}: none (R{OLDEST_DRIVER} or newer needed)"


def markdown_table() -> str:
    """The supported and refused families, then the GPU image's builds and the drivers they run on, as
    docs/images.md shows them (kept equal by a test)."""
    rows = ["| family | accelerator | compute capability | image | driver AWS documents (inference hosts): build |",
            "|---|---|---|---|---|"]
    rows += [f"| {name} | {gpu} | {cc} | train-gpu | {documented_build(name)} |"
             for name, (gpu, cc) in GPU_FAMILIES.items()]
    rows += [f"| {name} | {why.split(':', 1)[0]} | | refused: {why.split(': ', 1)[1]} | |"
             for name, why in UNSUPPORTED.items()]
    rows.append("| any other (m5, c5, c6i, r5, t3, ...) | CPU | | train-cpu | |")
    rows += ["", "| GPU image build | torch (PyPI) | CUDA | host NVIDIA driver | tags | built by |",
             "|---|---|---|---|---|---|"]
    for newer, build in zip((None, *GPU_BUILDS), GPU_BUILDS):
        drivers = f"R{build.min_driver} or newer"
        if build.native_driver > build.min_driver:
            drivers += f" (older than R{build.native_driver}: through CUDA minor version compatibility)"
        if newer:
            drivers += f"; the build for hosts older than R{newer.min_driver}, such as R535 and R550"
        make = f"make build-train-gpu{'-' + build.name if build.suffix else ''}"
        rows.append(f"| {build.name}{'' if build.suffix else ' (default)'} | {build.torch} | {build.cuda} | {drivers} "
                    f"| `<git sha>{build.suffix}`, `{build.tag}` | `{make}` |")
    return "\n".join(rows)
