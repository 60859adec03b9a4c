"""The multi-model-server process as `serve` runs it: started behind the front, watched, its leftovers stopped.

/ping tells the truth. MMS answers /ping with HTTP 200 even when no worker is alive (its body then says
"Unhealthy"), and says "Healthy" while a restarted worker cannot load the model (our handler answers its
requests 503). The Watchdog reads MMS's /ping body and what each worker process reports
(handler_service.report_state); when no live worker has held or been loading the model for
IMGCLF_UNHEALTHY_AFTER_S seconds it stops MMS and the front answers 503 with the reason.

How MMS itself is started (127.0.0.1 only, the management API on a port nothing relays to, nothing installed or
imported from the artifact) is imgclf.serving.model_server's; what the process does with the outcome is serve's.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.serving.model_server import WORKER_STATE_ENV, ModelServer
from imgclf.serving.settings import JAVA_INT_MAX

if TYPE_CHECKING:
    from imgclf.serving.front import Front
    from imgclf.serving.settings import ServingSettings

# The module multi-model-server imports in each worker (MMS's default_service_handler; exactly one class).
HANDLER_SERVICE = "imgclf.serving.handler_service"
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
REGISTER_TIMEOUT_S = 120  # for MMS's management API to come up
LOAD_TIMEOUT_S = 900  # for its workers to load the model (each loads and warms up its own copy)

log = logging.getLogger("imgclf.serve")  # the `serve` process's events, under one name


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
    is loading the model; None: MMS's /ping alone, for a multi-model endpoint). Once a worker has held the model
    (or one failed to load it), `unhealthy_after` seconds without a good live worker set `reason` and call
    `stop_mms(reason)`."""

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
        if self.worker_states is None:
            return None, False
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
                    self.reason = reason  # set first: once MMS is stopped, serve reads it to know why
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


def run_model_server(front: Front, model_dir: Path | None, settings: ServingSettings, management_port: int,
                     folder: Path, stopped: threading.Event,
                     adopt: Callable[[ModelServer], None]) -> tuple[int | None, str | None]:
    """Run MMS on the front's upstream port until it exits, watched, from `folder` (removed at the end); (its
    launcher's exit code, or None when `stopped` was set before it started; the watchdog's reason when the
    watchdog stopped it). `adopt(server)` is called before MMS starts, so that SIGTERM can stop it. With
    `model_dir` None (a multi-model endpoint) MMS starts with no model and the watchdog watches MMS alone."""
    mms_port = front.upstream_port
    states = folder / "workers"
    states.mkdir()
    os.environ.update({**settings.for_workers(), WORKER_STATE_ENV: str(states)})  # MMS hands them to the workers
    server = ModelServer(folder, model_dir, mms_port, management_port, HANDLER_SERVICE, settings.model_server_timeout,
                         min(2 * settings.max_payload_bytes, JAVA_INT_MAX))
    adopt(server)

    def unhealthy(reason: str) -> None:  # answered at once, while MMS stops
        front.unhealthy = reason
        server.stop()

    watchdog = Watchdog(mms_port, settings.unhealthy_after_s, unhealthy,
                        (lambda: worker_states(states)) if model_dir else None)
    become_subreaper()
    if stopped.is_set():
        return None, None
    log.info("starting multi-model-server on 127.0.0.1:%d for %s (handler %s); port %d answers %s", mms_port,
             model_dir or "a multi-model endpoint", HANDLER_SERVICE, front.port,
             "SageMaker's multi-model calls" if front.multi_model else "/ping and /invocations")
    server.start()
    if model_dir is not None:  # the front answers 503 "starting" until the workers hold the model
        problem = server.register(settings.workers, settings.batch_size, settings.max_batch_delay_ms,
                                  up_timeout=REGISTER_TIMEOUT_S, load_timeout=LOAD_TIMEOUT_S)
        if problem and not stopped.is_set():
            watchdog.reason = f"multi-model-server did not take the model: {problem}"
            unhealthy(watchdog.reason)
    if watchdog.reason is None and not stopped.is_set():
        front.unhealthy = None  # relayed; 503 until MMS answers
        watchdog.start()
    try:
        code = server.wait()
    finally:
        watchdog.done.set()
        if watchdog.is_alive():
            watchdog.join(timeout=30)  # it may be inside stop_mms: its reason decides serve's exit code
        stop_leftovers()
        shutil.rmtree(folder, ignore_errors=True)
    return code, watchdog.reason
