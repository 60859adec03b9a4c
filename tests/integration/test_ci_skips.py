"""In CI (CI=true), a skip for a missing engine, program or package fails (tests/conftest.py); other skips stay."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, fails_in_ci

CASES = '''
import pytest

def test_missing_program():
    pytest.skip("no podman")

def test_missing_engine():
    pytest.skip("no docker command on PATH")

def test_not_this_run():
    pytest.skip("builds the three images (minutes): run them with make test-images")

@pytest.mark.parametrize("recipe", [])
def test_empty_parameters(recipe):
    pass
'''
MODULE_SKIP = 'import pytest\nimgclf_absent = pytest.importorskip("imgclf_absent")\n\ndef test_x():\n    pass\n'


def run_pytest(tmp_path, ci: str | None, file: str) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_make_collect_report, "
                                          "pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'code'}"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "-o", "addopts=",
                           file], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def outcomes(result: subprocess.CompletedProcess) -> dict[str, str]:
    """test name -> PASSED, FAILED, SKIPPED or ERROR (the lines of pytest -v)."""
    return {m[1]: m[2] for line in result.stdout.splitlines()
            if (m := re.match(r"\S+::(test_\w+)(?:\[\w*\])? (PASSED|FAILED|SKIPPED|ERROR)\b", line))}


def test_in_ci_a_skip_for_something_missing_fails(tmp_path):
    result = run_pytest(tmp_path, "true", "test_cases.py")
    assert result.returncode == 1, result.stdout
    assert outcomes(result) == {"test_missing_program": "FAILED", "test_missing_engine": "FAILED",
                                "test_not_this_run": "SKIPPED", "test_empty_parameters": "SKIPPED"}, result.stdout
    assert "a skip for something missing fails here (install it); skip reason: no podman" in result.stdout
    module = run_pytest(tmp_path, "true", "test_module_skip.py")  # importorskip at module level: collection
    assert module.returncode == 2, module.stdout
    assert "ERROR test_module_skip.py - CI=true: a skip for something missing fails here (install it); skip " \
           "reason: could not import 'imgclf_absent'" in module.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_they_stay_skips(tmp_path, ci):
    result = run_pytest(tmp_path, ci, "test_cases.py")
    assert result.returncode == 0, result.stdout
    assert outcomes(result) == dict.fromkeys(["test_missing_program", "test_missing_engine", "test_not_this_run",
                                              "test_empty_parameters"], "SKIPPED"), result.stdout
    module = run_pytest(tmp_path, ci, "test_module_skip.py")
    assert module.returncode == 5 and "1 skipped" in module.stdout, module.stdout  # 5: no test ran


@pytest.mark.parametrize("reason,fails", [
    ("no podman", True), ("could not import 'timm': No module named 'timm'", True),
    ("podman cannot import here: ...", True), ("java not found", True), ("Chromium is not installed", True),
    ("builds the three images (minutes): run them with make test-images", False),
    ("got empty parameter set ['recipe'], function test_x at a.py:3", False),
    ("needs a GPU: CUDA is not available on this machine", False),
])
def test_which_reasons_fail(monkeypatch, reason, fails):
    monkeypatch.setenv("CI", "true")
    assert fails_in_ci(reason) is fails
    monkeypatch.delenv("CI")
    assert not fails_in_ci(reason)
