"""The module MMS loads, driven in-process as multi-model-server drives it: `initialize(context)` once, then
`handle(data, context)` per batch, with MMS's own Context and RequestProcessor objects (the inference toolkit's
unit tests do the same with mocks). What reaches the HTTP client is the status and content type set on them."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from imgclf import artifacts, export, models
from imgclf.preprocessing import Preprocessing
from imgclf.serving import handler_service
from imgclf.serving.model_server import MODEL_DIR_ENV, WORKER_STATE_ENV
from mms.context import Context, RequestProcessor

from tests.photos import DOG

CLASSES = ["001.Affenpinscher", "002.Afghan_hound", "003.Airedale_terrier"]


def mms_context(model_dir, headers: list[dict]) -> Context:
    context = Context("model", str(model_dir), {}, len(headers), None, "1.1.11")
    context.request_processor = [RequestProcessor(h) for h in headers]
    return context


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A resnet18 of 3 classes at 32 px (random weights), saved and exported as training writes it."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net, _ = models.build_model("resnet18", len(CLASSES))  # random weights whose answers differ between images
    artifacts.save_model(folder, net.eval(), {"architecture": "resnet18", "class_names": CLASSES,
                                              **Preprocessing(32).to_config()})
    export.export(folder)
    return folder


@pytest.fixture
def service(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(WORKER_STATE_ENV, str(tmp_path))
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    handler = handler_service.HandlerService()
    handler.initialize(mms_context(model_dir, []))
    return handler


def test_initialize_loads_the_model_and_reports_it(service, tmp_path):
    import os

    assert service.model is not None and service.load_error is None
    assert json.loads((tmp_path / f"{os.getpid()}.json").read_text()) == {"loaded": True, "error": None}


def test_a_batch_gets_one_json_answer_per_request_with_its_own_status(service, model_dir):
    headers = [{"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=2"},
               {"content-type": "image/jpeg"},
               {"Content-Type": "text/csv"},
               {"Content-Type": "image/jpeg", "Accept": "text/html"}]
    bodies = [DOG.read_bytes(), b"not an image", b"1,2,3", DOG.read_bytes()]
    context = mms_context(model_dir, headers)
    answers = service.handle([{"body": b} for b in bodies], context)
    statuses = [context.get_response_status(i)[0] for i in range(len(bodies))]
    assert statuses == [200, 400, 415, 406], answers
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(bodies)))
    top = json.loads(answers[0])["predictions"][0]["top_k"]
    assert len(top) == 2 and {t["class_name"] for t in top} <= set(CLASSES)
    for answer, status in zip(answers[1:], statuses[1:]):
        assert json.loads(answer)["code"] == status


def test_a_model_that_cannot_load_answers_503_with_the_reason(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv(WORKER_STATE_ENV, str(tmp_path))
    handler = handler_service.HandlerService()
    handler.initialize(mms_context(tmp_path / "empty", []))  # MMS would log and go on: the worker stays up
    state = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
    assert state["loaded"] is False and "config.json is missing" in state["error"]
    context = mms_context(tmp_path, [{"Content-Type": "image/jpeg"}])
    answer = json.loads(handler.handle([{"body": DOG.read_bytes()}], context)[0])
    assert context.get_response_status(0)[0] == 503 == answer["code"]
    message = answer["message"]
    assert message.startswith("model not loaded: WeightsError: ") and "config.json is missing" in message


def test_a_batch_of_requests_runs_through_the_network_in_one_pass_and_answers_each_alone(service, model_dir):
    """IMGCLF_BATCH_SIZE: MMS hands a worker several requests; their images make one forward pass (up to
    IMGCLF_MAX_IMAGES), and each answer equals the one the request gets alone."""
    from dataclasses import replace

    from tests.photos import encode, photo

    bodies = [encode(photo(seed=seed), "JPEG", quality=90) for seed in range(4)]
    alone = [json.loads(service.handle([{"body": b}], mms_context(model_dir, [{"Content-Type": "image/jpeg"}]))[0])
             for b in bodies]
    passes = []
    run = service.model.run
    service.model.run = lambda batch: passes.append(len(batch)) or run(batch)
    jpeg = {"Content-Type": "image/jpeg"}
    headers = [jpeg, jpeg, {"Content-Type": "image/png"}, jpeg, jpeg]
    batch = bodies[:2] + [b"not an image"] + bodies[2:]
    context = mms_context(model_dir, headers)
    answers = [json.loads(a) for a in service.handle([{"body": b} for b in batch], context)]
    assert passes == [4]  # the four good requests together; the bad one refused before the pass
    assert [context.get_response_status(i)[0] for i in range(5)] == [200, 200, 400, 200, 200]
    assert answers[:2] + answers[3:] == alone
    # At most IMGCLF_MAX_IMAGES images per pass: 3 requests of 2 images with a limit of 4 -> passes of 4 and 2.
    passes.clear()
    service.model.settings = replace(service.model.settings, max_images=4)
    two = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in bodies[:2]]}).encode()
    context = mms_context(model_dir, [{"Content-Type": "application/json"}] * 3)
    answers = [json.loads(a) for a in service.handle([{"body": two}] * 3, context)]
    assert passes == [4, 2] and all(len(a["predictions"]) == 2 for a in answers)
    assert answers[0]["predictions"] == [a["predictions"][0] for a in alone[:2]]
    assert len({json.dumps(a) for a in alone}) == 4  # the comparisons above tell the requests apart


def test_a_batchs_requests_are_decoded_in_threads_with_the_same_answers(service, model_dir, monkeypatch):
    """A worker with CPUs to spare (one worker per GPU, several vCPUs) decodes a batch's requests at once."""
    import threading
    from dataclasses import replace

    from imgclf.serving import inference

    from tests.photos import encode, photo

    bodies = [encode(photo(seed=seed), "JPEG", quality=90) for seed in range(4)] + [b"not an image"]
    jpeg = {"Content-Type": "image/jpeg"}
    alone = service.handle([{"body": b} for b in bodies], mms_context(model_dir, [jpeg] * 5))  # 1 thread here
    service.model.settings = replace(service.model.settings, workers=1)
    monkeypatch.setattr(inference.os, "cpu_count", lambda: 4)
    assert inference.preparing_threads(service.model.settings) == 4
    threads = []
    model_inputs = inference.model_inputs
    monkeypatch.setattr(inference, "model_inputs", lambda request, model: threads.append(
        threading.current_thread().name) or model_inputs(request, model))
    context = mms_context(model_dir, [jpeg] * 5)
    assert service.handle([{"body": b} for b in bodies], context) == alone
    assert [context.get_response_status(i)[0] for i in range(5)] == [200, 200, 200, 200, 400]
    assert len(threads) == 5 and all(name.startswith("prepare") for name in threads), threads
