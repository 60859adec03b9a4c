"""The module multi-model-server loads (`default_service_handler`): exactly one class, as MMS requires.

MMS creates one HandlerService per worker process, calls `initialize` once (load the model, on the GPU MMS gave
the worker when there are GPUs) and `handle` for each batch of requests (up to IMGCLF_BATCH_SIZE, which serve
registers the model with). The toolkit's own Transformer answers errors as "message + traceback" text and runs
a batch's requests one by one, so batches go through `inference.handle_requests`, which runs their images through
the network together and answers every request, whatever its outcome, with its own JSON body.

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
        gpu_id = context.system_properties.get("gpu_id")  # MMS's, round robin over the GPUs; None without GPUs
        report_state(loaded=False)  # loading
        try:
            self.model = inference.model_fn(model_dir, gpu_id=int(gpu_id or 0))
        except Exception as e:  # MMS would swallow it; keep the reason for the 503 answers
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model from %s: %s", model_dir, self.load_error)
        report_state(loaded=self.model is not None, error=self.load_error)

    def handle(self, data: list[dict], context) -> list[str]:
        requests = [(item.get("body"), context.get_all_request_header(idx) or {}) for idx, item in enumerate(data)]
        answers = inference.handle_requests(self.model, requests, self.load_error)
        for idx, (status, _) in enumerate(answers):
            context.set_response_status(code=status, phrase=HTTPStatus(status).phrase, idx=idx)
            context.set_response_content_type(idx, inference.JSON_TYPE)
        return [text for _, text in answers]
