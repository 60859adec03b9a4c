"""Clients with clear errors, and the dry run: requests printed as JSON after botocore validates them.

Every script builds its requests as dicts and sends them through `Api.call`, so `--dry-run` prints
exactly what would be sent (validated against the service model) and sends nothing.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config
from botocore.validate import validate_parameters

from imgclf.errors import UserError

# Enough pooled connections for parallel uploads (s3sync uses up to 32 threads); retries with backoff.
CLIENT_CONFIG = Config(max_pool_connections=32, retries={"mode": "standard"})


class AwsError(UserError):
    """Credentials, region, role or a resource is missing or wrong; the message says which and what to do."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code  # the AWS error code (e.g. ValidationException) when the service answered one


def make_session(region: str | None = None, profile: str | None = None) -> boto3.Session:
    try:
        session = boto3.Session(region_name=region, profile_name=profile)
    except botocore.exceptions.ProfileNotFound as e:
        raise AwsError(f"{e}; list profiles with `aws configure list-profiles` or drop --profile") from None
    if not session.region_name:
        raise AwsError("no AWS region: pass --region (e.g. us-east-1) or set AWS_REGION / AWS_DEFAULT_REGION")
    if session.region_name not in session.get_available_regions("sagemaker") and not os.environ.get(
        "AWS_ENDPOINT_URL"
    ):
        raise AwsError(f"unknown region {session.region_name!r}: SageMaker regions are "
                       + ", ".join(session.get_available_regions("sagemaker")))
    if session.get_credentials() is None:
        raise AwsError("no AWS credentials: run `aws configure` or `aws sso login`, set AWS_PROFILE or "
                       "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or pass --profile")
    return session


def _json_default(value: Any):
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    if hasattr(value, "read") and hasattr(value, "name"):  # an open file as a request body
        return f"<file {value.name}>"
    return str(value)


class Api:
    """Sends requests, or in dry-run mode validates and prints them (one JSON object per line)."""

    def __init__(self, session: boto3.Session | None, dry_run: bool = False, out=None,
                 endpoint_url: str | None = None):
        self.session, self.dry_run, self.out = session, dry_run, out or sys.stdout
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        self._clients: dict[str, Any] = {}

    def client(self, service: str):
        if service not in self._clients:
            if self.session is None:  # dry run without credentials: the service model is all we need
                self._clients[service] = boto3.client(
                    service, region_name="us-east-1", aws_access_key_id="dry-run", aws_secret_access_key="dry-run")
            else:
                self._clients[service] = self.session.client(service, endpoint_url=self.endpoint_url,
                                                             config=CLIENT_CONFIG)
        return self._clients[service]

    def validate(self, service: str, operation: str, params: dict) -> None:
        """Raise botocore's ParamValidationError if `params` does not fit the operation's input shape."""
        client = self.client(service)
        model = client.meta.service_model.operation_model(operation)
        validate_parameters(params, model.input_shape)

    def call(self, service: str, operation: str, params: dict | None = None, mutates: bool = True) -> dict:
        """Send `operation` (API name, e.g. CreateTrainingJob). In a dry run, mutating calls are printed instead."""
        params = params or {}
        if self.dry_run and mutates:
            self.validate(service, operation, params)
            print(json.dumps({"service": service, "operation": operation, "request": params},
                             default=_json_default, sort_keys=True), file=self.out, flush=True)
            return {}
        client = self.client(service)
        method = getattr(client, _snake(client, operation))
        try:
            return method(**params)
        except botocore.exceptions.NoCredentialsError:
            raise AwsError("no AWS credentials: run `aws configure`, set AWS_PROFILE, or pass --profile") from None
        except botocore.exceptions.ClientError as e:
            err = e.response.get("Error", {})
            raise AwsError(f"{service} {operation} failed: {err.get('Code')}: {err.get('Message')}",
                           code=err.get("Code")) from None


def _snake(client, operation: str) -> str:
    for name, api in client.meta.method_to_api_mapping.items():
        if api == operation:
            return name
    raise AwsError(f"{operation} is not an operation of {client.meta.service_model.service_name}")
