"""The profiler report of a real training run, loaded in headless Chromium (Debian's `chromium` package).

Chromium is driven through the DevTools protocol: the page must load from disk with no request other than
file:/data: URLs, no console error or exception, every section present with its plot or table, and every
embedded image decoded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import requests
import websocket
from imgclf.debugging import report

from tests.conftest import free_port

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-allow-origins=*"]


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium not found: apt-get install -y chromium (.ci/run installs it)"
    return path


class DevTools:
    """A minimal DevTools-protocol client: commands with ids, events kept in order."""

    def __init__(self, url: str):
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == method for e in self.events):
                return next(e for e in self.events if e.get("method") == method)
            self.events.append(json.loads(self.ws.recv()))
        raise AssertionError(f"no {method} within {timeout} s")


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    log = (tmp_path / "chromium.log").open("w")
    proc = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                             f"--remote-debugging-port={port}", "about:blank"], stdout=log, stderr=log)
    try:
        deadline, pages = time.monotonic() + 60, []
        while not pages and time.monotonic() < deadline:
            try:
                pages = [t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                         if t["type"] == "page"]
            except requests.ConnectionError:
                time.sleep(0.3)
        assert pages, f"chromium did not start: {(tmp_path / 'chromium.log').read_text()[-2000:]}"
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


CHECK_PAGE = """JSON.stringify({
  sections: Object.fromEntries([...document.querySelectorAll('section')].map(s => [s.id, {
    heading: s.querySelector('h2') ? s.querySelector('h2').textContent : null,
    images: s.querySelectorAll('img').length, tables: s.querySelectorAll('table').length}])),
  images: [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth})),
  rules: [...document.querySelectorAll('#rules tr')].length - 1,
})"""


def test_report_loads_in_chromium_with_every_section(browser, trained):
    out, _ = trained
    page = out / "reports" / "profiler-report.html"
    for domain in ("Page", "Runtime", "Log", "Network"):
        browser.send(f"{domain}.enable")
    browser.send("Page.navigate", url=page.resolve().as_uri())
    browser.wait_for("Page.loadEventFired")
    result = json.loads(browser.send("Runtime.evaluate", expression=CHECK_PAGE, returnByValue=True)["result"]["value"])

    errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    requested = [e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent"]
    assert requested and all(u.startswith(("file:", "data:")) for u in requested), requested

    assert list(result["sections"]) == list(report.SECTIONS)
    for key, title in report.SECTIONS.items():
        section = result["sections"][key]
        assert section["heading"] == title
        assert section["images"] + section["tables"] > 0, f"section {key} shows no plot or table: {section}"
    for key in ("training", "system", "steps"):
        assert result["sections"][key]["images"] == 1, key
    assert result["images"] and all(i["complete"] and i["width"] > 100 for i in result["images"]), result["images"]
    assert result["rules"] == 9


def test_report_is_self_contained(trained):
    out, _ = trained
    text = (out / "reports" / "profiler-report.html").read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert text.count('src="data:image/png;base64,') == 3
