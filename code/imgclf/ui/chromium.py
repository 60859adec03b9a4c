"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol.

What the browser tests (tests/integration/test_report.py, tests/integration/test_ui.py) and the screenshot scripts
(scripts/report_screenshot.py, scripts/ui_screenshot.py) share: the flags, starting a browser with a new empty
profile, and a minimal protocol client. Host-side only; needs the `websocket-client` package
(requirements/dev.txt), imported when a browser is launched.

    with chromium.launch(tmp_dir) as browser:
        browser.navigate("http://127.0.0.1:8081/")
        browser.wait_until("document.querySelectorAll('li').length == 5")
        browser.screenshot(Path("page.png"))
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

# Root in a container needs --no-sandbox; the rest keeps Chromium from reaching the network on its own.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
START_TIMEOUT = 60.0


def executable() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise FileNotFoundError("chromium not found: apt-get install -y chromium")
    return path


class DevTools:
    """A minimal DevTools-protocol client for one page: commands with ids, events kept in order."""

    def __init__(self, url: str, timeout: float = 60):
        import websocket  # websocket-client (requirements/dev.txt)

        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        """The first event named `method` (already received or the next ones)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((e for e in self.events if e.get("method") == method), None)
            if found:
                return found
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (awaited if it is a promise); exceptions raise."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 60, interval: float = 0.2):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(interval)
        raise TimeoutError(f"{expression!r} still false after {timeout} s")

    def navigate(self, url: str, timeout: float = 60) -> None:
        self.send("Page.enable")
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", timeout)

    def set_viewport(self, width: int, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an <input type=file> as a user would (the page gets its `change` event)."""
        root = self.send("DOM.getDocument")["root"]["nodeId"]
        node = self.send("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        if not node:
            raise RuntimeError(f"no element {selector!r} on the page")
        self.send("DOM.setFileInputFiles", nodeId=node, files=[str(Path(p).resolve()) for p in paths])

    def screenshot(self, png: Path) -> Path:
        """The viewport as a PNG file."""
        data = self.send("Page.captureScreenshot", format="png")["data"]
        png.write_bytes(base64.b64decode(data))
        return png

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def launch(workdir: Path, extra_flags: list[str] | None = None) -> Iterator[DevTools]:
    """Start headless Chromium with a new empty profile under `workdir` (its log beside it) and yield a client for
    its one page; the browser is stopped afterwards."""
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "chromium.log"
    with log_path.open("w") as log:
        # port 0: Chromium picks a free port and writes it to DevToolsActivePort in the profile
        proc = subprocess.Popen([executable(), *FLAGS, *(extra_flags or []), f"--user-data-dir={profile}",
                                 "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"],
                                stdout=log, stderr=log)
    try:
        tools = DevTools(_page_websocket(proc, profile / "DevToolsActivePort", log_path))
        try:
            yield tools
        finally:
            tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _page_websocket(proc: subprocess.Popen, port_file: Path, log_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if port_file.is_file() and (lines := port_file.read_text().split()):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{lines[0]}/json/list", timeout=5) as response:
                    pages = [t for t in json.load(response) if t["type"] == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except (urllib.error.URLError, ConnectionError, ValueError):
                pass
        time.sleep(0.2)
    raise RuntimeError(f"chromium did not start (exit {proc.poll()}): {log_path.read_text()[-2000:]}")
