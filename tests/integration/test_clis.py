"""Every program a user runs, as a process: `--help` exits 0 with its usage on stdout, and a usage error exits 2
with an `error:` line naming it and no traceback (docs/aws.md's exit codes, for every CLI, not only the AWS
scripts). The programs start side by side: each is mostly an interpreter's imports."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from imgclf.processes import venv_bin

from tests.conftest import REPO

PY = sys.executable
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
USAGE_ERRORS = {"imgclf-local": ["train", "--data", "x", "--output", "y", "--hp", "lr"],
                "imgclf-export": ["/no/such/model"], "serve": ["--port", "8080"], "imgclf-serve": ["--port", "8080"],
                "imgclf-demo": ["--images", "0"]}  # refused before it creates ./demo-output
# Each program, and a usage error of its own: every console script (make install puts them in the venv), the
# development scripts, one launcher of a console script (all are the same three lines: tests/unit/test_packaging.py)
# and the modules run with -m.
PROGRAMS: dict[str, tuple[list[str], list[str]]] = {
    **{name: ([venv_bin(name)], USAGE_ERRORS.get(name, ["--no-such-flag"])) for name in SCRIPTS},
    **{f"scripts/{name}.py": ([PY, f"scripts/{name}.py"], ["--no-such-flag"]) for name in (
        "audit", "deploy", "pip_index_args", "report_screenshot", "ui_screenshot", "update_readme")},
    "python -m imgclf.trial": ([PY, "-m", "imgclf.trial"], ["/no/such/output.tar.gz"]),
    "python -m imgclf.sample_data": ([PY, "-m", "imgclf.sample_data"], ["out", "--classes", "many"]),
}
LAUNCHERS = {f"scripts/{p.name}" for p in (REPO / "scripts").glob("*.py") if "from imgclf.cli." in p.read_text()}


def test_every_program_helps_with_exit_0_and_refuses_a_usage_error_with_exit_2():
    scripts = {f"scripts/{p.name}" for p in (REPO / "scripts").glob("*.py")}
    assert scripts <= set(PROGRAMS) | LAUNCHERS, f"add to PROGRAMS: {scripts - set(PROGRAMS) - LAUNCHERS}"
    runs = {(name, case): subprocess.Popen([*cmd, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
            for name, (cmd, usage_error) in PROGRAMS.items()
            for case, args in (("help", ["--help"]), ("usage", usage_error))}
    for (name, case), proc in runs.items():
        out, err = proc.communicate(timeout=120)
        if case == "help":
            assert proc.returncode == 0 and "usage:" in out, f"{name} --help: exit {proc.returncode}\n{out}{err}"
        else:
            assert proc.returncode == 2, f"{name} {PROGRAMS[name][1]}: exit {proc.returncode}, not 2\n{err}"
            assert "error" in err and "Traceback" not in err, f"{name}: {err}"
