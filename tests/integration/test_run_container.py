"""containers/run_container.sh (make local-train, local-serve) against a fake engine: Ctrl-C stops and removes the
container and exits 130, even when the script starts with SIGINT ignored (a background job of a script: issue 32)
and when the signal lands while an engine command runs (the docker CLI catches SIGINT and exits 1, and bash then
skips its INT trap). The image tests do the same with a real engine and containers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "containers" / "run_container.sh"

# A container that runs until stopped (or for FAKE_RUN_S seconds, then exits 3). Like the docker CLI, each command
# catches SIGINT and exits 1; `inspect` takes a while, so that a signal often lands inside one.
FAKE_ENGINE = r"""#!/bin/bash
trap 'exit 1' INT
state=$FAKE_STATE
cmd=$1
shift
echo "$cmd" >> "$state/calls"
case $cmd in
  run) echo true > "$state/running"; echo cid0123456789abcdef
       if [ -n "${FAKE_RUN_S:-}" ]; then
         (sleep "$FAKE_RUN_S"; echo 3 > "$state/exitcode"; echo false > "$state/running") >/dev/null 2>&1 &
       fi ;;
  inspect) [ -f "$state/running" ] || exit 1
       case $2 in
         *Running*) sleep 0.4 & wait $!; cat "$state/running" ;;
         *ExitCode*) cat "$state/exitcode" 2>/dev/null || echo 0 ;;
       esac ;;
  logs) echo "container output"; while [ "$(cat "$state/running" 2>/dev/null)" = true ]; do sleep 0.1; done ;;
  stop) sleep 0.5; echo 143 > "$state/exitcode"; echo false > "$state/running" ;;
  rm) rm -f "$state/running" ;;
esac
"""


@pytest.fixture
def fake_engine(tmp_path) -> tuple[Path, Path]:
    engine = tmp_path / "fake-docker"
    engine.write_text(FAKE_ENGINE)
    engine.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    return engine, state


def start(engine: Path, state: Path, sigint: str = "default", run_s: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "FAKE_STATE": str(state)}
    env.pop("RUN_CONTAINER_SIGNALS", None)
    if run_s is not None:
        env["FAKE_RUN_S"] = str(run_s)
    wrap = ["env", "--ignore-signal=INT"] if sigint == "ignored" else ["env", "--default-signal=INT"]
    return subprocess.Popen([*wrap, str(SCRIPT), str(engine), "--rm-me-not", "image", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def calls(state: Path) -> list[str]:
    return (state / "calls").read_text().split()


def test_the_container_exit_status_is_returned_and_the_container_removed(fake_engine):
    engine, state = fake_engine
    process = start(engine, state, run_s=1.5)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 3, output
    assert "container output" in output
    assert calls(state)[0] == "run" and calls(state)[-1] == "rm" and "stop" not in calls(state)


@pytest.mark.parametrize("sigint", ["default", "ignored"])
@pytest.mark.parametrize("delay", [1.0, 1.2, 1.45, 1.7])
def test_ctrl_c_stops_removes_and_exits_130(fake_engine, sigint, delay):
    """Whenever it lands (during `sleep` or an `inspect`), and even with SIGINT ignored at the start."""
    engine, state = fake_engine
    process = start(engine, state, sigint=sigint)
    time.sleep(delay)
    sent = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output
    assert time.monotonic() - sent < 10
    made = calls(state)
    assert "stop" in made and made[-1] == "rm", made
    assert not (state / "running").exists()
    assert "stopped and removed" in output


def test_sigterm_stops_removes_and_exits_143(fake_engine):
    engine, state = fake_engine
    process = start(engine, state)
    time.sleep(1.2)
    process.terminate()  # the script alone, as `kill` or a supervisor sends it
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 143, output
    assert "stop" in calls(state) and calls(state)[-1] == "rm"
