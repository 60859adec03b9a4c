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

With SAGEMAKER_MULTI_MODEL=true it is a multi-model endpoint instead (imgclf.serving.multi_model): MMS starts
with no model, and SageMaker's calls on the port load, list, invoke and unload models from /opt/ml/models.

/ping tells the truth: a watchdog (imgclf.serving.supervisor) stops MMS once no worker has held the model for
IMGCLF_UNHEALTHY_AFTER_S seconds, and the front then answers 503 with the reason. If MMS exits by itself,
`serve` exits 1 (the front answers 503 meanwhile); SIGTERM stops everything with exit 0.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import sys
import tarfile
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

from imgclf import artifacts, config
from imgclf.processes import MAX_PORT, free_port
from imgclf.serving.front import STARTING, Front, batch_transform, execution_parameters, limits_for
from imgclf.serving.model_server import MODEL_NAME, ModelServer, code_in_artifact
from imgclf.serving.multi_model import Models
from imgclf.serving.settings import GPU_BATCH_SIZE, ServingSettings, SettingsError
from imgclf.serving.supervisor import run_model_server

TARBALL = "model.tar.gz"

log = logging.getLogger("imgclf.serve")


class Signals:
    """SIGTERM and SIGINT: while the model is checked (the front not ready yet), exit at once; then set `stopped`
    and stop multi-model-server once `adopt` has handed it over."""

    def __init__(self) -> None:
        self.stopped, self.front_ready = threading.Event(), threading.Event()
        self.server: ModelServer | None = None
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def adopt(self, server: ModelServer) -> None:
        self.server = server

    def on_signal(self, signum, frame) -> None:
        if not self.front_ready.is_set():  # still checking the model: stop now, whatever the main thread is in
            sys.stdout.flush()  # (an exception raised here lands in a finalizer or broad except now and then)
            sys.stderr.flush()
            os._exit(128 + signum)
        self.stopped.set()
        if self.server is not None:
            self.server.stop()


def read_port() -> int | None:
    """SAGEMAKER_BIND_TO_PORT (8080), or None once the error is printed."""
    port_text = os.environ.get("SAGEMAKER_BIND_TO_PORT", "8080")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) <= MAX_PORT:
        print(f"SAGEMAKER_BIND_TO_PORT={port_text!r}: multi-model-server takes ports 1-{MAX_PORT}", file=sys.stderr)
        return None
    return int(port_text)


def read_settings() -> tuple[ServingSettings, str | None]:
    """The serving settings, and why the model cannot be served with them (the defaults stand in then)."""
    try:
        return ServingSettings.from_environment(), None
    except SettingsError as e:
        return ServingSettings(), f"the model cannot be served: {e}"


def definite(settings: ServingSettings) -> ServingSettings:
    """The automatic worker count and batch size made definite for a single model, as the device wants them: on a
    GPU a worker per GPU (multi-model-server's own rule) and batches of up to GPU_BATCH_SIZE requests; on the CPU
    a worker per CPU and no batching (a batch waits for the slowest decode and gains little there)."""
    from imgclf.serving import runtime

    gpus = runtime.usable_gpus(settings)
    return replace(settings, workers=settings.workers or gpus or os.cpu_count() or 1,
                   batch_size=settings.batch_size or (GPU_BATCH_SIZE if gpus else 1))


def unpack_model_tarball(model_dir: Path) -> None:
    """SageMaker extracts model.tar.gz into /opt/ml/model; `docker run -v` users may mount the tarball as is."""
    tarball = model_dir / TARBALL
    if tarball.is_file() and not (model_dir / "config.json").exists():
        log.info("extracting %s", tarball)
        with tarfile.open(tarball) as tar:
            artifacts.extract(tar, model_dir)


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


def log_what_is_served(model_dir: Path, settings: ServingSettings, batch: bool) -> None:
    if batch:
        log.info("batch transform: GET /execution-parameters answers %s", json.dumps(execution_parameters(settings)))
    if code := code_in_artifact(model_dir):
        log.warning("%s holds code, which is never installed or run (a model artifact is data): %s", model_dir,
                    ", ".join(code))


def answer_unhealthy(front: Front, reason: str, stopped: threading.Event) -> int:
    """503 with the reason on the contract paths until SIGTERM; SageMaker's ping check then fails visibly."""
    log.error("%s (answering /ping and /invocations with 503 until stopped)", reason)
    front.stand_in(reason, stopped)
    return 1


def exit_code(front: Front, mms_exit: int | None, watchdog_reason: str | None, stopped: threading.Event) -> int:
    """serve's exit code once multi-model-server is over (mms_exit None: SIGTERM came before it started)."""
    if mms_exit is None:
        return 0
    if watchdog_reason:
        return answer_unhealthy(front, watchdog_reason, stopped)
    front.stop()
    if stopped.is_set():
        return 0
    log.error("multi-model-server exited by itself (exit %s): stopping with exit 1 so that the container is "
              "replaced; its log above says why", mms_exit)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:  # ENTRYPOINT ["serve"] + `docker run IMAGE serve` gives "serve serve"
        args = args[1:]
    usage = (f"usage: serve   (no arguments: {__doc__.splitlines()[0]}) Configure with SAGEMAKER_BASE_DIR, "
             "SAGEMAKER_BIND_TO_PORT, SAGEMAKER_MODEL_SERVER_WORKERS, ... (docs/serving.md)")
    if args in (["--help"], ["-h"]):
        print(usage)
        return 0
    if args:
        print(f"{usage}\nerror: serve takes no arguments; got {' '.join(args)!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signals = Signals()
    port = read_port()
    if port is None:
        return 2
    model_dir = Path(config.base_dir()) / "model"
    batch = batch_transform()
    settings, problem = read_settings()
    mms_port, management_port = free_port(), free_port()
    front = Front(port, mms_port, limits_for(settings), execution_parameters(settings) if batch else None,
                  multi_model=settings.multi_model, invocations=f"/predictions/{MODEL_NAME}")
    front.unhealthy = problem or STARTING
    try:
        front.start()
    except OSError as e:
        print(f"cannot listen on port {port} ({e}): set SAGEMAKER_BIND_TO_PORT to a free port", file=sys.stderr)
        return 1
    if not settings.multi_model and not problem:
        settings = definite(settings)
        problem = prepare(model_dir, settings)
    signals.front_ready.set()
    if problem or signals.stopped.is_set():
        return answer_unhealthy(front, problem, signals.stopped) if problem else 0
    folder = Path(tempfile.mkdtemp(prefix="imgclf-serve-"))  # MMS's: config, logs, stand-in model folders
    if settings.multi_model:
        store = Path(config.base_dir()) / "models"
        front.models = Models(store, folder, management_port, settings, check=prepare)
        log.info("multi-model endpoint: no model loaded; POST /models loads one from %s", store)
    else:
        log_what_is_served(model_dir, settings, batch)
    mms_exit, reason = run_model_server(front, None if settings.multi_model else model_dir, settings,
                                        management_port, folder, signals.stopped, signals.adopt)
    return exit_code(front, mms_exit, reason, signals.stopped)


if __name__ == "__main__":
    sys.exit(main())
