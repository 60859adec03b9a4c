"""SageMaker instance families and the training image that runs on each: one table, read by the scripts (which
image to send a job to, and which families to refuse) and by the training job (fail in the first seconds when
the instance has NVIDIA GPUs that this image's PyTorch cannot use, instead of training on the CPU).

The GPU image carries PyPI's torch 2.14.1, the CUDA 13.0 build: kernels for compute capability 7.5 and newer,
and it needs an NVIDIA driver of the R580 series or newer on the host (docs/images.md).
"""

from __future__ import annotations

from imgclf.errors import UserError

CUDA_LINE = "13.0"
MIN_DRIVER = 580  # the R580 series: the oldest driver that runs CUDA 13.0 without cuda-compat
MIN_CAPABILITY = (7, 5)

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


def markdown_table() -> str:
    """The supported and refused families, as docs/images.md shows them (kept equal by a test)."""
    rows = ["| family | accelerator | compute capability | image |", "|---|---|---|---|"]
    rows += [f"| {name} | {gpu} | {cc} | train-gpu |" for name, (gpu, cc) in GPU_FAMILIES.items()]
    rows += [f"| {name} | {why.split(':', 1)[0]} | | refused: {why.split(': ', 1)[1]} |"
             for name, why in UNSUPPORTED.items()]
    rows.append("| any other (m5, c5, c6i, r5, t3, ...) | CPU | | train-cpu |")
    return "\n".join(rows)
