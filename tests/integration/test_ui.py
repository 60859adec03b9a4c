"""The try-a-model page: `python -m imgclf.local serve --ui`, driven in headless Chromium (imgclf.ui.chromium).

One server for the module (the real `serve` entrypoint with the page's server in front of it) on the session's
trained model. A photo chosen in the page must show the same top-5 breeds that POST /invocations returns for it,
refused files must show the server's own message, and the page's server must relay /invocations unchanged.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import tomllib
from types import SimpleNamespace

import pytest
import requests
from imgclf import local
from imgclf.ui import chromium
from imgclf.ui import server as ui_server
from PIL import Image

from tests.conftest import REPO, SERVED_PAYLOAD_MB
from tests.photos import DOG

PAYLOAD_MB = SERVED_PAYLOAD_MB
VIEWPORT = (960, 560)
TOP_K_HEADER = {"X-Amzn-SageMaker-Custom-Attributes": "top_k=5"}


@pytest.fixture(scope="module")
def ui(served):
    """The page's URL and the model server's URL behind it: the session's shared server (tests/conftest.served),
    started with --ui and healthy through the page."""
    return SimpleNamespace(url=served.ui_url, model=served.url, log=served.log)


@pytest.fixture(scope="module")
def browser(ui, tmp_path_factory):
    with chromium.launch(tmp_path_factory.mktemp("chromium")) as tools:
        for domain in ("Runtime", "Log", "Network"):
            tools.send(f"{domain}.enable")
        tools.set_viewport(*VIEWPORT)
        tools.navigate(ui.url)
        tools.wait_until("document.getElementById('status').textContent === 'Model server ready'")
        yield tools


def invoke(url: str, body: bytes, content_type: str = "image/jpeg") -> requests.Response:
    return requests.post(f"{url.rstrip('/')}/invocations", data=body, timeout=120,
                         headers={"Content-Type": content_type, "Accept": "application/json", **TOP_K_HEADER})


SHOWN = """[...document.querySelectorAll('#predictions li')].map(li => ({
  label: li.dataset.label, probability: Number(li.dataset.probability),
  text: li.querySelector('.label').textContent, width: parseFloat(li.querySelector('.fill').style.width)}))"""
ERROR_SHOWN = "!document.getElementById('error').hidden && document.getElementById('error').textContent"


def stable(text: str | bytes) -> str:
    """Without object addresses (Pillow's messages name its BytesIO: `<_io.BytesIO object at 0x7f...>`)."""
    return re.sub(r" at 0x[0-9a-f]+", " at 0x...", text.decode() if isinstance(text, bytes) else text)


def choose(browser, path) -> None:
    """Choose a file as a user would; wait until the page shows the answer (breeds or an error)."""
    browser.evaluate("document.getElementById('pending').hidden = true; "
                     "document.getElementById('results').hidden = document.getElementById('error').hidden = true")
    browser.set_files("#file", [path])
    browser.wait_until("!document.getElementById('results').hidden || !document.getElementById('error').hidden",
                       timeout=120)


def test_page_is_served_beside_the_model_and_its_url_printed(ui):
    assert f"try the model in your browser: {ui.url}" in ui.log.read_text()
    response = requests.get(ui.url, timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    assert response.content == ui_server.page()
    text = response.text
    # offline: no script, style, font or image from anywhere but this page's origin
    assert "http://" not in text and "https://" not in text and " src=" not in text and "<link" not in text
    missing = requests.get(ui.url + "nothing", timeout=10)
    assert missing.status_code == 404 and "no such page" in missing.json()["message"]


def test_invocations_are_relayed_unchanged(ui):
    batch = json.dumps({"instances": [{"b64": base64.b64encode(DOG.read_bytes()).decode()}] * 2,
                        "top_k": 2}).encode()
    for body, content_type in [(DOG.read_bytes(), "image/jpeg"), (batch, "application/json"),
                               (b"not an image", "application/x-image"), (b"x", "text/plain"),
                               (b"\xff" * (3 * PAYLOAD_MB << 20), "image/jpeg")]:  # over twice the limit: MMS's 413
        direct, relayed = invoke(ui.model, body, content_type), invoke(ui.url, body, content_type)
        assert (relayed.status_code, stable(relayed.content)) == (direct.status_code, stable(direct.content))
        assert relayed.headers.get("Content-Type") == direct.headers.get("Content-Type")
    assert requests.get(ui.url + "invocations", timeout=10).status_code == 405


def test_a_chosen_photo_shows_the_top_5_of_invocations(ui, browser, tmp_path):
    expected = invoke(ui.model, DOG.read_bytes()).json()["predictions"][0]["top_k"]
    choose(browser, DOG)
    shown = browser.evaluate(SHOWN)
    assert len(shown) == len(expected) == 5
    assert shown[0]["label"] == expected[0]["label"]
    assert [s["label"] for s in shown] == [s["text"] for s in shown] == [e["label"] for e in expected]
    assert [s["probability"] for s in shown] == [e["probability"] for e in expected]
    for s in shown:  # bars as long as the probabilities (at least a sliver)
        assert s["width"] == pytest.approx(max(0.5, 100 * s["probability"]), abs=0.01)
    assert browser.evaluate("document.getElementById('filename').textContent").startswith(DOG.name)
    assert browser.evaluate("document.getElementById('preview').naturalWidth") == Image.open(DOG).width

    png = browser.screenshot(tmp_path / "try-a-model.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == VIEWPORT
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 200, "the screenshot is (nearly) blank"

    problems = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]
    assert not problems, problems
    requested = {e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent"}
    assert {ui.url, ui.url + "ping", ui.url + "invocations"} <= requested
    assert all(u.startswith((ui.url, "blob:", "data:")) for u in requested), requested


@pytest.mark.parametrize("name, body, status", [
    ("notes.txt", b"a shopping list, not a photo\n", 400),
    ("big.jpg", b"\xff\xd8" + b"\x00" * (PAYLOAD_MB << 20), 413),  # over SAGEMAKER_MAX_PAYLOAD_IN_MB
])
def test_a_refused_file_shows_the_servers_message(ui, browser, tmp_path, name, body, status):
    path = tmp_path / name
    path.write_bytes(body)
    answer = invoke(ui.model, body, "image/jpeg" if name.endswith(".jpg") else "application/x-image")
    assert answer.status_code == status
    message = answer.json()["message"]
    choose(browser, path)
    shown = browser.wait_until(ERROR_SHOWN)
    assert shown.startswith(f"Error {status}") and stable(message) in stable(shown), shown
    assert browser.evaluate("document.getElementById('results').hidden")


def test_ui_port_mistakes_are_reported_before_serving(tmp_path, capsys):
    model = tmp_path / "model.tar.gz"  # never read: the ports are checked first
    model.write_bytes(b"")
    model = str(model)
    assert local.main(["serve", "--model", model, "--port", "8080", "--ui", "--ui-port", "8080"]) == 2  # usage
    assert "error: --ui-port 8080: give a free port other than --port 8080" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert local.main(["serve", "--model", model, "--port", "8080", "--ui", "--ui-port", str(port)]) == 2
        assert f"--ui-port {port}: cannot serve the page there" in capsys.readouterr().err


def test_the_page_ships_with_the_package():
    """A wheel (the serving image installs one) takes non-Python files only as package data."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["imgclf"]
    page = (REPO / "code" / "imgclf" / "ui" / ui_server.PAGE).relative_to(REPO / "code" / "imgclf")
    assert any(page.match(g) for g in globs), globs
    assert ui_server.page().startswith(b"<!doctype html>")
