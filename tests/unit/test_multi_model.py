"""The multi-model endpoint's calls (imgclf.serving.multi_model) that are answered before multi-model-server is
asked: request checks, the model store boundary, the 507s, listing pages. Loading for real, through the `serve`
entrypoint and MMS, is tests/integration/test_multi_model.py."""

from __future__ import annotations

import json

import pytest
from imgclf.serving.multi_model import PAGE_SIZE, Loaded, Models, mms_name
from imgclf.serving.settings import ServingSettings, SettingsError


def models(tmp_path, checked: list | None = None, **settings) -> Models:
    (tmp_path / "store/a").mkdir(parents=True)
    (tmp_path / "store/a/model.onnx").write_bytes(b"0" * 1000)

    def check(folder, _settings):
        (checked if checked is not None else []).append(folder)
        return "the model cannot be served: broken" if folder.name == "broken" else None
    return Models(tmp_path / "store", tmp_path / "stand_ins", management_port=1,
                  settings=ServingSettings(**settings), check=check)


def load(m: Models, name, url) -> tuple[int, dict]:
    return m.answer("POST", "/models", json.dumps({"model_name": name, "url": url}).encode())


def test_load_requests_are_checked_before_anything_is_loaded(tmp_path):
    m = models(tmp_path)
    assert m.answer("POST", "/models", b"{not json")[0] == 400
    for body in ({"model_name": "a"}, {"url": "a"}, {"model_name": "", "url": "a"}, {"model_name": "a\n", "url": "a"},
                 {"model_name": 3, "url": "a"}, ["a", "a"]):
        status, payload = m.answer("POST", "/models", json.dumps(body).encode())
        assert status == 400 and "model_name" in payload["message"], body
    for url in ("/etc", "../..", str(tmp_path)):
        status, payload = load(m, "x", url)
        assert (status, payload["code"]) == (400, 400) and "outside the model store" in payload["message"]
    assert load(m, "x", "nowhere")[0] == 404
    deep = b'{"model_name": "x", "url": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert m.answer("POST", "/models", deep)[0] == 400
    status, payload = load(m, "x", "a\x00b")
    assert status == 400 and "control characters" in payload["message"]
    (tmp_path / "outside.onnx").write_bytes(b"0")
    (m.store / "linked").mkdir()
    (m.store / "linked/model.onnx").symlink_to(tmp_path / "outside.onnx")
    status, payload = load(m, "x", "linked")
    assert status == 400 and "model.onnx links outside the model folder" in payload["message"]


def test_a_full_endpoint_answers_507_so_that_sagemaker_unloads_a_model(tmp_path):
    checked: list = []
    status, payload = load(models(tmp_path, checked, min_free_memory_mb=10**9), "a", "a")
    assert status == 507 and "MB of memory free" in payload["message"] and not checked
    full = models(tmp_path / "2", checked, max_models=1)
    full._models["b"] = Loaded("b", "b", mms_name("b"))
    status, payload = load(full, "a", "a")
    assert status == 507 and "IMGCLF_MAX_MODELS" in payload["message"] and not checked
    assert load(full, "b", "a")[0] == 409  # already loaded comes first


def test_a_model_that_does_not_load_is_never_registered(tmp_path):
    m = models(tmp_path)
    (m.store / "broken").mkdir()
    status, payload = load(m, "x", "broken")
    assert status == 400 and payload["message"] == "the model cannot be served: broken"
    assert m.answer("GET", "/models", b"") == (200, {"models": []})
    assert not (tmp_path / "stand_ins").exists()


def test_listing_pages_and_unknown_models(tmp_path):
    m = models(tmp_path)
    names = [f"site-{i:03d}/model.tar.gz" for i in range(PAGE_SIZE + 5)]
    m._models = {n: Loaded(n, f"/opt/ml/models/{i}", mms_name(n)) for i, n in enumerate(names)}
    status, first = m.answer("GET", "/models", b"")
    assert status == 200 and len(first["models"]) == PAGE_SIZE and first["nextPageToken"]
    _, rest = m.answer("GET", f"/models?next_page_token={first['nextPageToken']}", b"")
    assert [x["modelName"] for x in first["models"] + rest["models"]] == names and "nextPageToken" not in rest
    for token in ("\u00b2", "9" * 5000, "-1", "abc"):  # only the tokens this server hands out
        status, payload = m.answer("GET", f"/models?next_page_token={token}", b"")
        assert status == 400 and "next_page_token" in payload["message"], token
    quoted = "/models/site-001%2Fmodel.tar.gz"
    assert m.answer("GET", quoted, b"") == (200, {"modelName": names[1], "modelUrl": "/opt/ml/models/1"})
    assert m.invoke_path(names[1]) == f"/predictions/{mms_name(names[1])}" and m.invoke_path("nope") is None
    assert m.answer("GET", "/models/nope", b"")[0] == 404 and m.answer("DELETE", "/models/nope", b"")[0] == 404
    assert len({mms_name(n) for n in names}) == len(names) and all(mms_name(n).isalnum() for n in names)


def test_multi_model_settings():
    env = {"SAGEMAKER_MULTI_MODEL": "true", "IMGCLF_MAX_MODELS": "20", "IMGCLF_MIN_FREE_MEMORY_MB": "256"}
    settings = ServingSettings.from_environment(env)
    assert (settings.multi_model, settings.max_models, settings.min_free_memory_mb) == (True, 20, 256)
    assert not ServingSettings.from_environment({}).multi_model
    with pytest.raises(SettingsError, match="SAGEMAKER_MULTI_MODEL='maybe': use true or false"):
        ServingSettings.from_environment({"SAGEMAKER_MULTI_MODEL": "maybe"})
    assert ServingSettings.load(ServingSettings(multi_model=True).for_workers()).multi_model


def test_a_model_the_model_server_does_not_unload_stays_listed(tmp_path):
    """DELETE while MMS does not answer (nothing listens on the management port): 503, and the model stays."""
    m = models(tmp_path)
    m._models["a"] = Loaded("a", "/opt/ml/models/a", mms_name("a"))
    status, payload = m.answer("DELETE", "/models/a", b"")
    assert status == 503 and "not answering" in payload["message"]
    assert m.answer("GET", "/models/a", b"")[0] == 200 and m.invoke_path("a")
