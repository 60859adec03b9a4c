"""Predictions from the serving contract's POST /invocations, client side (scripts/predict.py, the demo): each image
sent as it is (raw bytes, Content-Type from the file name) in its own request, top-k in the
X-Amzn-SageMaker-Custom-Attributes header (top_k=K), which SageMaker passes through to the container; the answer
printed as a top-k table or as its JSON.

A sender is a function (image bytes, content type, top_k) -> the response text: `via_url` for a server on this
machine (the standard library only); imgclf.aws.runtime_client.via_endpoint for a SageMaker endpoint.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

EXIT_OK, EXIT_PREDICTION_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
Send = Callable[[bytes, str, int | None], str]  # (image bytes, content type, top_k) -> the response text


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


def via_url(url: str, timeout: float) -> Send:
    """A sender to the server at `url` (its /invocations when the URL has no path)."""
    url = invocations_url(url)

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


def table(path: str, response: str) -> str:
    lines = [path]
    for prediction in json.loads(response)["predictions"]:
        for rank, item in enumerate(prediction["top_k"], 1):
            lines.append(f"  {rank}. {item['label']:<32} {100 * item['probability']:6.2f}%  "
                         f"(class {item['index']}: {item['class_name']})")
    return "\n".join(lines)


def predict(images: Sequence[Path], connect: Callable[[], Send], top_k: int | None = None,
            as_json: bool = False) -> int:
    """Send each image through the sender `connect` makes; print each answer (a table, or its JSON on one line).
    Returns the exit status: EXIT_OK, EXIT_PREDICTION_FAILED (a refused image or an unexpected answer; the others
    are still printed), EXIT_USAGE (no such file, a bad URL, AWS credentials/region/endpoint), EXIT_UNREACHABLE."""
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        print(f"error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        send = connect()
    except Exception as e:  # ValueError (bad URL), AwsError (credentials, region, profile)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    status = EXIT_OK
    for path in images:
        try:
            response = send(path.read_bytes(), content_type(path), top_k)
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
            print(response.strip() if as_json else table(str(path), response), flush=True)
        except (ValueError, KeyError, TypeError):
            print(f"{path}: unexpected response (not the predictions JSON): {response[:200]!r}", file=sys.stderr)
            status = EXIT_PREDICTION_FAILED
    return status
