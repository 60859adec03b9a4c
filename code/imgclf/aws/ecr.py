"""ECR request builders for `make push` (scripts/push_images.py): plain dicts, validated by botocore when sent."""

from __future__ import annotations

import base64
import json
import re

# Repository names are <prefix>-<image>; with the default prefix they are imgclf.aws.images.REPOSITORIES.
DEFAULT_PREFIX = "imgclf"
DEFAULT_KEEP = 20


def repository_name(prefix: str, image: str) -> str:
    return f"{prefix}-{image}"


def registry(account: str, region: str) -> str:
    """The registry host of an account in a region (China regions live under amazonaws.com.cn)."""
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}"


# <account>.dkr.ecr.<region>.amazonaws.com[.cn]/<repository>[:<tag>|@<digest>]
IMAGE_URI = re.compile(r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
                       r"(?P<repository>[a-z0-9._/-]+?)(?::(?P<tag>[\w.-]+)|@(?P<digest>sha256:[0-9a-f]{64}))?")


def create_repository(name: str, account: str, tags: list[dict[str, str]] | None = None) -> dict:
    """Scan on push (basic scanning: known CVEs in OS packages), encrypted at rest, tags may move (`latest`).
    registryId: the registry of `account` (default would be the caller's, whatever --account says)."""
    request = {"registryId": account, "repositoryName": name, "imageScanningConfiguration": {"scanOnPush": True},
               "imageTagMutability": "MUTABLE", "encryptionConfiguration": {"encryptionType": "AES256"}}
    if tags:
        request["tags"] = tags
    return request


def put_image_scanning_configuration(name: str, account: str) -> dict:
    """For a repository that already exists: turn scan on push on (again)."""
    return {"registryId": account, "repositoryName": name, "imageScanningConfiguration": {"scanOnPush": True}}


def describe_image_request(uri: str) -> dict | None:
    """DescribeImages for the tag of an ECR image URI; None when the URI is not a tagged ECR image."""
    match = IMAGE_URI.fullmatch(uri)
    if not match or not match["tag"]:
        return None
    return {"registryId": match["account"], "repositoryName": match["repository"],
            "imageIds": [{"imageTag": match["tag"]}]}


def digest_uri(uri: str, digest: str) -> str:
    """The tagged URI with its tag replaced by the digest: <registry>/<repository>@sha256:..."""
    return uri.rsplit(":", 1)[0] + "@" + digest


def lifecycle_policy(keep: int) -> dict:
    """Expire all but the `keep` most recently pushed images, tagged or not."""
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least 1 image")
    return {"rules": [{
        "rulePriority": 1,
        "description": f"keep the last {keep} images",
        "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep},
        "action": {"type": "expire"},
    }]}


def put_lifecycle_policy(name: str, keep: int, account: str) -> dict:
    return {"registryId": account, "repositoryName": name,
            "lifecyclePolicyText": json.dumps(lifecycle_policy(keep), sort_keys=True)}


def docker_credentials(authorization_data: dict) -> tuple[str, str, str]:
    """(username, password, registry URL) from one GetAuthorizationToken authorizationData entry."""
    user, sep, password = base64.b64decode(authorization_data["authorizationToken"]).decode().partition(":")
    if not sep:
        raise ValueError("ECR authorization token is not base64 'user:password'")
    return user, password, authorization_data["proxyEndpoint"]
