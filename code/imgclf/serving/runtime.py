"""What runs the network in a serving worker: ONNX Runtime on the exported graph, or PyTorch on the weights.

    model.onnx present (written by training, or `python -m imgclf.export MODEL_DIR`) -> OnnxRunner
    otherwise (models trained before the export existed)                            -> TorchRunner

The device (IMGCLF_SERVE_DEVICE): `auto` runs on a GPU when the runtime can use one (ONNX Runtime's CUDA execution
provider, in onnxruntime-gpu; PyTorch's CUDA), else on the CPU, and logs which and why; `cuda` refuses to load
without one, so /ping answers 503 with the reason instead of a paid GPU idling; `cpu` never uses one.

Both take the float32 (N, 3, H, W) batch that imgclf.preprocessing made and return float32 logits (N, classes),
so the request handling around them is the same. torch is imported only by TorchRunner: the slim serving image,
which has no torch, serves exported models and says how to export the others.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from imgclf import artifacts
from imgclf.errors import WeightsError
from imgclf.serving.settings import ServingSettings

log = logging.getLogger(__name__)

EXPORT_HINT = "export it: python -m imgclf.export MODEL_DIR (in a training image or the dev environment)"


# ONNX Runtime's intra-op threads per worker, at most: a lone request then runs on up to this many cores.
MAX_ONNX_THREADS = 4


def threads_per_worker(settings: ServingSettings, accelerators: int = 0) -> int:
    """PyTorch: share the CPUs between MMS workers (its OpenMP threads spin, so more threads than CPUs would
    fight over them)."""
    cpus = os.cpu_count() or 1
    workers = settings.workers or accelerators or cpus
    return settings.torch_threads or max(1, cpus // workers)


def onnx_threads(settings: ServingSettings) -> tuple[int, bool]:
    """ONNX Runtime: (intra-op threads per worker, whether they may spin-wait).

    Every worker gets up to MAX_ONNX_THREADS threads, which sleep instead of spinning when the workers' threads
    outnumber the CPUs: a lone request runs on several cores, and under load the workers share them (the
    measurements behind the rule: docs/serving.md, "Workers and threads")."""
    cpus = os.cpu_count() or 1
    workers = settings.workers or cpus
    threads = settings.torch_threads or min(cpus, MAX_ONNX_THREADS)
    return threads, workers * threads <= cpus


def onnx_file(model_dir: str | os.PathLike, config: dict, dtype: str) -> Path | None:
    """The graph to serve for `dtype`, or None when the model has no export (serve it with PyTorch).

    float32: model.onnx. int8: the quantized graph the export accepted (config.json's onnx.int8); a model
    exported without it, or whose int8 graph failed the accuracy check, is refused with the reason."""
    model_dir = Path(model_dir)
    exported = config.get("onnx")
    if dtype == "int8":
        int8 = (exported or {}).get("int8")
        if not int8 or not int8.get("accepted"):
            why = (int8 or {}).get("reason") or "the model was exported without it"
            raise WeightsError(f"IMGCLF_SERVE_DTYPE=int8: {model_dir} has no accepted int8 graph ({why}); serve "
                               "float32, or run: python -m imgclf.export MODEL_DIR --data VALID_DIR --int8")
        path = model_dir / int8["file"]
    elif (model_dir / artifacts.ONNX_FILE).is_file():
        path = model_dir / artifacts.ONNX_FILE
    else:
        return None
    if not path.is_file():
        raise WeightsError(f"{path} is missing although config.json lists it; {EXPORT_HINT}")
    return path


CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


def onnx_providers(device: str, available: list[str]) -> tuple[list[str], str]:
    """(the execution providers to ask ONNX Runtime for, in order, why) for IMGCLF_SERVE_DEVICE `device`, given
    the providers this ONNX Runtime build has; WeightsError when `cuda` is asked for and it has no CUDA."""
    if device == "cpu":
        return [CPU_PROVIDER], "IMGCLF_SERVE_DEVICE=cpu"
    if CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER], f"IMGCLF_SERVE_DEVICE={device}, and this ONNX Runtime has CUDA"
    why = f"this ONNX Runtime has no CUDA execution provider (it has {', '.join(available)}: the CPU build)"
    if device == "cuda":
        raise WeightsError(f"IMGCLF_SERVE_DEVICE=cuda, but {why}: serve with a GPU serving image (onnxruntime-gpu) "
                           "on a GPU instance, or set IMGCLF_SERVE_DEVICE=auto or cpu")
    return [CPU_PROVIDER], why


def used_device(device: str, asked: list[str], used: list[str], reason: str) -> str:
    """What the session runs on, and why, for the log; WeightsError when `cuda` was demanded and ONNX Runtime
    fell back to the CPU (no GPU visible, no driver, CUDA libraries missing: its own log says which)."""
    if CUDA_PROVIDER in used:
        return f"on the GPU ({reason})"
    if CUDA_PROVIDER in asked:
        if device == "cuda":
            raise WeightsError("IMGCLF_SERVE_DEVICE=cuda, but ONNX Runtime could not start its CUDA execution "
                               "provider (no GPU visible, or no driver: its log above says why)")
        return "on the CPU (ONNX Runtime could not start CUDA: no GPU visible, or no driver; its log says why)"
    return f"on the CPU ({reason})"


class OnnxRunner:
    """An ONNX Runtime session with `threads` intra-op threads (one request at a time per worker), on the device
    IMGCLF_SERVE_DEVICE chooses (onnx_providers)."""

    def __init__(self, path: Path, threads: int, spin: bool = True, device: str = "auto"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin:  # idle threads sleep: other workers' threads need the cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers, reason = onnx_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # a corrupt or truncated file: ORT raises its own Fail/InvalidProtobuf types
            raise WeightsError(f"cannot load {path} with ONNX Runtime ({type(e).__name__}: {e}); {EXPORT_HINT}") \
                from None
        where = used_device(device, providers, self.session.get_providers(), reason)
        self.input = self.session.get_inputs()[0].name
        self.description = (f"ONNX Runtime {ort.__version__} ({path.name}) {where}, {threads} threads"
                            f"{'' if spin else ' (no spin-wait)'}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch})[0]


class TorchRunner:
    """The PyTorch model from model.safetensors: eval mode, channels_last, no gradients, optional bf16 autocast."""

    def __init__(self, model_dir: str | os.PathLike, settings: ServingSettings):
        try:
            import torch
        except ImportError:
            raise WeightsError(f"{Path(model_dir) / artifacts.ONNX_FILE} is missing, and this serving image has "
                               f"no PyTorch to run {artifacts.WEIGHTS_FILE}: {EXPORT_HINT}") from None
        from imgclf import devices

        threads = threads_per_worker(settings, torch.cuda.device_count())
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first parallel work; not worth failing over
            pass
        self.torch = torch
        self.device = torch.device("cpu") if settings.device == "cpu" else devices.default_device()
        if settings.device == "cuda" and self.device.type != "cuda":
            raise WeightsError("IMGCLF_SERVE_DEVICE=cuda, but PyTorch sees no CUDA GPU here: serve on a GPU "
                               "instance, or set IMGCLF_SERVE_DEVICE=auto or cpu")
        net, _ = artifacts.load_model(model_dir)
        self.net = net.to(self.device).to(memory_format=torch.channels_last).eval().requires_grad_(False)
        self.autocast = settings.dtype == "bfloat16"
        self.description = f"PyTorch {torch.__version__} {settings.dtype} on {self.device}, {threads} threads"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(batch).to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.net(x).float().cpu().numpy()


def load_runner(model_dir: str | os.PathLike, config: dict, settings: ServingSettings) -> OnnxRunner | TorchRunner:
    path = onnx_file(model_dir, config, settings.dtype)
    if path is None:
        return TorchRunner(model_dir, settings)
    if settings.dtype == "bfloat16":
        raise WeightsError("IMGCLF_SERVE_DTYPE=bfloat16 is PyTorch's autocast; this model is served from "
                           f"{artifacts.ONNX_FILE}: use float32 (exact) or int8")
    return OnnxRunner(path, *onnx_threads(settings), device=settings.device)

