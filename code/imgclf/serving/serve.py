"""The serving image's `serve` entrypoint: `docker run IMAGE serve`, or `serve` on a host over a local /opt/ml tree.

The front (imgclf.serving.front) takes SAGEMAKER_BIND_TO_PORT (8080) first and answers the SageMaker contract
only: GET /ping and POST /invocations (and GET /execution-parameters when SAGEMAKER_BATCH is set, as batch
transform does: one image per request, as many at once as there are workers, the payload limit). Then the model
in SAGEMAKER_BASE_DIR/model (default /opt/ml/model: the training output, or model.tar.gz extracted; a
model.tar.gz found there is extracted first) is loaded here by the workers' own `model_fn` with the serving
settings (imgclf.serving.settings; weights, config, device, dtype, one warm-up request). When that fails, the
front answers 503 with the reason until SIGTERM, so SageMaker sees an unhealthy container and the log says why.
Otherwise multi-model-server starts on 127.0.0.1 (imgclf.serving.model_server: nothing installed or imported
from the artifact) with SAGEMAKER_MODEL_SERVER_WORKERS workers (default: one per CPU), and the front relays.

/ping tells the truth. MMS answers /ping with HTTP 200 even when no worker is alive (its body then says
"Unhealthy"), and says "Healthy" while a restarted worker cannot load the model (our handler answers its
requests 503). A watchdog reads MMS's /ping body and what each worker process reports
(handler_service.report_state); when no live worker has held or been loading the model for
IMGCLF_UNHEALTHY_AFTER_S seconds it stops MMS and the front answers 503 with the reason. If MMS exits by
itself, `serve` exits 1 (the front answers 503 meanwhile); SIGTERM stops everything with exit 0.
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
from pathlib import Path

from imgclf import artifacts, config
from imgclf.processes import MAX_PORT, free_port
from imgclf.serving.front import Front, Limits
from imgclf.serving.model_server import WORKER_STATE_ENV, ModelServer, code_in_artifact
from imgclf.serving.settings import ServingSettings, SettingsError

# The module multi-model-server imports in each worker (MMS's default_service_handler; exactly one class).
HANDLER_SERVICE = "imgclf.serving.handler_service"
TARBALL = "model.tar.gz"
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
STARTING = "the model server is starting"  # the 503 message while the model is checked

log = logging.getLogger("imgclf.serve")


def unpack_model_tarball(model_dir: Path) -> None:
    """SageMaker extracts model.tar.gz into /opt/ml/model; `docker run -v` users may mount the tarball as is."""
    tarball = model_dir / TARBALL
    if tarball.is_file() and not (model_dir / "config.json").exists():
        log.info("extracting %s", tarball)
        with tarfile.open(tarball) as tar:
            artifacts.extract(tar, model_dir)


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


class Watchdog(threading.Thread):
    """Every second reads MMS's /ping body and `worker_states()` (pid -> load error, None when the worker holds or
    is loading the model). Once a worker has held the model (or one failed to load it), `unhealthy_after`
    seconds without a good live worker set `reason` and call `stop_mms(reason)`."""

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
                    self.reason = reason  # set first: once MMS is stopped, main() reads it to know why
                    try:
                        self.stop_mms(reason)
                    except Exception as e:  # e.g. the java process not found this second: try again next one
                        log.warning("%s, but stopping multi-model-server failed (%s); retrying", reason, e)
                        continue
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


def front_limits(settings: ServingSettings) -> Limits:
    workers = settings.workers or os.cpu_count() or 1
    return Limits(max_body=settings.max_payload_bytes, idle_timeout=settings.idle_timeout_s,
                  body_timeout=settings.body_timeout_s, relay_timeout=settings.model_server_timeout + 30,
                  max_connections=settings.max_connections, max_requests=max(8, 4 * workers))


def prepare(model_dir: Path, settings: ServingSettings) -> str | None:
    """Load the model as each worker will (warm-up request included); the reason it cannot be served, or None."""
    from imgclf.errors import UserError
    from imgclf.serving import inference

    try:
        unpack_model_tarball(model_dir)
        inference.check_model_dir(model_dir)
        inference.model_fn(str(model_dir), settings)
    except Exception as e:  # a model that does not load, a device or dtype that cannot run, a read-only folder
        reason = str(e) if isinstance(e, (UserError, OSError, tarfile.TarError)) else f"{type(e).__name__}: {e}"
        return f"the model cannot be served: {reason}"
    finally:
        gc.collect()  # the check's copy of the model: only the workers keep one
    return None


def answer_unhealthy(front: Front, reason: str, stopped: threading.Event) -> int:
    """503 with the reason on the contract paths until SIGTERM; SageMaker's ping check then fails visibly."""
    log.error("%s (answering /ping and /invocations with 503 until stopped)", reason)
    front.unhealthy = reason
    while not stopped.wait(1.0):
        pass
    front.stop()
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
    stopped = threading.Event()
    server: ModelServer | None = None

    def on_signal(signum, frame) -> None:
        if not front_ready.is_set():  # still checking the model: stop now
            raise SystemExit(128 + signum)
        stopped.set()
        if server is not None:
            server.stop()

    front_ready = threading.Event()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port_text = os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")
    if not port_text.isdigit() or not 0 < int(port_text) <= MAX_PORT:
        print(f"SAGEMAKER_BIND_TO_PORT={port_text!r}: multi-model-server takes ports 1-{MAX_PORT}", file=sys.stderr)
        return 2
    port = int(port_text)
    model_dir = Path(config.base_dir()) / "model"
    batch = os.environ.get("SAGEMAKER_BATCH", "").lower() in ("1", "true", "yes")
    try:
        settings, problem = ServingSettings.from_environment(), None
    except SettingsError as e:
        settings, problem = ServingSettings(), f"the model cannot be served: {e}"
    mms_port, management_port = free_port(), free_port()
    front = Front(port, mms_port, front_limits(settings), execution_parameters(settings) if batch else None)
    front.unhealthy = problem or STARTING
    try:
        front.start()
    except OSError as e:
        print(f"cannot listen on port {port} ({e}): set SAGEMAKER_BIND_TO_PORT to a free port", file=sys.stderr)
        return 1
    problem = problem or prepare(model_dir, settings)
    front_ready.set()
    if problem or stopped.is_set():
        return answer_unhealthy(front, problem, stopped) if problem else 0
    if batch:
        log.info("batch transform: GET /execution-parameters answers %s", json.dumps(execution_parameters(settings)))
    if code := code_in_artifact(model_dir):
        log.warning("%s holds code, which is never installed or run (a model artifact is data): %s", model_dir,
                    ", ".join(code))

    folder = Path(tempfile.mkdtemp(prefix="imgclf-serve-"))
    states = folder / "workers"
    states.mkdir()
    os.environ.update({**settings.for_workers(), WORKER_STATE_ENV: str(states)})  # MMS hands them to the workers
    server = ModelServer(folder, model_dir, mms_port, management_port, HANDLER_SERVICE, settings.model_server_timeout,
                         settings.workers, 2 * settings.max_payload_bytes)
    def unhealthy(reason: str) -> None:  # answered at once, while MMS stops
        front.unhealthy = reason
        server.stop()

    watchdog = Watchdog(mms_port, settings.unhealthy_after_s, unhealthy, lambda: worker_states(states))
    become_subreaper()
    if stopped.is_set():
        return 0
    log.info("starting multi-model-server on 127.0.0.1:%d for %s (handler %s); port %d answers /ping and "
             "/invocations", mms_port, model_dir, HANDLER_SERVICE, port)
    server.start()
    front.unhealthy = None  # relayed; 503 until MMS answers
    watchdog.start()
    try:
        code = server.wait()
    finally:
        watchdog.done.set()
        watchdog.join(timeout=30)  # it may be inside stop_mms: its reason decides the exit code below
        stop_leftovers()
        shutil.rmtree(folder, ignore_errors=True)
    if watchdog.reason:
        return answer_unhealthy(front, watchdog.reason, stopped)
    front.stop()
    if stopped.is_set():
        return 0
    log.error("multi-model-server exited by itself (exit %s): stopping with exit 1 so that the container is "
              "replaced; its log above says why", code)
    return 1


if __name__ == "__main__":
    sys.exit(main())
