"""The GPU serving image (make build-serve-gpu), built and run for real on a machine without a GPU.

It is the serving image on the GPU lock (onnxruntime-gpu 1.31.1 with its CUDA 13 and cuDNN 9 wheels). Here no GPU
and no NVIDIA driver are visible, so: with IMGCLF_SERVE_DEVICE unset (auto) it serves on the CPU and says why;
with IMGCLF_SERVE_DEVICE=cuda it refuses to serve (/ping 503, the reason in JSON); and the CUDA execution provider's
libraries are all in the image: every one resolves but the driver's libcuda.so.1, which the host brings. The GPU
path itself needs a GPU host (scripts/bench/gpu.py). Only under `make test-images` (IMGCLF_IMAGE_TESTS=1); the
model is the session's one train-cpu run (conftest.py's trained_tree), its containers run detached.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from tests.conftest import free_port
from tests.images.conftest import engine, image, require_image_tests, run_detached, wait_healthy
from tests.photos import DOG
from tests.servers import verdict

pytestmark = pytest.mark.images
require_image_tests()
IMAGE = "serve-gpu"
SITE = "/opt/venv/lib/python3.11/site-packages"


def logs_of(name: str) -> str:
    logs = engine("logs", name, check=False)
    return logs.stdout + logs.stderr


@pytest.fixture(scope="module")
def auto_server(trained_tree):
    """The GPU serving image on the trained model, IMGCLF_SERVE_DEVICE unset (auto), as the CPU image's server
    runs: the model mounted read-only, 2 GB of memory."""
    tree, status, _ = trained_tree
    assert status == 0, "training failed; see test_train_cpu_writes_the_model"
    port = free_port()
    name = run_detached(image(IMAGE), "serve", options=(
        "-p", f"127.0.0.1:{port}:8080", "-v", f"{tree / 'model'}:/opt/ml/model:ro", "--memory", "2g"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, name)
        yield url, name, tree
    finally:
        engine("rm", "-f", name, check=False)


def test_gpu_serving_image_without_a_gpu_serves_on_the_cpu_and_says_why(auto_server):
    url, name, tree = auto_server
    assert requests.get(f"{url}/ping", timeout=30).status_code == 200
    response = requests.post(f"{url}/invocations", data=DOG.read_bytes(), timeout=120,
                             headers={"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=3"})
    assert response.status_code == 200, response.text
    top = response.json()["predictions"][0]["top_k"]
    classes = json.loads((tree / "model" / "config.json").read_text())["class_names"]
    assert len(top) == 3 and {p["class_name"] for p in top} <= set(classes), top
    assert all(0 <= p["probability"] <= 1 for p in top) and sum(p["probability"] for p in top) <= 1 + 1e-4, top
    logs = logs_of(name)
    # The model's load line says where it runs and why not on the GPU: no CUDA, no NVIDIA driver (libcuda.so.1).
    where = [line for line in logs.splitlines() if "on the CPU" in line]
    assert where, logs[-4000:]
    assert all(re.search(r"cuda|nvidia", line.split("on the CPU", 1)[1], re.I) for line in where), where
    labels = json.loads(engine("image", "inspect", image(IMAGE)).stdout)[0]["Config"]["Labels"]
    assert "(GPU)" in labels["org.opencontainers.image.description"], labels
    assert labels["org.opencontainers.image.title"] == "imgclf-serve-gpu"
    assert labels["com.amazonaws.sagemaker.capabilities.multi-models"] == "true"


def test_gpu_serving_image_asked_for_cuda_without_a_gpu_answers_503(trained_tree):
    """IMGCLF_SERVE_DEVICE=cuda is a promise the endpoint runs on the GPU: without one it does not serve at all."""
    tree, status, _ = trained_tree
    assert status == 0, "training failed; see test_train_cpu_writes_the_model"
    port = free_port()
    name = run_detached(image(IMAGE), "serve", options=(
        "-p", f"127.0.0.1:{port}:8080", "-v", f"{tree / 'model'}:/opt/ml/model:ro", "--memory", "2g",
        "-e", "IMGCLF_SERVE_DEVICE=cuda"))
    try:
        deadline = time.monotonic() + 240
        while (response := verdict(f"http://127.0.0.1:{port}", timeout=10)) is None:
            assert time.monotonic() < deadline, f"no /ping answer in 240 s:\n{logs_of(name)[-4000:]}"
        assert response.status_code == 503, (response.status_code, response.text, logs_of(name)[-4000:])
        assert "IMGCLF_SERVE_DEVICE=cuda" in response.json()["message"], response.text
    finally:
        engine("rm", "-f", name, check=False)


# Run inside the image: what ONNX Runtime offers, then the CUDA provider library loaded as the runtime loads it
# (ort.preload_dlls() first: the CUDA and cuDNN libraries from the nvidia-* wheels), then ldd over every library
# of ONNX Runtime and the nvidia-* wheels with those wheels' folders on the search path.
PROBE = f"""
import contextlib, ctypes, glob, io, json, os, subprocess
import onnxruntime as ort
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    ort.preload_dlls()
capi = os.path.join(os.path.dirname(ort.__file__), "capi")
try:
    ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_cuda.so"))
    error = None
except OSError as e:
    error = str(e)
loaded = sorted({{line.split()[-1] for line in open("/proc/self/maps") if "/nvidia/" in line}})
env = {{**os.environ, "LD_LIBRARY_PATH": ":".join(glob.glob("{SITE}/nvidia/*/lib"))}}
libraries = [p for p in glob.glob(capi + "/*.so*") + glob.glob("{SITE}/nvidia/*/lib/*.so*")
             if "tensorrt" not in p]  # TensorRT's provider needs TensorRT, which the image does not carry
unresolved = {{}}
for path in libraries:
    out = subprocess.run(["ldd", path], capture_output=True, text=True, env=env).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if missing:
        unresolved[os.path.basename(path)] = missing
print(json.dumps({{"version": ort.__version__, "providers": ort.get_available_providers(),
                  "preload_printed": printed.getvalue(), "cdll_error": error, "loaded": loaded,
                  "libraries": len(libraries), "unresolved": unresolved}}))
"""


def test_gpu_serving_image_carries_every_library_the_cuda_provider_needs(images):
    out = engine("run", "--rm", "--entrypoint", "python", image(IMAGE), "-c", PROBE).stdout
    found = json.loads(out.strip().splitlines()[-1])
    assert found["version"] == "1.31.1", found
    assert found["providers"][-2:] == ["CUDAExecutionProvider", "CPUExecutionProvider"], found
    assert found["preload_printed"] == "", found  # it prints "Failed to load ..." for each library it cannot load
    loaded = {path.rsplit("/", 1)[-1] for path in found["loaded"]}
    for library in ("libcublasLt.so.13", "libcublas.so.13", "libcudart.so.13", "libcurand.so.10", "libcufft.so.12",
                    "libnvrtc.so.13", "libcudnn.so.9"):
        assert library in loaded, found
    assert all(path.startswith(f"{SITE}/nvidia/") for path in found["loaded"]), found
    # The provider's own dependencies all resolved but the driver's (the loader names the first one it cannot find,
    # and libcuda.so.1 comes after cuBLAS, cuRAND and the CUDA runtime in its list): the host brings that one.
    assert found["cdll_error"] is not None and found["cdll_error"].startswith("libcuda.so.1:"), found
    assert found["libraries"] > 20, found
    assert found["unresolved"] == {"libonnxruntime_providers_cuda.so": ["libcuda.so.1"]}, found
