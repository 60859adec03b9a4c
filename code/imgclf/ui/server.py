"""The try-a-model page's server: the page at /, and the model server's own API behind it, same origin.

`python -m imgclf.local serve --ui` runs it in a thread of the local-mode process. GET / returns
index.html; POST /invocations and GET /ping are forwarded to the model server (multi-model-server on
127.0.0.1) byte for byte, and its status, headers and body come back as they are. So the page sends the very
request scripts/predict.py sends, and a SageMaker endpoint answers it the same way. The page needs no CORS
(one origin) and nothing from the network.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

log = logging.getLogger("imgclf.ui")

PAGE = "index.html"
FORWARDED = {("POST", "/invocations"), ("GET", "/ping")}
# Headers that describe one connection, not the message (RFC 9110, 7.6.1): never forwarded either way.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
              "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"}
UPSTREAM_TIMEOUT = 120.0  # above MMS's own per-request timeout (SAGEMAKER_MODEL_SERVER_TIMEOUT, 60 s)


def page() -> bytes:
    return resources.files(__package__).joinpath(PAGE).read_bytes()


class PageHandler(BaseHTTPRequestHandler):
    """One request: the page, a forwarded model-server call, or a JSON 404/405 in the server's error shape."""

    protocol_version = "HTTP/1.1"
    server: PageServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self.reply(HTTPStatus.OK, page(), {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})
        else:
            self.route()

    def do_POST(self) -> None:  # noqa: N802
        self.route()

    def route(self) -> None:
        path = self.path.split("?", 1)[0]
        if (self.command, path) in FORWARDED:
            self.forward()
        elif path in {p for _, p in FORWARDED} | {"/"}:
            self.error(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} {path}: not allowed here")
        else:
            self.error(HTTPStatus.NOT_FOUND, f"{path}: no such page; the page is at /, the model at POST /invocations")

    def forward(self) -> None:
        length = self.headers.get("Content-Length")
        if self.command == "POST" and length is None:
            self.error(HTTPStatus.LENGTH_REQUIRED, "send the request body with a Content-Length")
            return
        body = self.rfile.read(int(length)) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        host, port = self.server.upstream
        connection = http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT)
        try:
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered before reading the whole body (MMS's 413 on a large one): relay that answer
            response = connection.getresponse()
            status, reason, data = response.status, response.reason, response.read()
            relayed = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        except (OSError, http.client.HTTPException) as e:
            self.error(HTTPStatus.BAD_GATEWAY, f"the model server on {host}:{port} did not answer ({e}); "
                                               "it may still be starting: try again in a moment")
            return
        finally:
            connection.close()
        self.reply(status, data, dict(relayed), reason)

    def error(self, status: HTTPStatus, message: str) -> None:
        body = json.dumps({"code": int(status), "type": status.phrase.replace(" ", ""), "message": message})
        self.reply(status, body.encode(), {"Content-Type": "application/json"})

    def reply(self, status: int, body: bytes, headers: dict[str, str], reason: str | None = None) -> None:
        self.send_response(status, reason)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s " + format, self.address_string(), *args)


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int]):
        super().__init__(address, PageHandler)
        self.upstream = upstream

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"


def start(port: int, upstream_port: int, host: str = "127.0.0.1") -> PageServer:
    """Serve the page on host:port in a daemon thread, forwarding to the model server on 127.0.0.1:upstream_port;
    `shutdown()` and `server_close()` stop it."""
    server = PageServer((host, port), ("127.0.0.1", upstream_port))
    threading.Thread(target=server.serve_forever, name="imgclf-ui", daemon=True).start()
    return server
