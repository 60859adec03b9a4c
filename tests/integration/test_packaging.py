"""The package as users install it: `pip install .[serve]` into a fresh environment (no torch, no checkout) loads
model.onnx and answers requests through the serving code, and its console scripts run. The same request in this
(development) environment, which has torch, loads none of it. pyproject.toml's declarations themselves are
checked by tests/unit/test_packaging.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SERVE_A_REQUEST = """
import base64, io, json, sys
from PIL import Image
from imgclf.serving import handler_service, inference

def image(color, kind):
    buf = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(buf, kind)
    return buf.getvalue()

model = inference.model_fn(sys.argv[1])
raw = inference.output_fn(inference.predict_fn(inference.input_fn(image((200, 30, 10), "PNG"), "image/png",
                                                                  model.settings), model), "application/json")
colors = ((9, 9, 9), (0, 90, 250))
body = json.dumps({"instances": [{"b64": base64.b64encode(image(c, "JPEG")).decode()} for c in colors], "top_k": 2})
request = inference.input_fn(body, "application/json; charset=utf-8", model.settings)
batch = inference.output_fn(inference.predict_fn(request, model), "*/*")
status, handled = inference.handle_request(model, body.encode(), {"Content-Type": "application/json"})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "safetensors", "timm")
                or m.startswith(("imgclf.training", "imgclf.debugging")))
print(json.dumps({"runner": type(model.run).__name__, "raw": json.loads(raw), "batch": json.loads(batch),
                  "status": status, "handled": json.loads(handled), "loaded": loaded}))
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from imgclf import artifacts, export, models
    from imgclf.preprocessing import Preprocessing

    out = tmp_path_factory.mktemp("onnx-model")
    net, _ = models.build_model("squeezenet1_1", 3)  # small, random weights: no training run needed
    artifacts.save_model(out, net, {"architecture": "squeezenet1_1", "class_names": ["001.a", "002.b", "003.c"],
                                    **Preprocessing(32).to_config()})
    export.export(out)
    return out


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Path:
    """A fresh venv with `.[serve]` at the serving image's versions, installed by uv as docs/development.md says
    (with pip's index settings, as make install; seconds from uv's cache). The package is built from a copy of its
    sources: setuptools writes build/ into the tree it builds."""
    tmp = tmp_path_factory.mktemp("serve-venv")
    source = tmp / "src"
    shutil.copytree(REPO / "code", source / "code", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    uv, venv = str(Path(sys.executable).parent / "uv"), tmp / "venv"
    index = subprocess.run([sys.executable, "scripts/pip_index_args.py"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    install = subprocess.run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin/python"), *index,
                              f"{source}[serve]", "-c", str(REPO / "requirements/lock/serve-cpu.txt")],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    return venv


@pytest.mark.parametrize("where", ["a fresh .[serve] venv", "the development venv"])
def test_serving_a_request_loads_no_torch(where, model_dir, request):
    """The slim serving image has no torch: loading model.onnx and a full input_fn -> predict_fn -> output_fn (raw
    image and JSON with base64 images and top_k), in a fresh interpreter, need and load no torch, training or
    debugging module: from the installed package alone, and in the development environment from the checkout."""
    if where == "the development venv":
        python, env = sys.executable, {"PYTHONPATH": str(REPO / "code"), "PATH": ""}
    else:
        python, env = str(request.getfixturevalue("serve_venv") / "bin/python"), {"PATH": ""}
    result = subprocess.run([python, "-c", SERVE_A_REQUEST, str(model_dir)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=model_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["runner"] == "OnnxRunner", report
    assert [len(p["top_k"]) for p in report["raw"]["predictions"]] == [3], report
    assert [len(p["top_k"]) for p in report["batch"]["predictions"]] == [2, 2], report
    assert report["status"] == 200 and report["handled"] == report["batch"], report
    assert {e["label"] for e in report["raw"]["predictions"][0]["top_k"]} == {"a", "b", "c"}
    assert report["loaded"] == [], report["loaded"]


def test_the_serve_extra_has_no_torch_and_its_console_scripts_run(serve_venv):
    python = str(serve_venv / "bin/python")
    code = "import importlib.util as u, imgclf; print(u.find_spec('torch') is None, imgclf.__file__)"
    found = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, env={"PATH": ""})
    no_torch, package = found.stdout.split()
    assert no_torch == "True" and package.startswith(str(serve_venv)), found.stdout + found.stderr
    for name in ("serve", "imgclf-serve", "imgclf-predict", "imgclf-local"):
        helped = subprocess.run([str(serve_venv / "bin" / name), "--help"], capture_output=True, text=True,
                                timeout=60, env={"PATH": ""})
        assert helped.returncode == 0 and "usage:" in helped.stdout, f"{name}: {helped.stdout}{helped.stderr}"
