"""Serving settings: read from the environment once (when `serve` starts, and when a worker loads the model),
validated, then passed around as one frozen value; nothing reads the environment per request.

    IMGCLF_TOP_K                    5           predictions per image when the request does not say
    IMGCLF_MAX_IMAGE_PIXELS         40000000    pixels per image, as its header says (decompression bombs get 413)
    IMGCLF_MAX_REQUEST_PIXELS       40000000    pixels decoded per request, all its images together (413)
    IMGCLF_MAX_ASPECT_RATIO         20          longer side / shorter side (thin images resize into huge ones: 400)
    IMGCLF_MAX_IMAGES               64          images per JSON request
    SAGEMAKER_MAX_PAYLOAD_IN_MB     6           request body limit (SageMaker's real-time endpoints: 6 MB)
    IMGCLF_SERVE_DTYPE              float32     float32 (exact) | int8 (model.onnx quantized, if the export
                                                accepted it) | bfloat16 (PyTorch autocast, models without model.onnx)
    IMGCLF_SERVE_DEVICE             auto        auto (a GPU when the runtime can use one, else the CPU) | cpu |
                                                cuda (a GPU or /ping answers 503 with the reason; runtime.py)
    IMGCLF_TORCH_THREADS            0           ONNX Runtime or torch threads per worker; 0 = automatic
                                                (imgclf.serving.runtime: onnx_threads, threads_per_worker)
    SAGEMAKER_MODEL_SERVER_WORKERS  0           MMS workers; 0 = MMS's default (one per CPU, or per GPU)
    IMGCLF_BATCH_SIZE               0           requests a worker runs through the network at once (MMS's
                                                batching); 0 = automatic: GPU_BATCH_SIZE on a GPU, else 1
    IMGCLF_MAX_BATCH_DELAY_MS       10          how long MMS waits for a batch to fill before it runs what it has
    SAGEMAKER_MODEL_SERVER_TIMEOUT  60          seconds a worker may take per request (then a JSON 500; MMS
                                                counts the toolkit's value in minutes: serve gives it seconds);
                                                SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS, the toolkit's name, wins
    IMGCLF_UNHEALTHY_AFTER_S        30          seconds with no worker holding the model before /ping answers 503
    IMGCLF_BODY_TIMEOUT_S           10          seconds for a request body to arrive once its head has (then 408)
    IMGCLF_IDLE_TIMEOUT_S           75          seconds a connection may wait for its next request head
    IMGCLF_MAX_CONNECTIONS          1000        connections at once on the serving port (more get 503)
    SAGEMAKER_MULTI_MODEL           false       true: a multi-model endpoint (imgclf.serving.multi_model)
    IMGCLF_MAX_MODELS               0           multi-model: models loaded at once (0 = as many as memory
                                                allows); a load over it gets 507
    IMGCLF_MIN_FREE_MEMORY_MB       512         multi-model: memory a load must leave free (else 507)

The front on the serving port (imgclf.serving.front) refuses a body over the payload limit with a JSON 413
before reading it; multi-model-server behind it gets twice the limit. The workers, which MMS starts with
serve's environment, get the settings serve read as one JSON value (IMGCLF_SERVING_SETTINGS), which
`ServingSettings.load` prefers to the individual variables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from imgclf.errors import UserError

SETTINGS_ENV = "IMGCLF_SERVING_SETTINGS"
PAYLOAD_ENV = "SAGEMAKER_MAX_PAYLOAD_IN_MB"
DTYPES = ("float32", "int8", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
MB = 1024 * 1024


GPU_BATCH_SIZE = 16  # IMGCLF_BATCH_SIZE's default on a GPU: one request rarely fills it
JAVA_INT_MAX = 2**31 - 1  # what multi-model-server (Java) reads its numbers into
# Each integer setting's variable and (lowest, highest or None) value: multi-model-server takes its numbers as Java
# ints, SageMaker's invocations last at most an hour and carry at most 1 GB (asynchronous inference).
VARIABLES = {
    "top_k": "IMGCLF_TOP_K", "max_image_pixels": "IMGCLF_MAX_IMAGE_PIXELS",
    "max_request_pixels": "IMGCLF_MAX_REQUEST_PIXELS", "max_aspect_ratio": "IMGCLF_MAX_ASPECT_RATIO",
    "max_images": "IMGCLF_MAX_IMAGES", "max_payload_bytes": PAYLOAD_ENV, "torch_threads": "IMGCLF_TORCH_THREADS",
    "workers": "SAGEMAKER_MODEL_SERVER_WORKERS", "batch_size": "IMGCLF_BATCH_SIZE",
    "max_batch_delay_ms": "IMGCLF_MAX_BATCH_DELAY_MS", "model_server_timeout": "SAGEMAKER_MODEL_SERVER_TIMEOUT",
    "unhealthy_after_s": "IMGCLF_UNHEALTHY_AFTER_S", "body_timeout_s": "IMGCLF_BODY_TIMEOUT_S",
    "idle_timeout_s": "IMGCLF_IDLE_TIMEOUT_S", "max_connections": "IMGCLF_MAX_CONNECTIONS",
    "max_models": "IMGCLF_MAX_MODELS", "min_free_memory_mb": "IMGCLF_MIN_FREE_MEMORY_MB",
}
DAY = 86_400
BOUNDS = {
    "top_k": (1, None), "max_image_pixels": (1, None), "max_request_pixels": (1, None),
    "max_aspect_ratio": (1, None), "max_images": (1, 100_000), "max_payload_bytes": (1, 1024 * MB),
    "torch_threads": (0, 1024), "workers": (0, 1024), "batch_size": (0, 1024), "max_batch_delay_ms": (0, 10_000),
    "model_server_timeout": (1, 3600), "unhealthy_after_s": (1, DAY), "body_timeout_s": (1, DAY),
    "idle_timeout_s": (1, DAY), "max_connections": (1, 1_000_000), "max_models": (0, 100_000),
    "min_free_memory_mb": (0, None),
}
SCALES = {"max_payload_bytes": MB}  # settings whose variable counts a larger unit (the payload limit: MB)
UNITS = {"max_payload_bytes": " (MB)", "max_batch_delay_ms": " (milliseconds)", "model_server_timeout": " (seconds)",
         "unhealthy_after_s": " (seconds)", "body_timeout_s": " (seconds)", "idle_timeout_s": " (seconds)",
         "torch_threads": " (0: automatic)", "workers": " (0: automatic)", "batch_size": " (0: automatic)",
         "max_models": " (0: no limit)"}


class SettingsError(UserError):
    """A serving environment variable with a value the server cannot use."""


@dataclass(frozen=True)
class ServingSettings:
    top_k: int = 5
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 40_000_000
    max_aspect_ratio: int = 20
    max_images: int = 64
    max_payload_bytes: int = 6 * MB
    dtype: str = "float32"
    device: str = "auto"
    torch_threads: int = 0
    workers: int = 0
    batch_size: int = 0
    max_batch_delay_ms: int = 10
    model_server_timeout: int = 60
    unhealthy_after_s: int = 30
    body_timeout_s: int = 10
    idle_timeout_s: int = 75
    max_connections: int = 1000
    multi_model: bool = False
    max_models: int = 0
    min_free_memory_mb: int = 512

    def __post_init__(self) -> None:
        for name, (lowest, highest) in BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= (highest or value):
                unit = SCALES.get(name, 1)
                shown = repr(value) if not isinstance(value, int) else value if unit == 1 else f"{value / unit:g}"
                allowed = f"{-(-lowest // unit)}-{highest // unit}" if highest else f"at least {lowest}"
                raise SettingsError(f"{VARIABLES[name]}={shown}: must be {allowed}{UNITS.get(name, '')}")
        if self.dtype not in DTYPES:
            raise SettingsError(f"IMGCLF_SERVE_DTYPE={self.dtype!r}: use {' or '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise SettingsError(f"IMGCLF_SERVE_DEVICE={self.device!r}: use {' or '.join(DEVICES)}")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """The documented variables (module docstring); unset or empty ones take the defaults."""
        env = os.environ if environ is None else environ
        default = cls()
        ints = {name: _int(env, variable, getattr(default, name) // SCALES.get(name, 1)) * SCALES.get(name, 1)
                for name, variable in VARIABLES.items()}
        ints["model_server_timeout"] = _int(env, "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS",
                                            ints["model_server_timeout"])  # the toolkit's name wins
        return cls(
            dtype=env.get("IMGCLF_SERVE_DTYPE", "").strip().lower() or default.dtype,
            device=env.get("IMGCLF_SERVE_DEVICE", "").strip().lower() or default.device,
            multi_model=_bool(env, "SAGEMAKER_MULTI_MODEL"),
            **ints,
        )

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        """What `serve` handed to the workers, or else the variables themselves (the handlers used without serve)."""
        env = os.environ if environ is None else environ
        handed = env.get(SETTINGS_ENV)
        if not handed:
            return cls.from_environment(env)
        try:
            return cls(**json.loads(handed))
        except (ValueError, TypeError) as e:
            raise SettingsError(f"{SETTINGS_ENV}: not the settings `serve` writes ({e}); unset it") from None

    def for_workers(self) -> dict[str, str]:
        """The variable `serve` sets for multi-model-server's workers."""
        return {SETTINGS_ENV: json.dumps(asdict(self))}


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise SettingsError(f"environment variable {name}={value!r} is not an integer") from None


def _bool(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "false", "0", "no"):
        return False
    if value in ("true", "1", "yes"):
        return True
    raise SettingsError(f"environment variable {name}={value!r}: use true or false")
