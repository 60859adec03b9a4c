"""InvokeEndpoint through the sagemaker-runtime client: a sender for imgclf.aws.invocations.predict to a SageMaker
endpoint, or with `local` to an endpoint of deploy.py --local (the SageMaker SDK's local runtime client)."""

from __future__ import annotations

import os

import botocore.config
import botocore.exceptions
import urllib3

from imgclf.aws.invocations import Refused, Send, Unreachable, error_message
from imgclf.aws.session import local_session, make_session


def via_endpoint(name: str, region: str | None, profile: str | None, timeout: float, local: bool = False,
                 target_model: str | None = None) -> Send:
    """A sender to endpoint `name` (with `target_model`, that model of a multi-model endpoint). Missing credentials
    or an unknown endpoint raise LookupError when sending."""
    if local:
        return _via_local_endpoint(name)
    session = make_session(region, profile)
    client = session.client("sagemaker-runtime", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                            config=botocore.config.Config(read_timeout=timeout, retries={"max_attempts": 2}))

    def send(body: bytes, ctype: str, top_k: int | None) -> str:
        try:
            return client.invoke_endpoint(**_request(name, body, ctype, top_k, target_model))["Body"].read().decode()
        except botocore.exceptions.ClientError as e:
            err, response = e.response.get("Error", {}), e.response
            if err.get("Code") == "ModelError":  # the container answered 4xx/5xx
                status = response.get("OriginalStatusCode", "?")
                message = error_message(response.get("OriginalMessage", err.get("Message", "")))
                raise Refused(f"HTTP {status}: {message}") from None
            raise LookupError(f"endpoint {name!r} in {session.region_name}: {err.get('Code')}: "
                              f"{err.get('Message')}") from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError) as e:
            raise Unreachable(str(e)) from None
        except botocore.exceptions.NoCredentialsError as e:
            raise LookupError(f"{e}: run `aws configure`, set AWS_PROFILE, or pass --profile") from None
    return send


def _request(name: str, body: bytes, ctype: str, top_k: int | None, target_model: str | None = None) -> dict:
    params = {"EndpointName": name, "Body": body, "ContentType": ctype, "Accept": "application/json"}
    if top_k:
        params["CustomAttributes"] = f"top_k={top_k}"
    if target_model:
        params["TargetModel"] = target_model
    return params


def _via_local_endpoint(name: str) -> Send:
    """The local client returns the container's answer whatever its status (SageMaker raises ModelError)."""
    client = local_session().sagemaker_runtime_client

    def send(body: bytes, ctype: str, top_k: int | None) -> str:
        try:
            response = client.invoke_endpoint(**_request(name, body, ctype, top_k))
        except urllib3.exceptions.HTTPError as e:
            raise Unreachable(f"no local endpoint answers on localhost:{client.serving_port} ({e}); start one with "
                              f"`scripts/deploy.py --local --name {name} --model-data ...`") from None
        body = response["Body"].read()
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        if status >= 400:
            raise Refused(f"HTTP {status}: {error_message(body)}")
        return body.decode()
    return send
