"""Multi-model endpoints (SAGEMAKER_MULTI_MODEL=true): SageMaker's container calls, answered on the serving port.

    POST /models {"model_name": N, "url": DIR}   load the model SageMaker extracted into DIR, as N: 200; 409 when
                                                 N is loaded; 507 when IMGCLF_MAX_MODELS or the memory a load must
                                                 leave free (IMGCLF_MIN_FREE_MEMORY_MB) says no (SageMaker then
                                                 unloads its least recently used models and retries); 400 naming
                                                 what is wrong with the request or the model
    GET /models[?next_page_token=T]              {"models": [{"modelName": N, "modelUrl": DIR}], "nextPageToken"}
    GET /models/N                                {"modelName": N, "modelUrl": DIR}, or 404
    DELETE /models/N                             200, or 404
    POST /models/N/invoke                        N's prediction (multi-model-server's /predictions/<id>), or 404

A model is checked here first, as `serve` checks its single model (loaded once, the warm-up request included),
then registered with multi-model-server's management API (127.0.0.1, a port of its own) under an id of its own,
from a stand-in folder that holds only the real folder's path (model_server.POINTER_FILE): as in single-model
mode, MMS imports nothing from the artifact. Each model keeps its own config.json: class names, preprocessing,
exported graph. DIR must lie in the model store, SAGEMAKER_BASE_DIR/models (/opt/ml/models), where SageMaker
puts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.serving.front import error_body
from imgclf.serving.model_server import POINTER_FILE, management_call, registration

if TYPE_CHECKING:
    from imgclf.serving.settings import ServingSettings

log = logging.getLogger("imgclf.serve")

PAGE_SIZE = 100  # models per GET /models answer
MAX_NAME = 1024
# A worker's memory: about 80 MB of its own (python, numpy, PIL, ONNX Runtime) and about 3 times the graph's
# bytes (measured, docs/serving.md#multi-model-endpoints: 82 MB with a 1.5 MB graph, 214 MB with resnet18's 45 MB).
WORKER_MB, GRAPH_FACTOR = 100, 3


class Answer(Exception):
    """A call answered with an error: its HTTP status and a message saying what to do."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Loaded:
    name: str  # SageMaker's model_name
    url: str  # the folder it was loaded from
    mms_name: str  # its name in multi-model-server


def mms_name(name: str) -> str:
    """A name MMS and the file system accept, for any model_name SageMaker sends (opaque to the container)."""
    return "m" + hashlib.sha256(name.encode()).hexdigest()[:24]


class Models:
    """The loaded models of a multi-model endpoint, kept in step with multi-model-server's."""

    def __init__(self, store: Path, stand_ins: Path, management_port: int, settings: ServingSettings,
                 check: Callable[[Path, ServingSettings], str | None]) -> None:
        self.store, self.stand_ins, self.settings, self.check = store, stand_ins, settings, check
        self.management_port = management_port
        self.workers = settings.workers or 1  # per model: memory grows with models x workers
        self._models: dict[str, Loaded] = {}
        self._busy: set[str] = set()  # being loaded or unloaded
        self._lock = threading.Lock()

    # --- the calls -----------------------------------------------------------------------------------------

    def answer(self, method: str, target: str, body: bytes) -> tuple[int, dict]:
        """(status, JSON payload) of a /models call other than invoke; errors in MMS's error shape."""
        path, _, query = target.partition("?")
        name = urllib.parse.unquote(path[len("/models/"):]) if path.startswith("/models/") else None
        try:
            if name is None:
                return (200, self.page(query)) if method == "GET" else self.load(body)
            if method == "GET":
                loaded = self._get(name)
                return 200, {"modelName": loaded.name, "modelUrl": loaded.url}
            return self.unload(name)
        except Answer as e:
            return int(e.status), json.loads(error_body(int(e.status), e.message))

    def invoke_path(self, name: str) -> str | None:
        """Where MMS predicts with model `name`; None when it is not loaded."""
        with self._lock:
            loaded = self._models.get(name)
        return f"/predictions/{loaded.mms_name}" if loaded else None

    def page(self, query: str) -> dict:
        token = urllib.parse.parse_qs(query).get("next_page_token", ["0"])[0]
        if not re.fullmatch(r"[0-9]{1,9}", token):
            raise Answer(HTTPStatus.BAD_REQUEST, f"next_page_token {token[:20]!r}: give the nextPageToken of the "
                         "previous answer")
        start = int(token)
        with self._lock:
            models = sorted(self._models.values(), key=lambda m: m.name)
        shown = models[start:start + PAGE_SIZE]
        result: dict = {"models": [{"modelName": m.name, "modelUrl": m.url} for m in shown]}
        if start + PAGE_SIZE < len(models):
            result["nextPageToken"] = str(start + PAGE_SIZE)
        return result

    def load(self, body: bytes) -> tuple[int, dict]:
        name, folder = self._request(body)
        with self._lock:
            if name in self._models or name in self._busy:
                raise Answer(HTTPStatus.CONFLICT, f"model {name!r} is already loaded (DELETE /models/<name> first)")
            if self.settings.max_models and len(self._models) + len(self._busy) >= self.settings.max_models:
                raise Answer(HTTPStatus.INSUFFICIENT_STORAGE, f"{self.settings.max_models} models are loaded, "
                             "IMGCLF_MAX_MODELS: unload one (SageMaker unloads its least recently used)")
            self._busy.add(name)
        try:
            self._check_memory(folder)
            self._check_model(folder)
            loaded = Loaded(name, str(folder), mms_name(name))
            self._register(loaded)
            with self._lock:
                self._models[name] = loaded
        finally:
            with self._lock:
                self._busy.discard(name)
        log.info("loaded model %r from %s (%d loaded)", name, folder, len(self._models))
        return 200, {"status": f"model {name!r} loaded from {folder}"}

    def unload(self, name: str) -> tuple[int, dict]:
        with self._lock:
            loaded = self._models.pop(name, None)
            if loaded is None:
                raise Answer(HTTPStatus.NOT_FOUND, f"model {name!r} is not loaded")
            self._busy.add(name)
        try:
            self._management("DELETE", f"/models/{loaded.mms_name}")
        except Answer:  # MMS still serves it: so does the list
            with self._lock:
                self._models[name] = loaded
            raise
        finally:
            with self._lock:
                self._busy.discard(name)
        shutil.rmtree(self.stand_ins / loaded.mms_name, ignore_errors=True)
        log.info("unloaded model %r (%d loaded)", name, len(self._models))
        return 200, {"status": f"model {name!r} unloaded"}

    # --- the steps -----------------------------------------------------------------------------------------

    def _get(self, name: str) -> Loaded:
        with self._lock:
            loaded = self._models.get(name)
        if loaded is None:
            raise Answer(HTTPStatus.NOT_FOUND, f"model {name!r} is not loaded (POST /models loads it)")
        return loaded

    def _request(self, body: bytes) -> tuple[str, Path]:
        """(model_name, the model folder) of a load request, or Answer 400."""
        example = 'send {"model_name": "<name>", "url": "<folder under ' + str(self.store) + '>"}'
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
            raise Answer(HTTPStatus.BAD_REQUEST, f"the body is not JSON, or nested too deeply: {example}") from None
        name, url = (request.get("model_name"), request.get("url")) if isinstance(request, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(url, str) or not name or len(name) > MAX_NAME \
                or not name.isprintable():
            raise Answer(HTTPStatus.BAD_REQUEST, f"model_name (1-{MAX_NAME} printable characters) and url: {example}")
        if not url.isprintable():
            raise Answer(HTTPStatus.BAD_REQUEST, f"url {url[:200]!r} holds control characters: {example}")
        folder = (self.store / url).resolve()  # an absolute url stays itself
        if not folder.is_relative_to(self.store.resolve()):
            raise Answer(HTTPStatus.BAD_REQUEST, f"url {url!r} is outside the model store {self.store}: {example}")
        if not folder.is_dir():
            raise Answer(HTTPStatus.NOT_FOUND, f"url {url!r}: no such folder")
        # Links inside the folder must stay inside it: the model reads only its own files.
        outside = [p for p in folder.rglob("*") if p.is_symlink() and not p.resolve().is_relative_to(folder)]
        if outside:
            raise Answer(HTTPStatus.BAD_REQUEST, f"url {url!r}: {outside[0].relative_to(folder)} links outside the "
                         "model folder; a model holds its own files")
        return name, folder

    def _check_memory(self, folder: Path) -> None:
        import psutil

        graph = sum(p.stat().st_size for p in folder.glob("*.onnx")) or sum(
            p.stat().st_size for p in folder.glob("*.safetensors"))
        need = self.workers * (WORKER_MB * 2**20 + GRAPH_FACTOR * graph) + self.settings.min_free_memory_mb * 2**20
        available = psutil.virtual_memory().available
        if available < need:
            raise Answer(HTTPStatus.INSUFFICIENT_STORAGE, f"{available / 2**20:.0f} MB of memory free; this model "
                         f"needs about {need / 2**20:.0f} MB with IMGCLF_MIN_FREE_MEMORY_MB left over: unload a "
                         "model (SageMaker unloads its least recently used)")

    def _check_model(self, folder: Path) -> None:
        """Load the model once as its workers will (warm-up request included), or Answer 400 with the reason."""
        problem = self.check(folder, self.settings)
        if problem:
            raise Answer(HTTPStatus.BAD_REQUEST, problem)

    def _register(self, loaded: Loaded) -> None:
        stand_in = self.stand_ins / loaded.mms_name
        stand_in.mkdir(parents=True, exist_ok=True)
        (stand_in / POINTER_FILE).write_text(loaded.url)
        try:
            self._management("POST", registration(loaded.mms_name, self.workers, self.settings.batch_size or 1,
                                                  self.settings.max_batch_delay_ms))
        except Answer:
            shutil.rmtree(stand_in, ignore_errors=True)
            raise

    def _management(self, method: str, path: str) -> None:
        """A call to MMS's management API; Answer 500 with MMS's message when it fails."""
        try:
            status, text = management_call(self.management_port, method, path, self.settings.model_server_timeout + 60)
        except OSError as e:
            raise Answer(HTTPStatus.SERVICE_UNAVAILABLE, f"the model server is not answering ({e}); retry") from None
        if status != 200:
            raise Answer(HTTPStatus.INTERNAL_SERVER_ERROR, f"the model server answered {status}: {text[:500]}")
