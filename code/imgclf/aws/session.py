"""Clients with clear errors, and the dry run: requests printed as JSON after botocore validates them.

Every script builds its requests as dicts and sends them through `Api.call`, so `--dry-run` prints
exactly what would be sent (validated against the service model) and sends nothing, and `--local` sends
them to the SageMaker SDK's local mode, which runs them on this machine's images with docker-compose.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import boto3
import botocore
import botocore.exceptions
from botocore.config import Config
from botocore.validate import validate_parameters

from imgclf.errors import UserError
from imgclf.exit_codes import JobFailed

MAX_CONNECTIONS = 32  # a client's pooled connections: as many requests at once (upload_data.py --workers)


def client_config(session: boto3.Session, retries: dict | None = None, **options) -> Config:
    """A client's botocore Config with our retry default (botocore's standard mode, with backoff), unless the user
    chose a retry mode or attempt count: AWS_RETRY_MODE / AWS_MAX_ATTEMPTS, or retry_mode / max_attempts in the
    profile. An explicit `retries` in a Config would override theirs."""
    profile = session._session.get_scoped_config()  # botocore's view of ~/.aws/config for this profile
    chosen = any(os.environ.get(v) for v in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS")) or \
        any(k in profile for k in ("retry_mode", "max_attempts"))
    return Config(**options, retries=None if chosen else (retries or {"mode": "standard"}))


class AwsError(UserError):
    """Credentials, region, role or a resource is missing or wrong; the message says which and what to do."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code  # the AWS error code (e.g. ValidationException) when the service answered one


def make_session(region: str | None = None, profile: str | None = None,
                 endpoint_url: str | None = None) -> boto3.Session:
    """A session for `region` (else AWS_REGION, which botocore does not read, else botocore's AWS_DEFAULT_REGION or
    the profile's), with a region and credentials, or an AwsError saying what to set. Any region name goes with
    another endpoint URL (`endpoint_url`, else AWS_ENDPOINT_URL: a moto server takes any)."""
    try:
        session = boto3.Session(region_name=region or os.environ.get("AWS_REGION") or None, profile_name=profile)
    except botocore.exceptions.ProfileNotFound as e:
        raise AwsError(f"{e}; list profiles with `aws configure list-profiles` or drop --profile") from None
    if not session.region_name:
        raise AwsError("no AWS region: pass --region (e.g. us-east-1) or set AWS_REGION / AWS_DEFAULT_REGION")
    if session.region_name not in session.get_available_regions("sagemaker") and not (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    ):
        raise AwsError(f"unknown region {session.region_name!r}: SageMaker regions are "
                       + ", ".join(session.get_available_regions("sagemaker")))
    if session.get_credentials() is None:
        raise AwsError("no AWS credentials: run `aws configure` or `aws sso login`, set AWS_PROFILE or "
                       "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or pass --profile")
    return session


# What the SDK's local clients implement; SageMaker's other services have no local mode.
LOCAL_SERVICES = ("sagemaker", "sagemaker-runtime")
LOCAL_REGION = "us-east-1"  # the SDK's session wants one; nothing reaches AWS
# The SDK phones home on every local call unless opted out (and there may be no network at all).
LOCAL_SDK_CONFIG = {"SchemaVersion": "1.0", "SageMaker": {"PythonSDK": {"Modules": {"TelemetryOptOut": True}}}}


def local_session():
    """The SageMaker SDK's LocalSession: its clients take boto3's requests and run them with docker-compose."""
    compose = shutil.which("docker-compose") or (
        shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    )
    if not compose:
        raise UserError("--local runs the images with docker-compose (the SageMaker SDK's local mode), and neither "
                        "`docker-compose` nor `docker compose` is installed: install one (e.g. apt-get install "
                        "docker-compose), or drop --local")
    try:
        from sagemaker.core.local.local_session import LocalSession
    except ImportError as e:
        raise UserError(f"--local needs the SageMaker Python SDK ({e}): pip install -r requirements/scripts.txt"
                        ) from None
    # Dummy credentials: the SDK hands the session's credentials to the containers, and local mode needs none.
    boto_session = boto3.Session(region_name=LOCAL_REGION, aws_access_key_id="local", aws_secret_access_key="local")
    return LocalSession(boto_session=boto_session, sagemaker_config=LOCAL_SDK_CONFIG)


def check_local_image(image: str) -> str:
    """A locally built image, or a UserError saying how to build it (local mode never pulls)."""
    if not shutil.which("docker"):
        raise UserError("--local needs the `docker` command (Docker, or podman behind the Docker API: "
                        "containers/podman.sh), which the SageMaker SDK's local mode drives")
    found = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True)
    if found.returncode != 0:
        raise UserError(f"image {image} not found by `docker image inspect` ({found.stderr.strip()[-200:]}): build "
                        "it with `make build` (or pass --image-tag / --image to name one that exists)")
    return image


def _json_default(value: Any):
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if hasattr(value, "read") and hasattr(value, "name"):  # an open file as a request body
        return f"<file {value.name}>"
    return str(value)


class Api:
    """Sends requests, or in dry-run mode validates and prints them (one JSON object per line)."""

    def __init__(self, session: boto3.Session | None, dry_run: bool = False, out=None,
                 endpoint_url: str | None = None, local=None, region: str | None = None):
        self.session, self.dry_run, self.out = session, dry_run, out or sys.stdout
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self.local = local  # the SDK's LocalSession (--local): its clients stand in for SageMaker's
        self.region = region  # the region asked for (--region): what a dry run without AWS access names
        self._clients: dict[str, Any] = {}

    def client(self, service: str):
        if service not in self._clients:
            if self.local is not None:
                if service not in LOCAL_SERVICES:
                    raise UserError(f"{service} has no local mode: this step needs AWS (drop --local)")
                self._clients[service] = (self.local.sagemaker_client if service == "sagemaker"
                                          else self.local.sagemaker_runtime_client)
            elif self.session is None:  # dry run without credentials: the service model is all we need
                self._clients[service] = boto3.client(
                    service, region_name="us-east-1", aws_access_key_id="dry-run", aws_secret_access_key="dry-run")
            else:
                # Enough pooled connections for parallel uploads (upload_data.py --workers).
                config = client_config(self.session, max_pool_connections=MAX_CONNECTIONS)
                self._clients[service] = self.session.client(service, endpoint_url=self.endpoint_url, config=config)
        return self._clients[service]

    def validate(self, service: str, operation: str, params: dict) -> None:
        """Raise botocore's ParamValidationError if `params` does not fit the operation's input shape, or a UserError
        for what botocore's validator leaves to AWS: a value outside its shape's enum (an instance type's typo) and a
        job name outside SageMaker's pattern. Local mode's requests are the SDK's to check (instance type local)."""
        if self.local is not None:
            return
        client = self.client(service)
        model = client.meta.service_model.operation_model(operation)
        validate_parameters(params, model.input_shape)
        for field, value in params.items():
            pattern = model.input_shape.members[field].metadata.get("pattern") if field.endswith("JobName") else None
            if pattern and isinstance(value, str) and not re.fullmatch(pattern, value):
                raise UserError(f"{operation}: {field} {value!r} is not a SageMaker job name: letters, digits and "
                                f"hyphens, not at either end ({pattern})")
        _check_enums(operation, params, model.input_shape, "")

    def call(self, service: str, operation: str, params: dict | None = None, mutates: bool = True) -> dict:
        """Send `operation` (API name, e.g. CreateTrainingJob). In a dry run, mutating calls are printed instead."""
        params = params or {}
        if mutates:
            self.validate(service, operation, params)
        if self.dry_run and mutates:
            print(json.dumps({"service": service, "operation": operation, "request": params},
                             default=_json_default, sort_keys=True), file=self.out, flush=True)
            return {}
        client = self.client(service)
        if self.local is not None:
            return self._call_local(client, service, operation, params)
        method = getattr(client, _snake(client, operation))
        try:
            return method(**params)
        except botocore.exceptions.NoCredentialsError:
            raise AwsError("no AWS credentials: run `aws configure`, set AWS_PROFILE, or pass --profile") from None
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            raise AwsError(f"{service} {operation} failed: {err.get('Code')}: {err.get('Message')}",
                           code=err.get("Code")) from None

    def _call_local(self, client, service: str, operation: str, params: dict) -> dict:
        """The SDK's local clients run jobs and endpoints in the call itself and print docker-compose's output on
        stdout, which carries the scripts' results: send it to stderr with the logs."""
        method = getattr(client, botocore.xform_name(operation), None)
        if method is None:
            raise UserError(f"{operation} has no local mode in the SageMaker SDK: run it on AWS (drop --local)")
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return method(**params) or {}
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            raise AwsError(f"local {service} {operation} failed: {err.get('Code')}: {err.get('Message')}",
                           code=err.get("Code")) from None
        except RuntimeError as e:  # the container failed: compose exited non-zero, or /ping never answered 200
            raise JobFailed(f"local {operation} failed: {e} (the container's log above says why)") from None
        except TypeError as e:  # a field the local client does not take (e.g. DataCaptureConfig)
            raise UserError(f"{operation} in local mode: {e}; the SDK's local mode lacks this option") from None


def _check_enums(operation: str, value: Any, shape, path: str) -> None:
    """A UserError naming the first string in `value` that its shape's enum lacks (botocore checks no enums)."""
    if shape.type_name == "structure" and isinstance(value, dict):
        for name, item in value.items():
            if name in shape.members:
                _check_enums(operation, item, shape.members[name], f"{path}.{name}".lstrip("."))
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            _check_enums(operation, item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "map" and isinstance(value, dict):
        for item in value.values():
            _check_enums(operation, item, shape.value, path)
    elif getattr(shape, "enum", None) and isinstance(value, str) and value not in shape.enum:
        close = difflib.get_close_matches(value, shape.enum, n=3)
        raise UserError(f"{operation}: {path} {value!r} is not one of the {len(shape.enum)} values AWS takes"
                        + (f" (did you mean {' or '.join(close)}?)" if close else "")
                        + f"; if it is newer than botocore {botocore.__version__}, `pip install -U boto3`")


def _snake(client, operation: str) -> str:
    for name, api in client.meta.method_to_api_mapping.items():
        if api == operation:
            return name
    raise AwsError(f"{operation} is not an operation of {client.meta.service_model.service_name}")
