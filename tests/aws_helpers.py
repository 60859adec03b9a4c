"""Running the AWS scripts as subprocesses, and reading what they printed and what the moto server holds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
from botocore.validate import validate_parameters

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ACCOUNT, REGION = "123456789012", "us-east-1"  # moto's default account
ROLE = f"arn:aws:iam::{ACCOUNT}:role/imgclf-sagemaker"


def output_tarball(files: dict[str, bytes]) -> bytes:
    """A job's output.tar.gz as SageMaker uploads it: `files` (name -> content) at its top level."""
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return body.getvalue()


def run_script(name: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def offline_env() -> dict[str, str]:
    """No credentials, no region, no config: a dry run must still work, and nothing can be sent."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


def dry_run_requests(stdout: str) -> list[dict]:
    """The JSON requests a dry run printed, each validated again here against botocore's service model."""
    requests = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    for r in requests:
        client = boto3.client(r["service"], region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
        validate_parameters(r["request"], client.meta.service_model.operation_model(r["operation"]).input_shape)
    return requests


def client(service: str, endpoint: str):
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def sagemaker_backend():
    """The moto server runs in this process: tests set job states that moto does not simulate."""
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[ACCOUNT][REGION]


def failed(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


def put_ecr_image(endpoint: str, repository: str, tags: list[str], layer: str, registry: str = ACCOUNT) -> str:
    """Record an image in the moto server's ECR (a manifest with one layer; moto derives the digest from the layers),
    as `make push` would; return its digest."""
    import hashlib

    ecr = client("ecr", endpoint)
    try:
        ecr.create_repository(repositoryName=repository, registryId=registry)
    except ecr.exceptions.RepositoryAlreadyExistsException:
        pass
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 2,
                   "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": len(layer),
                    "digest": "sha256:" + hashlib.sha256(layer.encode()).hexdigest()}]})
    digest = None
    for tag in tags:
        digest = ecr.put_image(repositoryName=repository, registryId=registry, imageManifest=manifest,
                               imageTag=tag)["image"]["imageId"]["imageDigest"]
    return digest
