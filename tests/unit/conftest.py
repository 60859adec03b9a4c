"""The unit tier runs in-process: starting a process or reaching past 127.0.0.1 fails the test, with where it
belongs instead. Loopback test doubles (a local HTTP server in a thread) are fine. The guard holds while each
unit test sets up (its fixtures of every scope, so a session fixture that starts a process is caught too), runs
and tears down."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess

# Imported before any guard, which would take the processes of their first import for the test's: matplotlib's
# first import on a machine runs `fc-list` to build its font cache (~/.cache/matplotlib), torch's `ldconfig -p`
# (cuda-pathfinder looks for libdl), in whichever test happened to import them first.
import matplotlib.font_manager  # noqa: F401
import pytest
import torch  # noqa: F401

MOVE = "tests/unit runs in-process only: {what}; move the test to tests/integration"


def _loopback(address) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return address[0] == "localhost"


def _guard(mp: pytest.MonkeyPatch) -> None:
    def no_process(self, args, *rest, **kwargs):
        raise AssertionError(MOVE.format(what=f"it starts a process ({str(args)[:80]})"))

    def no_fork(*args, **kwargs):
        raise AssertionError(MOVE.format(what="it forks"))

    connect = socket.socket.connect

    def loopback_only(self, address):
        if not _loopback(address):
            raise AssertionError(MOVE.format(what=f"it connects to {address}"))
        return connect(self, address)

    mp.setattr(subprocess.Popen, "__init__", no_process)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            mp.setattr(os, name, no_fork)
    mp.setattr(socket.socket, "connect", loopback_only)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with pytest.MonkeyPatch.context() as mp:
        _guard(mp)
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with pytest.MonkeyPatch.context() as mp:
        _guard(mp)
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with pytest.MonkeyPatch.context() as mp:
        _guard(mp)
        return (yield)
