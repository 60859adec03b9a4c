"""imgclf.local's one recipe for starting a server and waiting for /ping: how it fails is what a user reads."""

from __future__ import annotations

import sys

import pytest
from imgclf import local
from imgclf.processes import free_port


def test_a_server_that_exits_fails_at_once_with_its_code_and_log(tmp_path):
    cmd = [sys.executable, "-c", "print('cannot bind: port taken', flush=True); raise SystemExit(3)"]
    with pytest.raises(local.ServerFailed, match=r"(?s)the server exited with 3; its log .* ends:\n"
                                                  r"cannot bind: port taken"):
        with local.server_process(cmd, "http://127.0.0.1:1", tmp_path / "server.log", timeout=60):
            pytest.fail("entered without a healthy server")


def test_a_server_that_never_answers_200_fails_at_the_timeout(tmp_path):
    port = free_port()  # a plain file server: /ping is a 404
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with pytest.raises(local.ServerFailed, match=rf"no healthy http://127.0.0.1:{port}/ping within 3 s"):
        with local.server_process(cmd, f"http://127.0.0.1:{port}", tmp_path / "server.log", timeout=3):
            pytest.fail("entered without a healthy server")
    (tmp_path / "ping").write_text("ok")  # now /ping is a 200
    with local.server_process(cmd, f"http://127.0.0.1:{port}", tmp_path / "server.log", timeout=30) as server:
        assert server.proc.poll() is None
    assert server.proc.returncode is not None  # stopped on exit
