"""ECR image URIs of the training and serving images that `make push` publishes."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from imgclf import instances
from imgclf.aws.ecr import DEFAULT_PREFIX, describe_image_request, digest_uri, registry, repository_name

log = logging.getLogger("imgclf.aws")

IMAGES = ("train-cpu", "train-gpu", "serve", "serve-gpu")
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


def image_tag_default() -> str:
    """The tag `make push` gives (TAG: `git rev-parse --short=12 HEAD` of this checkout), else `latest`."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_TAG
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else DEFAULT_TAG


def resolve_digest(api, uri: str) -> str:
    """An ECR image URI with a tag -> the same image by digest (<registry>/<repository>@sha256:...).

    Tags move (`make push` moves `latest`): a model must name the image it runs, and its name hashes the URI, so a
    new push gives a new model. Other URIs, and a dry run without AWS access, keep the URI as given.
    """
    request = describe_image_request(uri)
    if request is None or api.session is None:
        return uri
    from imgclf.aws.session import AwsError  # lazy: images.py stays importable without boto3

    try:
        answer = api.call("ecr", "DescribeImages", request, mutates=False)
    except AwsError as e:
        if e.code in ("ImageNotFoundException", "RepositoryNotFoundException"):
            raise AwsError(f"image {uri} not found ({e.code}): push it with `make push` (which tags the git sha and "
                           "latest), or pick another tag with --image-tag or --image", code=e.code) from None
        raise
    digest = answer["imageDetails"][0]["imageDigest"]
    resolved = digest_uri(uri, digest)
    log.info("image %s is %s", uri, resolved)
    return resolved
