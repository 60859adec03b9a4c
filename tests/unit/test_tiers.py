"""The unit tier's guard (tests/unit/conftest.py) and the tier markers (tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


def test_a_unit_test_cannot_start_a_process():
    with pytest.raises(AssertionError, match="starts a process.*move the test to tests/integration"):
        subprocess.run(["true"])
    with pytest.raises(AssertionError, match="it forks"):
        os.fork()


def test_a_unit_test_reaches_loopback_only():
    with pytest.raises(AssertionError, match=r"connects to \('192.0.2.1', 80\)"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Hello) as server:  # a loopback test double is fine
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with socket.create_connection(server.server_address, timeout=5) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert conn.recv(64).startswith(b"HTTP/1.0 204")
        server.shutdown()


def test_the_tier_is_the_folder(request):
    assert request.node.get_closest_marker("unit") and not request.node.get_closest_marker("integration")


@pytest.fixture(scope="module")
def started_process():
    return subprocess.run(["true"])


def test_a_module_fixture_cannot_start_a_process_either(request):
    with pytest.raises(AssertionError, match="starts a process"):
        request.getfixturevalue("started_process")
