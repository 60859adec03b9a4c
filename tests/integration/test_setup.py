"""scripts/system_deps.sh (make system-deps): what is missing, installed with apt-get where it can be, else named
with its install command before any test runs. Each case runs the script with a fake PATH: a folder of fake
executables (id, sudo, apt-get, java, chromium) and nothing else, so the machine's own programs play no part."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "system_deps.sh"
BASH = "/bin/bash"


def fake(bin_dir: Path, name: str, body: str = "exit 0") -> Path:
    path = bin_dir / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bin_dir(tmp_path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    (path / "env").symlink_to(os.path.realpath("/usr/bin/env"))  # the script runs apt-get through env
    return path


def run(bin_dir: Path, *args: str, uid: int = 0) -> subprocess.CompletedProcess:
    fake(bin_dir, "id", f'[ "$1" = -u ] && echo {uid}')
    return subprocess.run([BASH, str(SCRIPT), *args], env={"PATH": str(bin_dir)}, capture_output=True, text=True,
                          timeout=30)


def fake_apt(bin_dir: Path, installs: dict[str, str]) -> Path:
    """An apt-get that logs its arguments and, on install, puts each package's program into bin_dir."""
    log = bin_dir.parent / "apt.log"
    lines = [f'echo "$*" >> {log}', 'if [ "$1" = install ]; then for p in "$@"; do case "$p" in']
    lines += [f'{package}) printf "#!{BASH}\\nexit 0\\n" > {bin_dir / program}; /bin/chmod +x {bin_dir / program} ;;'
              for package, program in installs.items()]
    lines += ["esac; done; fi"]
    fake(bin_dir, "apt-get", "\n".join(lines))
    return log


def test_nothing_missing_passes_silently(bin_dir):
    fake(bin_dir, "chromium")
    fake(bin_dir, "java")
    result = run(bin_dir, "chromium", "java", uid=1000)
    assert result.returncode == 0 and not result.stdout and not result.stderr


def test_check_lists_what_is_missing(bin_dir):
    fake(bin_dir, "java")
    result = run(bin_dir, "--check", "chromium", "java")
    assert result.returncode == 1 and result.stdout.split() == ["chromium"]


def test_a_java_that_does_not_run_is_missing(bin_dir):
    fake(bin_dir, "chromium")
    fake(bin_dir, "java", "echo 'no java runtime' >&2; exit 1")
    result = run(bin_dir, "--check", "chromium", "java")
    assert result.returncode == 1 and result.stdout.split() == ["java"]


def test_root_with_apt_installs_the_missing_packages(bin_dir):
    fake(bin_dir, "java")
    log = fake_apt(bin_dir, {"chromium": "chromium"})
    result = run(bin_dir, "chromium", "java", uid=0)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
    assert (bin_dir / "chromium").is_file()


def test_passwordless_sudo_installs_through_sudo(bin_dir):
    sudo_log = bin_dir.parent / "sudo.log"
    fake(bin_dir, "sudo", f'echo "$*" >> {sudo_log}; [ "$1" = -n ] && shift; "$@"')
    log = fake_apt(bin_dir, {"chromium": "chromium", "openjdk-17-jre-headless": "java"})
    result = run(bin_dir, "chromium", "java", uid=1000)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["update -qq", "install -y -qq chromium openjdk-17-jre-headless"]
    assert "env DEBIAN_FRONTEND=noninteractive apt-get install" in sudo_log.read_text()


@pytest.mark.parametrize("sudo", ["none", "asks for a password"])
def test_without_root_or_sudo_one_line_names_it_and_the_command(bin_dir, sudo):
    if sudo != "none":
        fake(bin_dir, "sudo", "echo 'sudo: a password is required' >&2; exit 1")
    fake(bin_dir, "java")
    log = fake_apt(bin_dir, {})
    result = run(bin_dir, "chromium", "java", uid=1000)
    assert result.returncode == 1 and not log.exists()
    assert result.stderr.splitlines() == ["error: chromium not found: install with: sudo apt-get install -y chromium"]


def test_without_apt_one_line_names_both_missing_programs(bin_dir):
    result = run(bin_dir, "chromium", "java", uid=0)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: chromium, java not found: install with your package manager")
    assert "apt-get install -y chromium openjdk-17-jre-headless" in line


def test_a_failed_apt_install_says_so(bin_dir):
    fake(bin_dir, "apt-get", '[ "$1" = install ] && { echo "E: Unable to locate package chromium"; exit 100; }; exit 0')
    result = run(bin_dir, "chromium", uid=0)
    assert result.returncode == 1
    assert "E: Unable to locate package chromium" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: apt-get install -y chromium failed")


@pytest.mark.parametrize("target,programs", [("test", "chromium java"), ("demo", "java")])
def test_make_test_and_demo_check_the_system_first(target, programs):
    """`make test` runs the check before the install and the tests; the demo needs only Java."""
    plan = subprocess.run(["make", "-n", "--no-print-directory", target], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL")})
    assert plan.stdout.splitlines()[0] == f"scripts/system_deps.sh {programs}", plan.stdout + plan.stderr


def pip_index_args(**pip_env: str) -> list[str]:
    """scripts/pip_index_args.py under the venv's pip, with no config file and only the given PIP_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run([str(REPO / ".venv/bin/python"), str(REPO / "scripts/pip_index_args.py")],
                          env=env | pip_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_make_install_hands_pips_index_settings_to_uv():
    """uv reads no pip.conf: a machine whose pip uses a mirror or local index keeps using it for make install."""
    assert pip_index_args() == []  # nothing configured: uv's default, PyPI, as pip's
    args = pip_index_args(PIP_INDEX_URL="https://mirror.example/simple",
                          PIP_EXTRA_INDEX_URL="file:///srv/a/simple file:///srv/b/simple",
                          PIP_FIND_LINKS="/srv/wheels", PIP_DEFAULT_TIMEOUT="60")
    pairs = list(zip(args[::2], args[1::2]))
    assert sorted(pairs[:-1]) == [("--extra-index-url", "file:///srv/a/simple"),
                                  ("--extra-index-url", "file:///srv/b/simple"), ("--find-links", "/srv/wheels"),
                                  ("--index-url", "https://mirror.example/simple")], args
    assert pairs[-1] == ("--index-strategy", "unsafe-best-match"), args  # pip's choice among indexes, not uv's
    makefile = (REPO / "Makefile").read_text()
    assert "$$($(BIN)/python scripts/pip_index_args.py) -r requirements/lock/dev.txt" in makefile
