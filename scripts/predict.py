#!/usr/bin/env python
"""Top-k breeds for one or more images, from a local server or a SageMaker endpoint.

    python scripts/predict.py dog.jpg --url http://127.0.0.1:8080          # `python -m imgclf.local serve`
    python scripts/predict.py a.jpg b.png --endpoint imgclf --region us-east-1 --top-k 3
    python scripts/predict.py dog.jpg --url http://127.0.0.1:8080 --json   # the raw response, one line per image
    python scripts/predict.py dog.jpg --local --endpoint dog-breeds        # an endpoint of deploy.py --local

Each image is sent as it is (raw bytes, Content-Type from the file name) in its own request; top-k travels in
the X-Amzn-SageMaker-Custom-Attributes header (top_k=K), which SageMaker passes through to the container.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

EXIT_OK, EXIT_PREDICTION_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EPILOG = """exit status: 0 every image predicted; 1 the server refused or failed at least one image (the others
are still printed); 2 bad arguments, unreadable image file, AWS credentials/region/endpoint problem;
3 the server or endpoint cannot be reached."""
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class Unreachable(Exception):
    pass


class Refused(Exception):
    """The server answered with an error status; the message is its explanation."""


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/x-image")


def invocations_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--url {url!r}: give http://HOST:PORT, e.g. http://127.0.0.1:8080")
    return url if parts.path.strip("/") else url.rstrip("/") + "/invocations"


def error_message(body: bytes | str) -> str:
    """The `message` of our JSON errors, else the body itself."""
    try:
        return str(json.loads(body)["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return text.strip() or "(empty response)"


def via_url(url: str, timeout: float):
    def send(body: bytes, ctype: str, top_k: int | None) -> str:
        headers = {"Content-Type": ctype, "Accept": "application/json"}
        if top_k:
            headers["X-Amzn-SageMaker-Custom-Attributes"] = f"top_k={top_k}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read().decode()
        except urllib.error.HTTPError as e:
            raise Refused(f"HTTP {e.code}: {error_message(e.read())}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise Unreachable(f"cannot reach {url}: {reason}; is the server running "
                              "(python -m imgclf.local serve --model ...)?") from None
    return send


def via_endpoint(name: str, region: str | None, profile: str | None, timeout: float, local: bool = False):
    import botocore.config
    import botocore.exceptions
    from imgclf.aws.session import local_session, make_session

    if local:  # the SDK's local runtime client: InvokeEndpoint on the container of deploy.py --local
        session = local_session()
        client = session.sagemaker_runtime_client
    else:
        session = make_session(region, profile)
        client = session.client("sagemaker-runtime", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
                                config=botocore.config.Config(read_timeout=timeout, retries={"max_attempts": 2}))

    def send(body: bytes, ctype: str, top_k: int | None) -> str:
        params = {"EndpointName": name, "Body": body, "ContentType": ctype, "Accept": "application/json"}
        if top_k:
            params["CustomAttributes"] = f"top_k={top_k}"
        if local:
            return send_local(params)
        try:
            return client.invoke_endpoint(**params)["Body"].read().decode()
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

    def send_local(params: dict) -> str:
        """The local client returns the container's answer whatever its status (SageMaker raises ModelError)."""
        import urllib3

        try:
            response = client.invoke_endpoint(**params)
        except urllib3.exceptions.HTTPError as e:
            raise Unreachable(f"no local endpoint answers on localhost:{client.serving_port} ({e}); start one with "
                              f"`scripts/deploy.py --local --name {name} --model-data ...`") from None
        body = response["Body"].read()
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        if status >= 400:
            raise Refused(f"HTTP {status}: {error_message(body)}")
        return body.decode()
    return send


def table(path: str, response: str) -> str:
    lines = [path]
    for prediction in json.loads(response)["predictions"]:
        for rank, item in enumerate(prediction["top_k"], 1):
            lines.append(f"  {rank}. {item['label']:<32} {100 * item['probability']:6.2f}%  "
                         f"(class {item['index']}: {item['class_name']})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a local server, e.g. http://127.0.0.1:8080 (/invocations is added)")
    target.add_argument("--endpoint", help="a SageMaker endpoint name (InvokeEndpoint)")
    parser.add_argument("--region", help="AWS region of the endpoint (default: AWS_REGION / profile)")
    parser.add_argument("--profile", help="AWS profile for the endpoint's credentials")
    parser.add_argument("--local", action="store_true",
                        help="with --endpoint: SageMaker's local mode (the SageMaker SDK's local runtime client), an "
                             "endpoint that scripts/deploy.py --local serves on this machine; no AWS")
    parser.add_argument("--top-k", type=int, help="breeds per image (default: the server's, 5)")
    parser.add_argument("--json", action="store_true", help="print each raw JSON response on one line")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.local and not args.endpoint:
        parser.error("--local goes with --endpoint NAME (an endpoint of deploy.py --local)")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: must be at least 1")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        send = (via_url(invocations_url(args.url), args.timeout) if args.url
                else via_endpoint(args.endpoint, args.region, args.profile, args.timeout, args.local))
    except Exception as e:  # ValueError (bad URL), AwsError (credentials, region, profile)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    status = EXIT_OK
    for path in args.images:
        try:
            response = send(path.read_bytes(), content_type(path), args.top_k)
        except Refused as e:
            print(f"{path}: refused: {e}", file=sys.stderr)
            status = EXIT_PREDICTION_FAILED
            continue
        except Unreachable as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_UNREACHABLE
        except LookupError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        try:
            print(response.strip() if args.json else table(str(path), response), flush=True)
        except (ValueError, KeyError, TypeError):
            print(f"{path}: unexpected response (not the predictions JSON): {response[:200]!r}", file=sys.stderr)
            status = EXIT_PREDICTION_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
