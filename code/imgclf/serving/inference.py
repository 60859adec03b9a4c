"""Serving: the sagemaker-inference handler functions and the request handling around them.

    model_fn(model_dir)             -> ServingModel (ONNX Runtime on model.onnx, else PyTorch; warmed up)
    input_fn(body, content_type)    -> ImageRequest (decoded RGB images, optional top_k)
    predict_fn(request, model)      -> Prediction (class probabilities of every image, one batch)
    output_fn(prediction, accept)   -> JSON text

Images are decoded and transformed exactly as evaluation does it, by the same functions (imgclf.preprocessing:
load_rgb with the JPEG draft size, then eval_array with config.json's preprocessing: size, resize, crop,
mean/std, interpolation), in PIL and numpy: serving an exported model imports no torch. Every
bad request raises RequestError (an HTTP status and a message saying what was wrong and what is accepted);
`handle_requests` turns it into a JSON error body, so nothing a client sends can crash a worker or come back
as a 500 with a traceback. It takes multi-model-server's batch of requests (IMGCLF_BATCH_SIZE; 1 on the CPU, 16
on a GPU by default) and runs their images through the network together, each request answered on its own.

Response (one entry per image, in request order):
    {"predictions": [{"top_k": [{"label": "Affenpinscher", "class_name": "001.Affenpinscher",
                                 "index": 0, "probability": 0.93}, ...]}]}
Error: {"code": 415, "type": "UnsupportedMediaType", "message": "..."} (the shape of MMS's own errors).

Settings (top_k, limits, dtype, threads) come from imgclf.serving.settings: read once when the model loads,
kept in ServingModel.settings; a request reads none of the environment.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import numpy as np
from PIL import Image
from sagemaker_inference.errors import GenericInferenceToolkitError

from imgclf import artifacts
from imgclf.errors import UserError, WeightsError
from imgclf.preprocessing import Preprocessing, load_rgb
from imgclf.serving import front, runtime
from imgclf.serving.settings import ServingSettings

DEFAULT_SETTINGS = ServingSettings()

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "application/x-image", "application/octet-stream")
JSON_TYPE = "application/json"
CONTENT_TYPES = (*IMAGE_TYPES, JSON_TYPE)
ACCEPTS = (JSON_TYPE, "application/*", "*/*")
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
JSON_EXAMPLE = '{"instances": [{"b64": "<base64 image>"}, ...], "top_k": 3}'


class RequestError(GenericInferenceToolkitError):
    """A request the server refuses: HTTP status + a message naming the problem and what is accepted."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(int(status), message, status.phrase)


def error_body(status: int, message: str) -> str:
    return front.error_body(status, message).decode()


# --- model -------------------------------------------------------------------------------------------------

@dataclass
class ServingModel:
    run: runtime.OnnxRunner | runtime.TorchRunner  # float32 batch -> logits
    config: dict
    class_names: list[str]
    labels: list[str]
    preprocessing: Preprocessing
    settings: ServingSettings = DEFAULT_SETTINGS

    @property
    def draft_size(self) -> int:
        return self.preprocessing.resize_size


def label_of(class_name: str) -> str:
    """'001.Affenpinscher' -> 'Affenpinscher', '002.Afghan_hound' -> 'Afghan hound' (dogImages folder names)."""
    return re.sub(r"^\d+\.", "", class_name).replace("_", " ")


def check_model_dir(model_dir: str | os.PathLike, settings: ServingSettings = DEFAULT_SETTINGS) -> None:
    """Raise WeightsError if the model directory cannot be served, before any worker starts.

    With model.onnx the graph is what runs (model_fn loads it next). Without it, the safetensors weights are
    checked without reading them: the architecture is built on the meta device and the names and shapes in
    the file's header are compared with it (missing files, corrupt headers, config mismatches)."""
    config = artifacts.read_config(model_dir)
    if runtime.onnx_file(model_dir, config, settings.dtype) is not None:
        return
    try:
        import torch
        from safetensors import safe_open
    except ImportError:
        raise WeightsError(f"{Path(model_dir) / artifacts.ONNX_FILE} is missing, and this serving image has no "
                           f"PyTorch to run {artifacts.WEIGHTS_FILE}: {runtime.EXPORT_HINT}") from None
    from imgclf.models import build_model

    path = Path(model_dir) / artifacts.WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"{path} is missing next to {artifacts.CONFIG_FILE}: the model directory must be a "
                           f"training output ({artifacts.CONFIG_FILE} + {artifacts.WEIGHTS_FILE})")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    try:
        with torch.device("meta"):
            net, _ = build_model(config["architecture"], len(config["class_names"]))
    except UserError as e:
        raise WeightsError(f"{Path(model_dir) / artifacts.CONFIG_FILE}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in found][:3]
    problems += [f"unexpected {k}" for k in found if k not in expected][:3]
    problems += [f"{k} has shape {found[k]}, expected {expected[k]}" for k in expected
                 if k in found and found[k] != expected[k]][:3]
    if problems:
        raise WeightsError(f"{path} does not match config.json (architecture {config['architecture']}, "
                           f"{len(config['class_names'])} classes): {'; '.join(problems)}")


def model_fn(model_dir: str, settings: ServingSettings | None = None, gpu_id: int = 0) -> ServingModel:
    """Load what runs the network (runtime.load_runner; on GPU `gpu_id` when on a GPU), the preprocessing of
    config.json, warm up. The settings are read here, once per worker, unless given."""
    settings = settings or ServingSettings.load()
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # PIL refuses 2x this itself; `decode` refuses 1x with a 413
    # PIL warns between 1x and 2x; `decode` answers those itself. Once per process, not per image: catch_warnings
    # is not thread-safe, and a batch's requests are decoded in threads.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    config = artifacts.read_config(model_dir)
    model = ServingModel(
        run=runtime.load_runner(model_dir, config, settings, gpu_id), config=config,
        class_names=list(config["class_names"]), labels=[label_of(c) for c in config["class_names"]],
        preprocessing=Preprocessing.from_config(config), settings=settings,
    )
    warm_up(model, model_dir)
    log.info("model %s loaded from %s: %d classes, %d px, %s", config["architecture"], model_dir,
             len(model.class_names), config["image_size"], model.run.description)
    int8 = (config.get("onnx") or {}).get("int8")
    if settings.dtype == "int8" and int8:  # the accuracy the export measured for the faster graph
        log.info("int8 graph checked at export on %d validation images: top-1 agrees on %d, largest probability "
                 "difference %.4f (bound %.4f)", int8["images"], int8["top1_agreements"],
                 int8["max_probability_difference"], int8["bound"])
    return model


def warm_up(model: ServingModel, model_dir: str) -> None:
    """One full request (encode, decode, transform, forward, JSON) so the first client request is not slow, and
    a model whose outputs are not finite (it diverged in training) is refused before any client sees them."""
    buf = io.BytesIO()
    Image.new("RGB", (model.draft_size * 2, model.draft_size * 2), (128, 96, 64)).save(buf, "JPEG")
    try:
        output_fn(predict_fn(input_fn(buf.getvalue(), "image/jpeg", model.settings), model), JSON_TYPE)
    except RequestError as e:
        raise WeightsError(f"{model_dir}: the warm-up request failed: {e.message}") from None


# --- request -----------------------------------------------------------------------------------------------

@dataclass
class ImageRequest:
    images: list[bytes]
    top_k: int | None = None


@dataclass
class Prediction:
    probabilities: np.ndarray  # (images, classes), float32
    class_names: list[str]
    labels: list[str]
    top_k: int


def media_type(header: str | None) -> str:
    """'Image/JPEG; charset=x' -> 'image/jpeg'."""
    return (header or "").split(";", 1)[0].strip().lower()


def parse_top_k(value, source: str) -> int:
    text_ok = isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()) is not None  # ASCII digits
    if isinstance(value, bool) or not (isinstance(value, int) or text_ok):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{source}: top_k={str(value)[:20]!r} is not a positive integer")
    top_k = int(value)
    if top_k < 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{source}: top_k={top_k} must be at least 1")
    return top_k


def top_k_from_attributes(header: str | None) -> int | None:
    """X-Amzn-SageMaker-Custom-Attributes: 'top_k=3' (pairs separated by ',' or ';'; other keys ignored)."""
    for pair in re.split(r"[,;]", header or ""):
        key, sep, value = pair.partition("=")
        if sep and key.strip().lower() in ("top_k", "top-k", "topk"):
            return parse_top_k(value.strip(), "X-Amzn-SageMaker-Custom-Attributes")
    return None


def _b64(item, where: str) -> bytes:
    if isinstance(item, dict):
        if "b64" not in item:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: object without a 'b64' field; "
                                                       f"send {JSON_EXAMPLE}")
        item = item["b64"]
    if not isinstance(item, str):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: expected a base64 string or {{\"b64\": \"...\"}}, "
                                                   f"got {type(item).__name__}")
    text = "".join(item.split())  # line-wrapped output of `base64` is fine
    if text.startswith("data:") and "," in text:  # data URL: data:image/jpeg;base64,....
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: invalid base64 ({e})") from None


def parse_json(body: bytes, max_images: int = DEFAULT_SETTINGS.max_images) -> ImageRequest:
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"JSON body nested too deeply; send {JSON_EXAMPLE}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of thousands of digits
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid JSON ({str(e)[:200]}); send {JSON_EXAMPLE}"
                           ) from None
    if isinstance(doc, dict) and "instances" in doc:
        items = doc["instances"]
    elif isinstance(doc, dict) and "b64" in doc:
        items = [doc]
    else:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"JSON body has no 'instances' list; send {JSON_EXAMPLE}")
    if not isinstance(items, list) or not items:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'instances' must be a non-empty list; send {JSON_EXAMPLE}")
    if len(items) > max_images:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"{len(items)} images in one request; at most {max_images} (IMGCLF_MAX_IMAGES)")
    top_k = parse_top_k(doc["top_k"], "JSON field") if "top_k" in doc else None
    return ImageRequest([_b64(item, f"instances[{i}]") for i, item in enumerate(items)], top_k)


def input_fn(input_data: bytes | str, content_type: str | None,
             settings: ServingSettings = DEFAULT_SETTINGS) -> ImageRequest:
    """Raw image bytes (image/*, application/x-image, application/octet-stream) or JSON with base64 images."""
    kind = media_type(content_type)
    if kind not in CONTENT_TYPES:
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {content_type or '(none)'!r} is not supported; send raw image bytes as "
                           f"{', '.join(IMAGE_TYPES)} or base64 images as {JSON_TYPE}: {JSON_EXAMPLE}")
    body = input_data.encode() if isinstance(input_data, str) else bytes(input_data or b"")
    if not body:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"empty request body; send an image ({content_type})")
    if len(body) > settings.max_payload_bytes:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"request body of {len(body)} bytes is over the {settings.max_payload_bytes} byte limit "
                           "(SAGEMAKER_MAX_PAYLOAD_IN_MB); send a smaller image")
    return parse_json(body, settings.max_images) if kind == JSON_TYPE else ImageRequest([body])


def check_shape(width: int, height: int, where: str, settings: ServingSettings) -> None:
    """Before decoding: the header's pixel count, and the aspect ratio, which bounds the resized image (a 1x5000
    image keeps its ratio when resized to 256 wide: 256x1,280,000 pixels)."""
    if width * height > settings.max_image_pixels:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"{where}: {width}x{height} = {width * height} pixels is over the limit of "
                           f"{settings.max_image_pixels} (IMGCLF_MAX_IMAGE_PIXELS); downscale it")
    if min(width, height) < 1 or max(width, height) > settings.max_aspect_ratio * min(width, height):
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"{where}: {width}x{height} is too thin: the longer side may be at most "
                           f"{settings.max_aspect_ratio} times the shorter (IMGCLF_MAX_ASPECT_RATIO); crop it")


def decode(image: bytes, draft_size: int, where: str = "image", settings: ServingSettings = DEFAULT_SETTINGS,
           budget: list[int] | None = None) -> Image.Image:
    """Check the header's size (decompression bombs, thin images) and what the request's images decode to
    together (`budget`: pixels left, shared by a request's images), then decode as evaluation does."""
    if not image:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: empty image")
    try:
        with Image.open(io.BytesIO(image)) as probe:
            check_shape(*probe.size, where, settings)
            if probe.format == "JPEG":  # what load_rgb will decode: JPEGs at a reduced scale
                probe.draft("RGB", (draft_size, draft_size))
            pixels = probe.size[0] * probe.size[1]
        if budget is not None:
            if pixels > budget[0]:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"{where}: the request's images decode to more than "
                                   f"{settings.max_request_pixels} pixels together (IMGCLF_MAX_REQUEST_PIXELS); "
                                   "send fewer or smaller images per request")
            budget[0] -= pixels
        return load_rgb(io.BytesIO(image), draft_size=draft_size)
    except Image.DecompressionBombError as e:  # PIL's own refusal, at twice the limit, before check_shape
        counted = re.search(r"\((\d+) pixels\)", str(e))
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"{where}: {counted[1] + ' pixels' if counted else 'the image'} is over the limit of "
                           f"{settings.max_image_pixels} (IMGCLF_MAX_IMAGE_PIXELS); downscale it") from None
    except RequestError:
        raise
    except Exception as e:  # PIL raises many types for bad bytes (UnidentifiedImageError, OSError, SyntaxError...)
        said = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))[:200]  # PIL names our buffer
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"{where}: not a readable image ({type(e).__name__}: {said}); send a complete "
                           "JPEG, PNG, WebP, GIF, BMP or TIFF file") from None


def model_input(image: bytes, model: ServingModel, where: str, budget: list[int]) -> np.ndarray:
    """One image as the model's float32 (3, H, W) input; whatever the bytes cause is a 4xx."""
    img = decode(image, model.draft_size, where, model.settings, budget)
    try:
        return model.preprocessing.eval_array(img)
    except MemoryError:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"{where}: too large to prepare; downscale it"
                           ) from None
    except Exception as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: cannot be prepared ({type(e).__name__}: "
                                                   f"{str(e)[:200]})") from None


def model_inputs(request: ImageRequest, model: ServingModel) -> np.ndarray:
    """Every image of a request decoded and transformed once, within the request's pixel budget: (N, 3, H, W)."""
    where = "image" if len(request.images) == 1 else "instances[{}]"
    budget = [model.settings.max_request_pixels]
    return np.stack([model_input(img, model, where.format(i), budget) for i, img in enumerate(request.images)])


def prediction_of(logits: np.ndarray, request: ImageRequest, model: ServingModel) -> Prediction:
    """A request's rows of the network's output -> its class probabilities."""
    logits = logits.astype(np.float32)
    if logits.ndim != 2 or logits.shape[1] != len(model.class_names):  # refused at load: warm_up runs this
        raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR,
                           f"the network gives outputs of shape {logits.shape} for {len(logits)} image(s), but "
                           f"config.json lists {len(model.class_names)} class_names: serve the config.json written "
                           "with these weights")
    if not np.isfinite(logits).all():  # never NaN in a response (not JSON either)
        raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR,
                           "the model's outputs are not finite (NaN or infinity): it diverged in training; retrain "
                           "it with a lower learning rate")
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True)
    top_k = request.top_k or model.settings.top_k
    return Prediction(probabilities, model.class_names, model.labels, min(top_k, len(model.class_names)))


def predict_fn(request: ImageRequest, model: ServingModel) -> Prediction:
    """Decode and transform every image once (within the request's pixel budget), then one batched forward pass."""
    return prediction_of(model.run(model_inputs(request, model)), request, model)


def check_accept(accept: str | None) -> None:
    kinds = [media_type(a) for a in (accept or "").split(",") if a.strip()]
    if kinds and not any(k in ACCEPTS for k in kinds):
        raise RequestError(HTTPStatus.NOT_ACCEPTABLE,
                           f"Accept {accept!r} is not supported; responses are {JSON_TYPE} (or omit Accept)")


def output_fn(prediction: Prediction, accept: str | None) -> str:
    check_accept(accept)
    # highest first; equal probabilities in index order, as torch.topk on the CPU
    indices = np.argsort(-prediction.probabilities, axis=1, kind="stable")[:, :prediction.top_k]
    return json.dumps(allow_nan=False, obj={"predictions": [
        {"top_k": [{"label": prediction.labels[i], "class_name": prediction.class_names[i], "index": i,
                    "probability": round(float(row[i]), 6)} for i in row_i.tolist()]}
        for row, row_i in zip(prediction.probabilities, indices)
    ]})


# --- one HTTP request (called by the MMS handler service) --------------------------------------------------

def header(headers: dict, name: str) -> str | None:
    """Header lookup that ignores case (MMS passes the request headers as the client spelled them)."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return value.decode() if isinstance(value, bytes) else value
    return None


@dataclass
class Pending:
    """A request that passed its checks, waiting for its batch's forward pass."""

    index: int  # its place in multi-model-server's batch
    request: ImageRequest
    accept: str | None
    inputs: np.ndarray


def refusal(e: Exception) -> tuple[int, str]:
    """(status, JSON body) for what went wrong with a request: a RequestError's own, else a 500 that says what."""
    if isinstance(e, RequestError):
        log.info("request refused: %d %s", e.status_code, e.message)
        return e.status_code, error_body(e.status_code, e.message)
    log.error("request failed", exc_info=e)  # a bug or resource problem: answer 500 with a message, keep the worker
    return 500, error_body(500, f"internal error: {type(e).__name__}: {e}")


def preparing_threads(settings: ServingSettings) -> int:
    """Threads that decode a batch's requests at once in a worker: its share of the CPUs (a GPU worker's batch
    would otherwise be decoded on one core while the others idle). PIL and numpy release the GIL."""
    return max(1, (os.cpu_count() or 1) // max(1, settings.workers or (os.cpu_count() or 1)))


_pool: ThreadPoolExecutor | None = None


def prepared(requests: list[ImageRequest], model: ServingModel) -> list[np.ndarray | Exception]:
    """model_inputs of each request (or what it raised), several requests at once in threads."""
    global _pool

    def one(request: ImageRequest) -> np.ndarray | Exception:
        try:
            return model_inputs(request, model)
        except Exception as e:  # answered for this request alone
            return e

    threads = min(len(requests), preparing_threads(model.settings))
    if threads < 2:
        return [one(r) for r in requests]
    if _pool is None:
        _pool = ThreadPoolExecutor(preparing_threads(model.settings), thread_name_prefix="prepare")
    return list(_pool.map(one, requests))


def handle_requests(model: ServingModel | None, requests: list[tuple[bytes | None, dict]],
                    load_error: str | None = None) -> list[tuple[int, str]]:
    """(HTTP status, JSON body) for each of several requests (multi-model-server's batch, IMGCLF_BATCH_SIZE); never
    raises. Each request is checked alone and answered alone (one bad image refuses its own request only). They go
    through the network in groups of at most IMGCLF_MAX_IMAGES images, so a batch holds no more memory than one
    full request; a group's requests are decoded at once in threads (`prepared`), then run in one pass."""
    if model is None:
        return [refusal(RequestError(HTTPStatus.SERVICE_UNAVAILABLE, f"model not loaded: {load_error}"))
                for _ in requests]
    answers: list[tuple[int, str] | None] = [None] * len(requests)
    parsed: list[tuple[int, ImageRequest, str | None]] = []
    for index, (body, headers) in enumerate(requests):
        try:
            accept = header(headers, "accept")
            check_accept(accept)  # before the work, so a 406 costs nothing
            request = input_fn(body or b"", header(headers, "content-type"), model.settings)
            if request.top_k is None:
                request.top_k = top_k_from_attributes(header(headers, CUSTOM_ATTRIBUTES))
            parsed.append((index, request, accept))
        except Exception as e:
            answers[index] = refusal(e)
    groups: list[list[tuple[int, ImageRequest, str | None]]] = []
    images = 0
    for item in parsed:
        if groups and images + len(item[1].images) <= model.settings.max_images:
            groups[-1].append(item)
            images += len(item[1].images)
        else:
            groups.append([item])
            images = len(item[1].images)
    for group in groups:
        pending = []
        for (index, request, accept), inputs in zip(group, prepared([r for _, r, _ in group], model), strict=True):
            if isinstance(inputs, Exception):
                answers[index] = refusal(inputs)
            else:
                pending.append(Pending(index, request, accept, inputs))
        if pending:
            run_pass(model, pending, answers)
    return answers  # type: ignore[return-value]  # every request was answered above


def run_pass(model: ServingModel, group: list[Pending], answers: list) -> None:
    """One forward pass over the group's images; each request's rows become its answer."""
    try:
        logits = model.run(np.concatenate([p.inputs for p in group]))
    except Exception as e:  # the whole pass failed: each of its requests says so
        for p in group:
            answers[p.index] = refusal(e)
        return
    start = 0
    for p in group:
        rows = logits[start:start + len(p.inputs)]
        start += len(p.inputs)
        try:
            answers[p.index] = 200, output_fn(prediction_of(rows, p.request, model), p.accept)
        except Exception as e:
            answers[p.index] = refusal(e)


def handle_request(model: ServingModel | None, body: bytes | None, headers: dict,
                   load_error: str | None = None) -> tuple[int, str]:
    """(HTTP status, JSON body) for one request; never raises."""
    return handle_requests(model, [(body, headers)], load_error)[0]
