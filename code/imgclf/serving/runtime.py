"""What runs the network in a serving worker: ONNX Runtime on the exported graph, or PyTorch on the weights.

    model.onnx present (written by training, or `python -m imgclf.export MODEL_DIR`) -> OnnxRunner
    otherwise (models trained before the export existed)                            -> TorchRunner

The device (IMGCLF_SERVE_DEVICE): `auto` runs on a GPU when the runtime can use one (ONNX Runtime's CUDA execution
provider, in onnxruntime-gpu: the serve-gpu image; PyTorch's CUDA), else on the CPU, and logs which and why (no
driver in the container, no GPU, a driver older than the CUDA of the image's libraries); `cuda` refuses to load
without one, so /ping answers 503 with the reason instead of a paid GPU idling; `cpu` never uses one. Each
multi-model-server worker runs on the GPU MMS gave it (`gpu_id`, round robin over the GPUs).

Both take the float32 (N, 3, H, W) batch that imgclf.preprocessing made and return float32 logits (N, classes),
so the request handling around them is the same. torch is imported only by TorchRunner: the slim serving image,
which has no torch, serves exported models and says how to export the others.
"""

from __future__ import annotations

import ctypes
import logging
import os
from importlib import metadata
from pathlib import Path

import numpy as np

from imgclf import artifacts, instances
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
LIBCUDA = "libcuda.so.1"  # the NVIDIA driver's CUDA library: the container runtime mounts it with the GPUs
# The CUDA runtime onnxruntime-gpu's libraries come from (their major version is the CUDA the driver must support).
CUDA_RUNTIME_DISTRIBUTIONS = ("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu12")


def cuda_version_text(version: int) -> str:
    """CUDA's integer form -> text: 12040 -> '12.4'."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_cuda() -> tuple[int | None, int, str | None]:
    """(the CUDA version the NVIDIA driver supports, as 12040 for 12.4; the GPUs it sees; why it sees none), asked of
    the driver's own library, so that the answer holds before any CUDA library of ours is loaded."""
    try:
        lib = ctypes.CDLL(LIBCUDA)
    except OSError:
        return None, 0, (f"no NVIDIA driver in this container ({LIBCUDA} not found): run it on a GPU instance with the "
                         "GPUs passed through (SageMaker does; docker run --gpus all)")
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDriverGetVersion(ctypes.byref(version))
    status = lib.cuInit(0)
    if status != 0:
        return version.value or None, 0, f"the NVIDIA driver cannot start CUDA (cuInit error {status}: no GPU visible)"
    lib.cuDeviceGetCount(ctypes.byref(count))
    return version.value, count.value, None if count.value else "the NVIDIA driver sees no GPU"


def needed_cuda() -> int | None:
    """The CUDA major version (as 13000) of the CUDA runtime installed beside onnxruntime-gpu; None without one."""
    for name in CUDA_RUNTIME_DISTRIBUTIONS:
        try:
            return int(metadata.version(name).split(".")[0]) * 1000
        except (metadata.PackageNotFoundError, ValueError):
            continue
    return None


def cuda_problem(driver: tuple[int | None, int, str | None], needed: int | None) -> str | None:
    """Why CUDA cannot run here (driver_cuda()'s answer, and the CUDA the libraries need), or None. A driver runs
    every CUDA of its major version and older (minor version compatibility), so only the major is compared."""
    version, _, why = driver
    if why:
        return why
    if needed and version and version // 1000 < needed // 1000:
        return (f"the NVIDIA driver supports CUDA {cuda_version_text(version)}, older than the CUDA "
                f"{cuda_version_text(needed)} of this image's ONNX Runtime (driver R{instances.SERVE_GPU_DRIVER} or "
                f"newer): on SageMaker, deploy with InferenceAmiVersion {instances.SERVE_GPU_AMI} (deploy.py sets it "
                "for GPU instance types)")
    return None


def onnx_providers(device: str, available: list[str], problem: str | None = None,
                   gpu_id: int = 0) -> tuple[list, str]:
    """(the execution providers to ask ONNX Runtime for, in order, why) for IMGCLF_SERVE_DEVICE `device`, given the
    providers this ONNX Runtime build has and why CUDA cannot run here (cuda_problem; None: it can); WeightsError
    when `cuda` is asked for and cannot be had."""
    if device == "cpu":
        return [CPU_PROVIDER], "IMGCLF_SERVE_DEVICE=cpu"
    if CUDA_PROVIDER not in available:
        why = f"this ONNX Runtime has no CUDA execution provider (it has {', '.join(available)}: the CPU build)"
        hint = "serve with the serve-gpu image (onnxruntime-gpu) on a GPU instance"
    elif problem:
        why, hint = problem, "serve on a GPU instance"
    else:
        return ([(CUDA_PROVIDER, {"device_id": gpu_id}), CPU_PROVIDER],
                f"IMGCLF_SERVE_DEVICE={device}, GPU {gpu_id}")
    if device == "cuda":
        raise WeightsError(f"IMGCLF_SERVE_DEVICE=cuda, but {why}: {hint}, or set IMGCLF_SERVE_DEVICE=auto or cpu")
    return [CPU_PROVIDER], why


def provider_names(providers: list) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def used_device(device: str, asked: list, used: list[str], reason: str) -> str:
    """What the session runs on, and why, for the log; WeightsError when `cuda` was demanded and ONNX Runtime
    fell back to the CPU all the same (a CUDA library missing or broken: its own log says which)."""
    if CUDA_PROVIDER in used:
        return f"on the GPU ({reason})"
    if CUDA_PROVIDER in provider_names(asked):
        if device == "cuda":
            raise WeightsError("IMGCLF_SERVE_DEVICE=cuda, but ONNX Runtime could not start its CUDA execution "
                               "provider (its log above says why)")
        return "on the CPU (ONNX Runtime could not start CUDA: its log above says why)"
    return f"on the CPU ({reason})"


def usable_gpus(settings: ServingSettings) -> int:
    """The GPUs an exported model would run on here, 0 when it would run on the CPU (serve's batching and worker
    defaults follow it)."""
    if settings.device == "cpu":
        return 0
    try:
        import onnxruntime as ort
    except ImportError:
        return 0
    if CUDA_PROVIDER not in ort.get_available_providers():
        return 0
    driver = driver_cuda()
    return 0 if cuda_problem(driver, needed_cuda()) else driver[1]


class OnnxRunner:
    """An ONNX Runtime session with `threads` intra-op threads (one batch at a time per worker), on the device
    IMGCLF_SERVE_DEVICE chooses (onnx_providers): GPU `gpu_id` when it is a GPU."""

    def __init__(self, path: Path, threads: int, spin: bool = True, device: str = "auto", gpu_id: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin:  # idle threads sleep: other workers' threads need the cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        problem = (cuda_problem(driver_cuda(), needed_cuda())
                   if device != "cpu" and CUDA_PROVIDER in available else None)
        providers, reason = onnx_providers(device, available, problem, gpu_id)
        if CUDA_PROVIDER in provider_names(providers) and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* packages beside onnxruntime-gpu
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # a corrupt or truncated file: ORT raises its own Fail/InvalidProtobuf types
            raise WeightsError(f"cannot load {path} with ONNX Runtime ({type(e).__name__}: {e}); {EXPORT_HINT}") \
                from None
        where = used_device(device, providers, self.session.get_providers(), reason)
        self.on_gpu = where.startswith("on the GPU")
        self.input = self.session.get_inputs()[0].name
        self.description = (f"ONNX Runtime {ort.__version__} ({path.name}) {where}, {threads} threads"
                            f"{'' if spin else ' (no spin-wait)'}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: batch})[0]


class TorchRunner:
    """The PyTorch model from model.safetensors: eval mode, channels_last, no gradients, optional bf16 autocast."""

    def __init__(self, model_dir: str | os.PathLike, settings: ServingSettings, gpu_id: int = 0):
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
        if self.device.type == "cuda":
            self.device = torch.device("cuda", gpu_id)
        self.on_gpu = self.device.type == "cuda"
        if settings.device == "cuda" and not self.on_gpu:
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


def load_runner(model_dir: str | os.PathLike, config: dict, settings: ServingSettings,
                gpu_id: int = 0) -> OnnxRunner | TorchRunner:
    """What runs the model on GPU `gpu_id` (multi-model-server's for this worker), when it runs on a GPU."""
    path = onnx_file(model_dir, config, settings.dtype)
    if path is None:
        return TorchRunner(model_dir, settings, gpu_id)
    if settings.dtype == "bfloat16":
        raise WeightsError("IMGCLF_SERVE_DTYPE=bfloat16 is PyTorch's autocast; this model is served from "
                           f"{artifacts.ONNX_FILE}: use float32 (exact) or int8")
    return OnnxRunner(path, *onnx_threads(settings), device=settings.device, gpu_id=gpu_id)

