"""ECR image URIs of the training and serving images that `make push` publishes."""

from __future__ import annotations

from imgclf import instances
from imgclf.aws.ecr import DEFAULT_PREFIX, registry, repository_name

IMAGES = ("train-cpu", "train-gpu", "serve")
# The ECR repositories `make push` (scripts/push_images.py) creates and pushes to.
REPOSITORIES = {image: repository_name(DEFAULT_PREFIX, image) for image in IMAGES}
DEFAULT_TAG = "latest"


def image_uri(account: str, region: str, kind: str, tag: str = DEFAULT_TAG) -> str:
    return f"{registry(account, region)}/{REPOSITORIES[kind]}:{tag}"


# SageMaker's local mode: the SDK's instance types, and the images `make build` tagged on this machine.
LOCAL_INSTANCE_TYPES = ("local", "local_gpu")


def local_image(kind: str, tag: str = DEFAULT_TAG) -> str:
    return f"{REPOSITORIES[kind]}:{tag}"


def training_kind(instance_type: str) -> str:
    """train-gpu or train-cpu by imgclf.instances' table; families no image can serve raise InstanceTypeError."""
    if instance_type in LOCAL_INSTANCE_TYPES:
        return "train-gpu" if instance_type == "local_gpu" else "train-cpu"
    return instances.training_image(instance_type)
