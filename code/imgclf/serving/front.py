"""The front on the serving port: the SageMaker contract and nothing else, relayed to multi-model-server.

SageMaker calls GET /ping and POST /invocations (batch transform also GET /execution-parameters). MMS listens
on 127.0.0.1 only, its management API (which registers handlers from any folder, unregisters models, scales
workers) on a port of its own; this front is what answers on SAGEMAKER_BIND_TO_PORT:

    GET /ping, POST /invocations    relayed to MMS's /ping and the model's predictions (503 JSON while it is not up)
    GET /execution-parameters       answered here when batch transform runs the container, else 404
    anything else                   404 JSON; a known path with another method: 405

On a multi-model endpoint (SAGEMAKER_MULTI_MODEL=true) the paths are SageMaker's multi-model calls instead:
GET /ping, GET and POST /models, GET and DELETE /models/<name>, POST /models/<name>/invoke (answered by
imgclf.serving.multi_model; an invoke is relayed to MMS); MMS's management API still answers nothing here.

It reads each request whole before relaying it, within limits checked before anything is allocated: the head
(MAX_HEAD_BYTES, IDLE timeout to arrive), the body (Content-Length required, at most the payload limit, BODY timeout to
arrive; chunked bodies get 411, a bad Content-Length 400), the connections (MAX_CONNECTIONS, then 503) and the
requests held at once (their bodies' memory). asyncio, so a slow or idle client costs a socket, not a thread.
Every refusal is a JSON body in the shape of MMS's errors: {"code": 413, "type": "...", "message": "..."}.

`unhealthy` set: every contract request gets 503 with that reason (STARTING while `serve` checks the model, a
model that cannot be served, or workers that died for good), so SageMaker's health check fails visibly and the
body says why; `stand_in` holds that until SIGTERM. Batch transform (SAGEMAKER_BATCH set) gets its
`execution_parameters`: one image per request, as many at once as there are workers, the payload limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import re
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgclf.serving.multi_model import Models
    from imgclf.serving.settings import ServingSettings

log = logging.getLogger(__name__)

# multi-model-server's HTTP decoder (Netty's defaults) answers a bare 400 to heads over 8 KiB: the front refuses
# them itself, leaving room for the headers the relay sets.
MAX_HEAD_BYTES = 8 * 1024 - 512
READ_LIMIT = 64 * 1024  # the connection's read buffer (asyncio's flow control), not a request limit
# RFC 9110: a header name is a token; a value holds no control characters but tab (http.client refuses them too).
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-zA-Z-]+")
BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
ROUTES = {"/ping": "GET", "/invocations": "POST"}
BATCH_ROUTE = "/execution-parameters"
# Hop-by-hop headers and those the relay sets itself are not passed on.
NOT_RELAYED = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te", "trailer",
               "upgrade", "proxy-connection"}
STARTING = "the model server is starting"  # the 503 message while serve checks the model
BATCH_ENV = "SAGEMAKER_BATCH"  # set by batch transform


def error_body(status: int, message: str) -> bytes:
    """MMS's error shape: {"code": 404, "type": "NotFound", "message": "..."}."""
    kind = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    return json.dumps({"code": status, "type": kind, "message": message}).encode()


class Refused(Exception):
    """A request answered by the front itself; `close` ends the connection (its rest cannot be trusted)."""

    def __init__(self, status: HTTPStatus, message: str, close: bool = True):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


@dataclass(frozen=True)
class Limits:
    max_body: int  # bytes: the payload limit
    idle_timeout: float  # seconds for a request head to arrive (also how long an idle keep-alive stays open)
    body_timeout: float  # seconds for a body to arrive once its head has
    relay_timeout: float  # seconds MMS may take to answer (its own request timeout is shorter)
    max_connections: int
    max_requests: int  # read or relayed at once: at most this many bodies in memory


def limits_for(settings: ServingSettings) -> Limits:
    """The front's limits from the serving settings: the payload limit, timeouts, connections, bodies held."""
    workers = settings.workers or os.cpu_count() or 1
    return Limits(max_body=settings.max_payload_bytes, idle_timeout=settings.idle_timeout_s,
                  body_timeout=settings.body_timeout_s, relay_timeout=settings.model_server_timeout + 30,
                  max_connections=settings.max_connections, max_requests=max(8, 4 * workers))


def batch_transform() -> bool:
    """Whether batch transform runs the container (then GET /execution-parameters is answered)."""
    return os.environ.get(BATCH_ENV, "").lower() in ("1", "true", "yes")


def execution_parameters(settings: ServingSettings) -> dict:
    """What batch transform uses when the CreateTransformJob request leaves these out."""
    return {"MaxConcurrentTransforms": settings.workers or os.cpu_count() or 1, "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": -(-settings.max_payload_bytes // (1024 * 1024))}


class Front:
    def __init__(self, port: int, upstream_port: int, limits: Limits, execution_parameters: dict | None = None,
                 host: str = "0.0.0.0", multi_model: bool = False, invocations: str = "/invocations") -> None:
        """`invocations`: where MMS predicts with the single model (serve registers it; MMS's own /invocations
        knows only models given with --models)."""
        self.port, self.upstream_port, self.limits, self.host = port, upstream_port, limits, host
        self.invocations = invocations
        self.execution_parameters = execution_parameters
        self.multi_model = multi_model
        self.models: Models | None = None  # a multi-model endpoint's, once multi-model-server runs
        self.unhealthy: str | None = None
        self.connections = 0
        self._pool = ThreadPoolExecutor(limits.max_requests, thread_name_prefix="relay")
        self._local = threading.local()  # one keep-alive connection to MMS per relay thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # --- running ------------------------------------------------------------------------------------------

    def start(self) -> Front:
        """Serve in a thread of its own; returns once the port is bound (raises OSError if it cannot be)."""
        threading.Thread(target=self._run, name="front", daemon=True).start()
        self._started.wait()
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._slots = asyncio.Semaphore(self.limits.max_requests)
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._connection, self.host, self.port, limit=READ_LIMIT, backlog=1024))
        except OSError as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    def stop(self) -> None:
        """Stop listening, end the open connections, stop the loop (within 5 s)."""
        loop, server = self._loop, self._server
        if loop and server and loop.is_running():
            async def close() -> None:
                server.close()
                tasks = asyncio.all_tasks() - {asyncio.current_task()}
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                loop.stop()
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stand_in(self, reason: str, stopped: threading.Event) -> None:
        """Answer every contract request 503 with `reason` until `stopped` is set (SIGTERM), then stop."""
        self.unhealthy = reason
        while not stopped.wait(1.0):
            pass
        self.stop()

    # --- one connection -----------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.connections > self.limits.max_connections:
                await self._answer(writer, 503, error_body(503, f"over {self.limits.max_connections} connections "
                                                                "at once; retry"), close=True)
                return
            while await self._request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:  # stop(): end quietly (asyncio 3.11 logs a connection task that re-raises)
            pass
        finally:
            self.connections -= 1
            with contextlib.suppress(Exception):  # already reset, or the loop is closing
                writer.close()

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, check and answer one request; False when the connection is to be closed."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.limits.idle_timeout)
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                await self._refuse(writer, Refused(HTTPStatus.BAD_REQUEST, "the request head ended before its "
                                                                           "blank line"))
            return False
        except asyncio.LimitOverrunError:
            await self._refuse(writer, Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                               f"request head over {MAX_HEAD_BYTES} bytes: send shorter or fewer "
                                               "headers"))
            return False
        except TimeoutError:
            return False  # idle keep-alive, or a client that never sent a whole head
        try:
            if len(head) > MAX_HEAD_BYTES:
                raise Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request head of {len(head)} bytes is over "
                              f"{MAX_HEAD_BYTES}: send shorter or fewer headers")
            method, path, version, headers = parse_head(head)
            keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            length = self._route(method, path, headers)
        except Refused as refused:
            await self._refuse(writer, refused)
            return not refused.close
        try:
            await asyncio.wait_for(self._slots.acquire(), self.limits.relay_timeout)
        except TimeoutError:
            await self._refuse(writer, Refused(HTTPStatus.SERVICE_UNAVAILABLE, "too many requests at once; retry"))
            return False
        try:
            try:
                body = await asyncio.wait_for(reader.readexactly(length), self.limits.body_timeout)
            except asyncio.IncompleteReadError as e:
                await self._refuse(writer, Refused(HTTPStatus.BAD_REQUEST, f"the body ended after {len(e.partial)} "
                                                   f"of the {length} bytes its Content-Length announced"))
                return False
            except TimeoutError:
                await self._refuse(writer, Refused(HTTPStatus.REQUEST_TIMEOUT, f"the {length} byte body did not "
                                                   f"arrive within {self.limits.body_timeout:g} s"))
                return False
            try:
                status, answer_headers, answer = await self._answer_for(method, path, headers, body)
            except Exception as e:  # a bug: the client still gets an answer, and the log the traceback
                log.exception("%s %s failed", method, path[:200])
                status, answer_headers = 500, {"Content-Type": "application/json"}
                answer = error_body(500, f"internal error ({type(e).__name__}); retry, and report it if it persists")
        finally:
            self._slots.release()
        await self._answer(writer, status, answer, answer_headers, close=not keep_alive)
        return keep_alive

    def _route(self, method: str, path: str, headers: dict[str, str]) -> int:
        """The body length to read, or Refused."""
        path = path.split("?", 1)[0]
        allowed = self._methods(path)
        unread_body = "content-length" in headers or "transfer-encoding" in headers  # refused: close
        if not allowed:
            served = ("GET /ping, GET and POST /models, GET and DELETE /models/<name>, POST /models/<name>/invoke"
                      if self.multi_model else "GET /ping and POST /invocations")
            raise Refused(HTTPStatus.NOT_FOUND, f"{method} {path[:200]}: this server answers {served} only",
                          close=unread_body)
        if method not in allowed:
            raise Refused(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} {path[:200]}: use {' or '.join(allowed)}",
                          close=unread_body)
        if "transfer-encoding" in headers:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, f"Transfer-Encoding {headers['transfer-encoding'][:50]!r} is "
                                                      "not accepted: send the body with a Content-Length")
        text = headers.get("content-length")
        if text is None:
            if method == "POST":
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "POST without Content-Length: send the body with one")
            return 0
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise Refused(HTTPStatus.BAD_REQUEST, f"Content-Length {text[:50]!r} is not a byte count")
        length = int(text)
        if length > self.limits.max_body:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"request body of {length} bytes is over the {self.limits.max_body} byte limit "
                          "(SAGEMAKER_MAX_PAYLOAD_IN_MB); send a smaller image")
        return length

    def _methods(self, path: str) -> tuple[str, ...]:
        """The methods a path answers (none: 404)."""
        if not self.multi_model:
            if path == BATCH_ROUTE and self.execution_parameters:
                return ("GET",)
            return (ROUTES[path],) if path in ROUTES else ()
        name = path.removeprefix("/models/")
        if path in ("/ping", "/models"):
            return ("GET",) if path == "/ping" else ("GET", "POST")
        if name == path or not name:
            return ()
        invoked = name.removesuffix("/invoke")
        if invoked != name and invoked and "/" not in invoked:
            return ("POST",)
        return ("GET", "DELETE") if "/" not in name else ()

    async def _answer_for(self, method: str, target: str, headers: dict[str, str], body: bytes):
        path = target.split("?", 1)[0]
        json_type = {"Content-Type": "application/json"}
        if path == BATCH_ROUTE:
            return 200, json_type, json.dumps(self.execution_parameters).encode()
        if self.unhealthy or (self.multi_model and self.models is None):
            return 503, json_type, json.dumps({"code": 503, "type": "ServiceUnavailable", "status": "Unhealthy",
                                               "message": self.unhealthy or STARTING}).encode()
        loop = asyncio.get_running_loop()
        if self.models is not None and path.startswith("/models"):
            if not path.endswith("/invoke") or method != "POST":
                status, payload = await loop.run_in_executor(self._pool, self.models.answer, method, target, body)
                return status, json_type, json.dumps(payload).encode()
            name = urllib.parse.unquote(path.removeprefix("/models/").removesuffix("/invoke"))
            predictions = self.models.invoke_path(name)
            if predictions is None:
                return 404, json_type, error_body(404, f"model {name!r} is not loaded (POST /models loads it)")
            path = predictions
        elif path == "/invocations":
            path = self.invocations
        relayed = {k: v for k, v in headers.items() if k not in NOT_RELAYED}
        return await loop.run_in_executor(self._pool, self._relay, method, path, relayed, body)

    def _relay(self, method: str, path: str, headers: dict[str, str], body: bytes):
        """(status, headers, body) from MMS; 503 JSON when it does not answer (starting, or gone)."""
        for attempt in (1, 2):  # a kept-alive connection MMS closed meanwhile: once more on a new one
            mms = getattr(self._local, "mms", None)
            if mms is None:
                mms = self._local.mms = http.client.HTTPConnection("127.0.0.1", self.upstream_port,
                                                                   timeout=self.limits.relay_timeout)
            try:
                mms.request(method, path, body=body, headers=headers)
                response = mms.getresponse()
                answer = response.read()
                kept = {k: v for k, v in response.getheaders() if k.lower() not in NOT_RELAYED}
                if response.will_close:
                    self._drop()
                return response.status, kept, answer
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop()
                if attempt == 2:
                    return 503, {"Content-Type": "application/json"}, error_body(503, f"model server: {e}")
            except OSError as e:  # refused (not up yet, or stopped), or its timeout
                self._drop()
                return 503, {"Content-Type": "application/json"}, error_body(
                    503, f"the model server is not answering ({e}); retry")
            except Exception:  # anything else leaves the connection mid-request: never reuse it
                self._drop()
                raise
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        mms = getattr(self._local, "mms", None)
        if mms is not None:
            mms.close()
            self._local.mms = None

    async def _refuse(self, writer: asyncio.StreamWriter, refused: Refused) -> None:
        log.info("refused: %d %s", refused.status, refused.message)
        await self._answer(writer, int(refused.status), error_body(int(refused.status), refused.message),
                           close=refused.close)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict | None = None,
                      close: bool = False) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
        lines += [f"Content-Length: {len(body)}", f"Connection: {'close' if close else 'keep-alive'}", "", ""]
        writer.write("\r\n".join(lines).encode("latin-1") + body)
        await writer.drain()


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """(method, path, version, headers with lower-case names) of a request head, or Refused (400)."""
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text[:-4].split("\r\n")
        method, path, version = request_line.split(" ")
    except ValueError:
        raise Refused(HTTPStatus.BAD_REQUEST, "malformed request line") from None
    if version not in ("HTTP/1.0", "HTTP/1.1") or not path.startswith("/"):
        raise Refused(HTTPStatus.BAD_REQUEST, f"malformed request line {request_line[:100]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        raw, sep, value = line.partition(":")
        name = raw.lower()
        if not sep or not HEADER_NAME.fullmatch(name):  # no space before ':', no control or non-ASCII byte
            raise Refused(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:100]!r}")
        value = value.strip(" \t")
        if BAD_VALUE.search(value):
            raise Refused(HTTPStatus.BAD_REQUEST, f"header {raw[:100]!r}: its value holds a control character")
        if name == "content-length" and name in headers and headers[name] != value:
            raise Refused(HTTPStatus.BAD_REQUEST, "two different Content-Length headers")
        headers[name] = f"{headers[name]}, {value}" if name in headers and name != "content-length" else value
    return method, path, version, headers
