"""A multi-model endpoint through the real `serve` entrypoint (SAGEMAKER_MULTI_MODEL=true): SageMaker's container
calls over HTTP on 127.0.0.1, as SageMaker's model loader sends them (the SDK's local mode has no multi-model
hosting). One server for the module, `python -m imgclf.local serve --models STORE`, at most 2 models at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import requests
from imgclf import local

from tests.conftest import REPO
from tests.photos import DOG

pytestmark = pytest.mark.long  # scheduled first: see tests/conftest.py

RENAMED = ["101.Alpha", "102.Bravo", "103.Charlie", "104.Delta", "105.Echo"]


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    """The model store: a = the session's trained model; b = the same graph with other class names; c = a
    copy; bad = a folder whose config.json is not a training output; huge and more_names = config.json files that
    do not fit the graph (an image size that would exhaust memory, more class names than outputs)."""
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(trained[0] / "model", root / "a")
    shutil.copytree(trained[0] / "model", root / "b")
    config = json.loads((root / "b/config.json").read_text())
    assert len(config["class_names"]) == len(RENAMED)
    (root / "b/config.json").write_text(json.dumps({**config, "class_names": RENAMED}))
    shutil.copytree(trained[0] / "model", root / "c")
    (root / "bad").mkdir()
    (root / "bad/config.json").write_text('{"architecture": "resnet18"}')
    for name, change in (("huge", {"image_size": 100_000}), ("more_names", {"class_names": RENAMED + ["106.Fox"]})):
        shutil.copytree(trained[0] / "model", root / name)  # serving would size its buffers from image_size
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
    return root


@pytest.fixture(scope="module")
def endpoint(store, tmp_path_factory):
    with local.serving(store, multi_model=True, workers=1, env={"IMGCLF_MAX_MODELS": "2"},
                       log=tmp_path_factory.mktemp("mme") / "server.log") as server:
        yield server.url
        assert not server.stop(), "server processes survived SIGTERM"


def load(url: str, name: str, folder: str) -> requests.Response:
    return requests.post(f"{url}/models", json={"model_name": name, "url": folder}, timeout=300)


def invoke(url: str, name: str) -> requests.Response:
    return requests.post(f"{url}/models/{requests.utils.quote(name, safe='')}/invoke", data=DOG.read_bytes(),
                         timeout=120, headers={"Content-Type": "image/jpeg",
                                               "X-Amzn-SageMaker-Target-Model": f"{name}.tar.gz"})


def classes(response: requests.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["class_name"] for item in response.json()["predictions"][0]["top_k"]]


def test_multi_model_endpoint_loads_invokes_and_unloads(endpoint, store, trained):
    url = endpoint
    assert requests.get(f"{url}/ping", timeout=10).status_code == 200  # healthy with no model loaded
    assert requests.get(f"{url}/models", timeout=10).json() == {"models": []}
    invoked = invoke(url, "a")
    assert invoked.status_code == 404 and "not loaded" in invoked.json()["message"]

    # Two models, one with a name as SageMaker may send it (any characters), each with its own classes.
    assert load(url, "a", str(store / "a")).status_code == 200
    assert load(url, "b/model.tar.gz", "b").status_code == 200  # a url relative to the store
    listed = requests.get(f"{url}/models", timeout=10).json()["models"]
    assert sorted(m["modelName"] for m in listed) == ["a", "b/model.tar.gz"]
    own = json.loads((trained[0] / "model/config.json").read_text())["class_names"]
    got_a, got_b = classes(invoke(url, "a")), classes(invoke(url, "b/model.tar.gz"))
    assert set(got_a) <= set(own) and set(got_b) <= set(RENAMED)
    assert [own.index(c) for c in got_a] == [RENAMED.index(c) for c in got_b]  # the same graph
    described = requests.get(f"{url}/models/a", timeout=10).json()
    assert described == {"modelName": "a", "modelUrl": str((store / "a").resolve())}

    again = load(url, "a", "a")
    assert again.status_code == 409 and "already loaded" in again.json()["message"]
    full = load(url, "c", "c")  # IMGCLF_MAX_MODELS=2: SageMaker unloads its least recently used, then retries
    assert full.status_code == 507 and "IMGCLF_MAX_MODELS" in full.json()["message"]

    # Unload: then 404 for it, while the other keeps serving; the freed place takes another model.
    assert requests.delete(f"{url}/models/a", timeout=60).status_code == 200
    assert invoke(url, "a").status_code == 404
    assert requests.get(f"{url}/models/a", timeout=10).status_code == 404
    assert requests.delete(f"{url}/models/a", timeout=60).status_code == 404
    assert classes(invoke(url, "b/model.tar.gz"))[0] == got_b[0]
    assert load(url, "c", "c").status_code == 200
    assert classes(invoke(url, "c")) == got_a
    # predict.py's --url takes a model's invoke path as its URL.
    predict = [sys.executable, str(REPO / "scripts/predict.py"), str(DOG), "--url", f"{url}/models/c/invoke"]
    cli = subprocess.run(predict, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and got_a[0] in cli.stdout, cli.stderr


def unload_all(url: str) -> None:
    for model in requests.get(f"{url}/models", timeout=10).json()["models"]:
        name = requests.utils.quote(model["modelName"], safe="")
        assert requests.delete(f"{url}/models/{name}", timeout=60).status_code == 200


def test_a_model_that_cannot_load_is_refused_with_the_reason(endpoint, store):
    url = endpoint
    unload_all(url)  # room for it: a full endpoint answers 507 first
    bad = load(url, "bad", "bad")
    assert bad.status_code == 400, bad.text
    assert bad.json()["code"] == 400 and "config.json lacks" in bad.json()["message"]
    assert "bad" not in [m["modelName"] for m in requests.get(f"{url}/models", timeout=10).json()["models"]]
    for body, said in ((b"not json", "not JSON"), (json.dumps({"model_name": "x"}).encode(), "model_name"),
                       (json.dumps({"model_name": "x", "url": "/etc"}).encode(), "outside the model store"),
                       (json.dumps({"model_name": "x", "url": "../.."}).encode(), "outside the model store")):
        refused = requests.post(f"{url}/models", data=body, timeout=30, headers={"Content-Type": "application/json"})
        assert refused.status_code == 400 and said in refused.json()["message"], refused.text
    missing = load(url, "x", "nowhere")
    assert missing.status_code == 404 and "no such folder" in missing.json()["message"]
    for folder, said in (("huge", "image_size 100000 is not a side of 16-1024 pixels"),
                         ("more_names", "config.json lists 6 class_names")):
        refused = load(url, folder, folder)
        assert refused.status_code == 400 and said in refused.json()["message"], refused.text


def test_only_sagemakers_multi_model_calls_are_answered(endpoint):
    """The single-model path and MMS's own APIs (registration from any folder, scaling) are not on the port."""
    url = endpoint
    for method, path, status in (("POST", "/invocations", 404), ("GET", "/predictions/a", 404),
                                 ("PUT", "/models/a", 405), ("POST", "/models/a", 405),
                                 ("GET", "/models/a/b/c", 404), ("GET", "/api-description", 404)):
        response = requests.request(method, f"{url}{path}", data=b"x", timeout=30)
        assert response.status_code == status, (method, path, response.text)
        assert response.json()["code"] == status
