"""The serving image's `serve` entrypoint: `docker run IMAGE serve`, or `serve` on a host over a local /opt/ml tree.

Checks the model in SAGEMAKER_BASE_DIR/model (default /opt/ml/model: the training output, or model.tar.gz
extracted; a model.tar.gz found there is extracted first), then starts multi-model-server through
sagemaker-inference's `start_model_server` with imgclf.serving.handler_service. MMS answers GET /ping and
POST /invocations on SAGEMAKER_BIND_TO_PORT (8080) with SAGEMAKER_MODEL_SERVER_WORKERS workers (default:
one per CPU) and SAGEMAKER_MODEL_SERVER_TIMEOUT; the call blocks until MMS exits (SIGTERM stops it).
The serving settings (imgclf.serving.settings) are read and checked once here and handed to the workers.

/ping tells the truth. Before MMS starts, the model is loaded here by the workers' own `model_fn` with the
settings (weights, config, device, dtype, one warm-up request): when that fails, or a setting is bad, the
reason is logged once and a small stand-in server answers /ping (and everything else) with 503 and the reason
as JSON, so SageMaker sees an unhealthy container and the log says why. Later, MMS answers /ping with HTTP
200 even when no worker is alive (its body then says "Unhealthy"), and says "Healthy" while a restarted worker
cannot load the model (our handler answers its requests 503). A watchdog reads MMS's /ping body and what each
worker process reports (handler_service.report_state); when no live worker has held or been loading the model
for IMGCLF_UNHEALTHY_AFTER_S seconds it stops MMS and the stand-in answers 503 with the reason.

Batch transform (SAGEMAKER_BATCH set, as SageMaker and the SDK's local mode do) also asks GET /execution-parameters,
which MMS does not serve: there a small front on the port answers it (one image per request, as many requests
at once as MMS has workers, the payload limit) and passes everything else to MMS on a port of 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from imgclf import config
from imgclf.processes import MAX_PORT
from imgclf.serving.settings import ServingSettings

# The module multi-model-server imports in each worker (MMS's default_service_handler; exactly one class).
HANDLER_SERVICE = "imgclf.serving.handler_service"
TARBALL = "model.tar.gz"
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h

log = logging.getLogger("imgclf.serve")


def unpack_model_tarball(model_dir: Path) -> None:
    """SageMaker extracts model.tar.gz into /opt/ml/model; `docker run -v` users may mount the tarball as is."""
    tarball = model_dir / TARBALL
    if tarball.is_file() and not (model_dir / "config.json").exists():
        log.info("extracting %s", tarball)
        with tarfile.open(tarball) as tar:
            tar.extractall(model_dir, filter="data")  # no absolute paths, links out of the folder, devices


def local_mode_environment(base_dir: Path) -> dict[str, str]:
    """Per-server paths when several servers share one host (local mode, tests): config, pid file, logs."""
    for sub in ("etc", "tmp", "logs"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    return {"TMPDIR": str(base_dir / "tmp"),  # MMS keeps its pid file in the temp dir and refuses a second one
            "TEMP": str(base_dir / "tmp"),  # the JVM's temp dir
            "LOG_LOCATION": str(base_dir / "logs"), "METRICS_LOCATION": str(base_dir / "logs")}


def become_subreaper() -> None:
    """Adopt orphaned descendants, as PID 1 does in the container: MMS's worker listener outlives the java server."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: leftovers are stopped on a best-effort basis
        pass


def stop_leftovers(timeout: float = 10.0) -> None:
    """SIGTERM what is left of MMS (worker listeners), then SIGKILL whatever ignores it."""
    import psutil

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the toolkit's reaper would race psutil's wait and log errors
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    if children:
        log.info("stopped %d leftover model server process(es)", len(children))


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


class Watchdog(threading.Thread):
    """Every second reads MMS's /ping body and `worker_states()` (pid -> load error, None when the worker holds or
    is loading the model). Once a worker has held the model (or one failed to load it), `unhealthy_after`
    seconds without a good live worker set `reason` and call `stop_mms`."""

    def __init__(self, port: int, unhealthy_after: float, stop_mms, worker_states) -> None:
        super().__init__(name="mms-watchdog", daemon=True)
        self.url = f"http://127.0.0.1:{port}/ping"
        self.unhealthy_after, self.stop_mms, self.worker_states = unhealthy_after, stop_mms, worker_states
        self.reason: str | None = None
        self.done = threading.Event()

    def status(self) -> str:
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                return json.loads(response.read()).get("status", "no status")
        except (OSError, ValueError) as e:
            return f"no answer ({e})"

    def problem(self) -> tuple[str | None, bool]:
        """(what is wrong now or None, whether a worker failed to load the model)."""
        status = self.status()
        if status not in ("Healthy", "Partial Healthy"):
            return f"multi-model-server /ping: {status}", False
        errors = list(self.worker_states().values())  # None: holds or is loading the model
        if None in errors:
            return None, False
        if errors:
            return f"the model workers cannot load the model: {errors[0]}", True
        return f"multi-model-server /ping: {status}, but no model worker process is alive", False

    def run(self) -> None:
        healthy_once, bad_since = False, None
        while not self.done.wait(1.0):
            problem, failed_load = self.problem()
            if problem is None:
                healthy_once, bad_since = True, None
            elif healthy_once or failed_load:
                bad_since = bad_since or time.monotonic()
                if time.monotonic() - bad_since >= self.unhealthy_after:
                    reason = f"no model worker has been running for {self.unhealthy_after:g} s ({problem})"
                    try:
                        self.stop_mms()
                    except Exception as e:  # e.g. the java process not found this second: try again next one
                        log.warning("%s, but stopping multi-model-server failed (%s); retrying", reason, e)
                        continue
                    self.reason = reason
                    log.error("%s: stopped multi-model-server, answering 503 until stopped", reason)
                    return


def worker_states(folder: Path) -> dict[int, str | None]:
    """pid -> load error (None: holds or is loading the model) of the live MMS workers that reported to `folder`
    (handler_service.report_state); the reports of dead workers are removed."""
    import psutil

    states = {}
    for path in folder.glob("*.json"):
        try:
            alive = psutil.Process(int(path.stem)).status() != psutil.STATUS_ZOMBIE
        except (psutil.Error, ValueError):
            alive = False
        if not alive:
            path.unlink(missing_ok=True)
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):  # written atomically: whole or absent
            states[int(path.stem)] = json.loads(path.read_text())["error"]
    return states


def execution_parameters(settings: ServingSettings) -> dict:
    """What batch transform uses when the CreateTransformJob request leaves these out."""
    return {"MaxConcurrentTransforms": settings.workers or os.cpu_count() or 1, "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": -(-settings.max_payload_bytes // (1024 * 1024))}


def start_batch_front(port: int, mms_port: int, parameters: dict) -> ThreadingHTTPServer:
    """Answer GET /execution-parameters; relay every other request to MMS on 127.0.0.1:mms_port, as it is."""
    import http.client

    answer = json.dumps(parameters).encode()

    class Front(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: batch transform sends request after request

        def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _relay(self) -> None:
            if self.command == "GET" and self.path == "/execution-parameters":
                return self._send(200, [("Content-Type", "application/json")], answer)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            mms = http.client.HTTPConnection("127.0.0.1", mms_port, timeout=3600)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                mms.request(self.command, self.path, body=body, headers=headers)
                response = mms.getresponse()
                self._send(response.status, response.getheaders(), response.read())
            except OSError as e:
                self._send(503, [("Content-Type", "application/json")], json.dumps(
                    {"code": 503, "type": "ServiceUnavailable", "message": f"model server: {e}"}).encode())
            finally:
                mms.close()

        do_GET = do_POST = do_PUT = do_DELETE = _relay

        def log_message(self, *args) -> None:  # MMS logs each request already
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Front)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="batch-front", daemon=True).start()
    return server


def serve_unhealthy(port: int, reason: str) -> int:
    """Answer every request with 503 + JSON reason until SIGTERM; SageMaker's ping check then fails visibly."""
    body = json.dumps({"code": 503, "type": "ServiceUnavailable", "status": "Unhealthy",
                       "message": reason}).encode()

    class Unhealthy(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args) -> None:  # the reason was logged once; no line per ping
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Unhealthy)
    stop = lambda *_: threading.Thread(target=server.shutdown).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    return 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:  # ENTRYPOINT ["serve"] + `docker run IMAGE serve` gives "serve serve"
        args = args[1:]
    if args:
        print(f"usage: serve   (no arguments: {__doc__.splitlines()[0]}); got {' '.join(args)!r}. Configure "
              "with SAGEMAKER_BASE_DIR, SAGEMAKER_BIND_TO_PORT, SAGEMAKER_MODEL_SERVER_WORKERS, ...", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base_dir = Path(config.base_dir())
    local_mode = base_dir != Path(config.DEFAULT_BASE_DIR)
    if local_mode:
        os.environ.update(local_mode_environment(base_dir))
    # MMS launches `multi-model-server` from PATH; with an unactivated venv it lives beside this Python.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    port_text = os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")
    if not port_text.isdigit() or not 0 < int(port_text) <= MAX_PORT:
        print(f"SAGEMAKER_BIND_TO_PORT={port_text!r}: multi-model-server takes ports 1-{MAX_PORT}", file=sys.stderr)
        return 2
    port = int(port_text)

    from imgclf.errors import UserError
    from imgclf.serving import inference
    from imgclf.serving.handler_service import WORKER_STATE_ENV

    model_dir = base_dir / "model"
    try:
        settings = ServingSettings.from_environment()
        unpack_model_tarball(model_dir)
        inference.check_model_dir(model_dir)
        inference.model_fn(str(model_dir), settings)  # what each worker will do, warm-up request included
    except Exception as e:  # a bad setting, a model that does not load, a device or dtype that cannot run
        reason = str(e) if isinstance(e, (UserError, OSError, tarfile.TarError)) else f"{type(e).__name__}: {e}"
        log.error("cannot serve the model in %s: %s (answering every request, /ping included, with 503 until "
                  "stopped)", model_dir, reason)
        return serve_unhealthy(port, f"the model cannot be served: {reason}")
    gc.collect()  # the check's copy of the model: only the workers keep one

    # MMS answers bodies over its max_request_size with an empty 413. Our handler enforces the real limit
    # (SAGEMAKER_MAX_PAYLOAD_IN_MB, default 6 as SageMaker's real-time endpoints) with a JSON 413, and MMS
    # gets twice that, so only bodies over twice the limit meet MMS's bare answer; the workers get the settings
    # read above (the real limit) as one value.
    os.environ.update(settings.for_workers())
    front = None
    mms_port = port
    if os.environ.get("SAGEMAKER_BATCH", "").lower() in ("1", "true", "yes"):
        from imgclf.processes import free_port

        mms_port = free_port()
        os.environ["SAGEMAKER_BIND_TO_PORT"] = str(mms_port)  # MMS behind the front (read when MMS starts)
        front = start_batch_front(port, mms_port, execution_parameters(settings))
        log.info("batch transform: GET /execution-parameters answers %s; multi-model-server on 127.0.0.1:%d",
                 json.dumps(execution_parameters(settings)), mms_port)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    from sagemaker_inference import model_server  # reads SAGEMAKER_BASE_DIR at import time

    if local_mode:
        model_server.MMS_CONFIG_FILE = str(base_dir / "etc" / "sagemaker-mms.properties")
    config_file = model_server.MMS_CONFIG_FILE

    def our_mms_process():
        """The toolkit looks for THE MMS java process on the machine; find the one started with our config."""
        import psutil

        for process in psutil.process_iter():
            try:
                cmdline = process.cmdline()
                if model_server.MMS_NAMESPACE in cmdline and config_file in cmdline:
                    return process
            except psutil.Error:
                continue
        raise RuntimeError(f"multi-model-server with config {config_file} is not running (yet)")

    model_server._retrieve_mms_server_process = our_mms_process
    become_subreaper()
    # Until the toolkit installs its handler (SIGTERM -> java), SIGTERM stops us through the `finally` below;
    # SIGINT (Ctrl-C in local mode) does whatever SIGTERM does at that moment.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, lambda signum, frame: signal.getsignal(signal.SIGTERM)(signum, frame))
    log.info("starting multi-model-server on port %d for %s (handler %s)", port, model_dir, HANDLER_SERVICE)
    states = Path(tempfile.mkdtemp(prefix="imgclf-workers-"))
    os.environ[WORKER_STATE_ENV] = str(states)  # MMS hands its environment to the workers
    watchdog = Watchdog(mms_port, settings.unhealthy_after_s, lambda: our_mms_process().terminate(),
                        lambda: worker_states(states))
    watchdog.start()
    try:
        model_server.start_model_server(handler_service=HANDLER_SERVICE)  # returns when the MMS java process exits
    finally:
        watchdog.done.set()
        stop_leftovers()
        shutil.rmtree(states, ignore_errors=True)
        if front:
            front.shutdown()
            front.server_close()
    if watchdog.reason:
        return serve_unhealthy(port, watchdog.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
