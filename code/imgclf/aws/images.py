"""ECR image URIs of the training and serving images that `make push` publishes."""

from __future__ import annotations

from imgclf.aws.ecr import DEFAULT_PREFIX, registry, repository_name

IMAGES = ("train-cpu", "train-gpu", "serve")
# The ECR repositories `make push` (scripts/push_images.py) creates and pushes to.
REPOSITORIES = {image: repository_name(DEFAULT_PREFIX, image) for image in IMAGES}
DEFAULT_TAG = "latest"


def is_gpu_instance(instance_type: str) -> bool:
    """ml.g4dn.xlarge, ml.p3.2xlarge, ... have NVIDIA GPUs; ml.m5, ml.c5, ml.t3 do not."""
    family = instance_type.removeprefix("ml.").split(".")[0]
    return family[:1] in ("g", "p")


def image_uri(account: str, region: str, kind: str, tag: str = DEFAULT_TAG) -> str:
    return f"{registry(account, region)}/{REPOSITORIES[kind]}:{tag}"


def training_kind(instance_type: str) -> str:
    return "train-gpu" if is_gpu_instance(instance_type) else "train-cpu"
