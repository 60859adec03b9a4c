"""The module multi-model-server loads (`default_service_handler`): exactly one class, as MMS requires.

MMS creates one HandlerService per worker process, calls `initialize` once (load the model) and `handle`
for each batch of requests. The toolkit's own Transformer answers errors as "message + traceback" text,
so requests go through `inference.handle_request`, which answers every outcome with a JSON body.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from imgclf.serving import inference

log = logging.getLogger(__name__)


class HandlerService:
    def __init__(self) -> None:
        self.model: inference.ServingModel | None = None
        self.load_error: str | None = None

    def initialize(self, context) -> None:
        model_dir = context.system_properties.get("model_dir")
        try:
            self.model = inference.model_fn(model_dir)
        except Exception as e:  # MMS would swallow it; keep the reason for the 503 answers
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("cannot load the model from %s: %s", model_dir, self.load_error)

    def handle(self, data: list[dict], context) -> list[str]:
        responses = []
        for idx, item in enumerate(data):
            headers = context.get_all_request_header(idx) or {}
            status, text = inference.handle_request(self.model, item.get("body"), headers, self.load_error)
            context.set_response_status(code=status, phrase=HTTPStatus(status).phrase, idx=idx)
            context.set_response_content_type(idx, inference.JSON_TYPE)
            responses.append(text)
        return responses
