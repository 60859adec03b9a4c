"""Hostile requests, sent as raw bytes: what a public app forwards from its users, and what an attacker sends.

Shared by the host tests (tests/integration/test_serving.py) and the image tests (tests/images/test_images.py).
Every case must get a JSON 4xx within 2 s (the server runs with IMGCLF_BODY_TIMEOUT_S=1, so a body that never
comes is a 408 in 1 s).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time

from PIL import Image

BODY_TIMEOUT_S = 1  # the server's IMGCLF_BODY_TIMEOUT_S in these tests


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 60)).save(buf, "PNG")
    return buf.getvalue()


def request(method: str, path: str, body: bytes = b"", content_type: str = "image/png", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    if "content_length" not in headers and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k.replace('_', '-').title()}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_request(doc) -> bytes:
    return request("POST", "/invocations", json.dumps(doc).encode() if not isinstance(doc, bytes) else doc,
                   "application/json")


def cases() -> dict[str, tuple[bytes, bool, int]]:
    """name -> (raw request, close our sending side after it, expected status)."""
    thin = base64.b64encode(png(1, 5000)).decode()
    dog = base64.b64encode(png(64, 48)).decode()
    post = lambda body, **h: request("POST", "/invocations", body, **h)  # noqa: E731
    return {
        # the model server's management API and its other inference paths: not on the serving port
        "list_models": (request("GET", "/models"), True, 404),
        "register_handler": (request("POST", "/models?url=/tmp&handler=os:system&initial_workers=1"), True, 404),
        "scale_to_zero": (request("PUT", "/models/model?min_worker=0&max_worker=0"), True, 404),
        "unregister": (request("DELETE", "/models/model"), True, 404),
        "predictions_path": (request("POST", "/predictions/model", png(8, 8)), True, 404),
        "api_description": (request("OPTIONS", "/"), True, 404),
        "ping_by_post": (request("POST", "/ping", b"x"), True, 405),
        # shape bombs: tiny files that resize into huge images
        "png_1x20000": (post(png(1, 20000)), True, 400),
        "png_20000x1": (post(png(20000, 1)), True, 400),
        "json_64_thin_images": (json_request({"instances": [{"b64": thin}] * 64}), True, 400),
        "deep_json": (json_request(b"[" * 100_000 + b"]" * 100_000), True, 400),
        "json_huge_top_k": (json_request(f'{{"instances": [{{"b64": "{dog}"}}], "top_k": {"9" * 5000}}}'.encode()),
                            True, 400),
        "top_k_superscript_two": (post(png(64, 48), x_amzn_sagemaker_custom_attributes="top_k=\u00b2"), True, 400),
        "top_k_4300_digits": (post(png(64, 48), x_amzn_sagemaker_custom_attributes="top_k=" + "7" * 4300), True,
                              400),
        # lying and malformed framing
        "truncated_body": (request("POST", "/invocations", b"x" * 10, content_length="1000"), True, 400),
        "body_never_comes": (request("POST", "/invocations", b"x" * 10, content_length="1000"), False, 408),
        "content_length_abc": (request("POST", "/invocations", content_length="abc"), True, 400),
        "content_length_2gb": (request("POST", "/invocations", content_length=str(2 * 1024**3)), True, 413),
        "two_content_lengths": (request("POST", "/invocations", b"abcd", content_length="4") .replace(
            b"Content-Length: 4", b"Content-Length: 4\r\nContent-Length: 9", 1), True, 400),
        "chunked": (request("POST", "/invocations", b"4\r\nabcd\r\n0\r\n\r\n", transfer_encoding="chunked"), True,
                    411),
        "no_content_length": (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\r\n", True, 411),
        "garbage_request_line": (b"\x16\x03\x01\x02\x00 hello\r\n\r\n", True, 400),
        "huge_head": (b"GET /ping HTTP/1.1\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n", True, 431),
        "space_before_colon": (b"GET /ping HTTP/1.1\r\nContent-Length : 5\r\n\r\n", True, 400),
        # heads the model server's HTTP decoder or the relay (http.client) would refuse: the front answers them
        "head_over_8k": (b"GET /ping HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n", True, 431),
        "bare_cr_in_header_value": (post(png(8, 8), x_foo="a\rb"), True, 400),
        "nul_in_header_value": (post(png(8, 8), x_foo="a\x00b"), True, 400),
        "non_ascii_header_name": (post(png(8, 8)).replace(b"Host:", b"X-\xe9: v\r\nHost:", 1), True, 400),
    }


def send(port: int, data: bytes, close_sending: bool = True, timeout: float = 10) -> tuple[int, dict, float]:
    """(status, JSON body, seconds) of one raw request on a new connection."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # refused before all of it was read: read the answer
            pass
        if close_sending:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    return status, json.loads(body), time.monotonic() - start


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def assert_battery(port: int) -> None:
    """Every case: the expected JSON 4xx within 2 s."""
    wrong = {}
    for name, (data, close_sending, expected) in cases().items():
        status, body, seconds = send(port, data, close_sending)
        if status != expected or body.get("code") != status or not body.get("message") or seconds > 2:
            wrong[name] = (status, body, round(seconds, 2))
    assert not wrong, wrong
