"""InvokeEndpoint through the sagemaker-runtime client: a sender for imgclf.aws.invocations.predict to a SageMaker
endpoint, or with `local` to an endpoint of deploy.py --local (the SageMaker SDK's local runtime client); and
InvokeEndpointAsync for an asynchronous endpoint (deploy.py --async-output): the image uploaded to S3, the answer
(or the failure) read from S3 once SageMaker writes it."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import botocore.exceptions
import urllib3

from imgclf.aws.invocations import Refused, Send, Unreachable, error_message
from imgclf.aws.session import client_config, local_session, make_session


def via_endpoint(name: str, region: str | None, profile: str | None, timeout: float, local: bool = False,
                 target_model: str | None = None) -> Send:
    """A sender to endpoint `name` (with `target_model`, that model of a multi-model endpoint). Missing credentials
    or an unknown endpoint raise LookupError when sending."""
    if local:
        return _via_local_endpoint(name)
    session = make_session(region, profile)
    client = session.client("sagemaker-runtime", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                            config=client_config(session, {"max_attempts": 2}, read_timeout=timeout))

    def send(body: bytes, ctype: str, top_k: int | None) -> str:
        with _aws_errors(name, session.region_name):
            return client.invoke_endpoint(**_request(name, body, ctype, top_k, target_model))["Body"].read().decode()
    return send


@contextlib.contextmanager
def _aws_errors(name: str, region: str | None) -> Iterator[None]:
    """botocore's errors as predict's: the container's 4xx/5xx -> Refused, no connection -> Unreachable, an unknown
    endpoint or missing credentials -> LookupError."""
    try:
        yield
    except botocore.exceptions.ClientError as e:
        err, response = e.response.get("Error", {}), e.response
        if err.get("Code") == "ModelError":  # the container answered 4xx/5xx
            status = response.get("OriginalStatusCode", "?")
            message = error_message(response.get("OriginalMessage", err.get("Message", "")))
            raise Refused(f"HTTP {status}: {message}") from None
        raise LookupError(f"endpoint {name!r} in {region}: {err.get('Code')}: {err.get('Message')}") from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError) as e:
        raise Unreachable(str(e)) from None
    except botocore.exceptions.NoCredentialsError as e:
        raise LookupError(f"{e}: run `aws configure`, set AWS_PROFILE, or pass --profile") from None


def via_async_endpoint(name: str, inputs: str, region: str | None, profile: str | None, wait: float,
                       poll_interval: float = 5.0) -> Send:
    """A sender to the asynchronous endpoint `name`: each image goes to a new object under `inputs` (s3://...),
    InvokeEndpointAsync queues it, and the answer is read from the output object SageMaker names, or the failure
    from the failure object, waiting up to `wait` seconds (an endpoint at zero instances first starts one)."""
    bucket, _, prefix = inputs.removeprefix("s3://").partition("/")
    if not inputs.startswith("s3://") or not bucket:
        raise ValueError(f"--async {inputs!r}: give the S3 prefix the images are uploaded to, s3://bucket/prefix/")
    session = make_session(region, profile)
    endpoint_url = os.environ.get("AWS_ENDPOINT_URL")
    config = client_config(session)
    runtime = session.client("sagemaker-runtime", endpoint_url=endpoint_url, config=config)
    s3 = session.client("s3", endpoint_url=endpoint_url, config=config)

    def read(uri: str | None) -> bytes | None:
        if not uri:
            return None
        where, _, key = uri.removeprefix("s3://").partition("/")
        try:
            return s3.get_object(Bucket=where, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None  # not written yet
            raise LookupError(f"cannot read {uri}: {e}") from None

    def send(body: bytes, ctype: str, top_k: int | None) -> str:
        key = f"{prefix.rstrip('/')}/{uuid.uuid4().hex}".lstrip("/")
        with _aws_errors(name, session.region_name):
            s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ctype)
            request = {k: v for k, v in _request(name, body, ctype, top_k).items() if k != "Body"}
            answer = runtime.invoke_endpoint_async(**request, InputLocation=f"s3://{bucket}/{key}")
        output, failure = answer["OutputLocation"], answer.get("FailureLocation")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if (done := read(output)) is not None:
                return done.decode()
            if (failed := read(failure)) is not None:
                raise Refused(error_message(failed))
            time.sleep(poll_interval)
        raise Unreachable(f"no answer within {wait:g} s (an endpoint at zero instances takes minutes to start one); "
                          f"the request stays queued and its answer will be {output}")
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
