"""The module multi-model-server loads (`default_service_handler`): exactly one class, as MMS requires.

MMS creates one HandlerService per worker process, calls `initialize` once (load the model) and `handle`
for each batch of requests. The toolkit's own Transformer answers errors as "message + traceback" text,
so requests go through `inference.handle_request`, which answers every outcome with a JSON body.

Each worker also writes whether it holds the model to WORKER_STATE_ENV's folder, one file per process: MMS's
/ping counts a worker whose model failed to load as running, so serve's watchdog reads these files instead.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus
from pathlib import Path

from imgclf import atomic
from imgclf.serving import inference
from imgclf.serving.model_server import WORKER_STATE_ENV, model_folder

log = logging.getLogger(__name__)



def report_state(loaded: bool, error: str | None = None) -> None:
    """<folder>/<pid>.json = {"loaded": ..., "error": ...}, written atomically (the watchdog reads it)."""
    folder = os.environ.get(WORKER_STATE_ENV)
    if folder:
        atomic.write_text(Path(folder) / f"{os.getpid()}.json", json.dumps({"loaded": loaded, "error": error}))


class HandlerService:
    def __init__(self) -> None:
        self.model: inference.ServingModel | None = None
        self.load_error: str | None = None

    def initialize(self, context) -> None:
        # serve gives MMS a stand-in folder (MMS imports from it), and the real model folder in MODEL_DIR_ENV or,
        # on a multi-model endpoint, in the stand-in's pointer file
        model_dir = model_folder(context.system_properties.get("model_dir"))
        report_state(loaded=False)  # loading
        try:
            self.model = inference.model_fn(model_dir)
        except Exception as e:  # MMS would swallow it; keep the reason for the 503 answers
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model from %s: %s", model_dir, self.load_error)
        report_state(loaded=self.model is not None, error=self.load_error)

    def handle(self, data: list[dict], context) -> list[str]:
        responses = []
        for idx, item in enumerate(data):
            headers = context.get_all_request_header(idx) or {}
            status, text = inference.handle_request(self.model, item.get("body"), headers, self.load_error)
            context.set_response_status(code=status, phrase=HTTPStatus(status).phrase, idx=idx)
            context.set_response_content_type(idx, inference.JSON_TYPE)
            responses.append(text)
        return responses
