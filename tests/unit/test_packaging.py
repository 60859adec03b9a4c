"""pyproject.toml is the whole truth of what the package needs: every third-party import of code/imgclf is a
declared dependency, each extra names what its requirements file pins (the versions live there, once), and every
program is a console script, which `python scripts/<name>.py` runs from a checkout. tests/integration/
test_packaging.py installs `.[serve]` into a fresh environment and serves from it."""

from __future__ import annotations

import ast
import importlib
import re
import sys
import tomllib
from importlib.metadata import packages_distributions, requires

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO
from tests.dockerfiles import top_level

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# Each extra and the requirements file that pins it (following -r, less requirements/common.txt: `dependencies`).
FILES = {"train": "train.txt", "serve": "serve.txt", "aws": "scripts.txt", "search": "search.txt", "dev": "dev.txt"}


def names(requirements: list[str]) -> set[str]:
    """The distributions a list of requirements names, an extra of the package itself (imgclf[a,b]) expanded."""
    out = set()
    for line in requirements:
        req = Requirement(line)
        if req.name == PROJECT["name"]:
            out |= set().union(*(names(EXTRAS[extra]) for extra in req.extras))
        else:
            out.add(canonicalize_name(req.name))
    return out


def pinned(file: str) -> set[str]:
    return {canonicalize_name(name) for name in top_level(REPO / "requirements" / file)}


def test_the_dependencies_and_each_extra_name_what_their_requirements_file_pins():
    assert names(PROJECT["dependencies"]) == pinned("common.txt")
    assert set(EXTRAS) == set(FILES)
    for extra, file in FILES.items():
        assert names(EXTRAS[extra]) == pinned(file) - pinned("common.txt"), f"pyproject [{extra}] vs {file}"
    assert "torch" not in names(EXTRAS["serve"]) | names(PROJECT["dependencies"])  # the slim serving image


def imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    found |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    return {name.split(".")[0] for name in found if name}


def direct(distribution: str) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requires(distribution) or []}


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    declared = names(PROJECT["dependencies"]) | set().union(*(names(reqs) for reqs in EXTRAS.values()))
    distributions = packages_distributions()
    undeclared = {}
    for path in sorted((REPO / "code/imgclf").rglob("*.py")):
        for module in imports(path) - set(sys.stdlib_module_names) - {"imgclf", "__future__"}:
            provided_by = {canonicalize_name(d) for d in distributions.get(module, [])}
            # a namespace package (sagemaker.core, sagemaker.train...) counts when a declared meta-package needs
            # all of its distributions
            namespace = len(provided_by) > 1 and any(provided_by <= direct(d) for d in declared)
            if not provided_by & declared and not namespace:
                undeclared[f"{path.relative_to(REPO)}: import {module}"] = sorted(provided_by)
    assert not undeclared, f"declare in pyproject.toml (and pin in requirements/): {undeclared}"


SCRIPTS = PROJECT["scripts"]
LAUNCHERS = sorted((REPO / "scripts").glob("*.py"))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_names_a_main_function(name):
    module, _, function = SCRIPTS[name].partition(":")
    assert callable(getattr(importlib.import_module(module), function)), SCRIPTS[name]


def test_each_program_of_imgclf_cli_is_a_console_script_and_a_scripts_launcher():
    programs = {p.stem for p in (REPO / "code/imgclf/cli").glob("*.py")} - {"__init__"}
    launched = {}
    for path in LAUNCHERS:
        if match := re.search(r"^from imgclf\.cli\.(\w+) import main", path.read_text(), re.MULTILINE):
            launched[path.stem] = match.group(1)
    assert launched == {name: name for name in programs}, "scripts/<name>.py runs imgclf.cli.<name>"
    for name in programs:
        assert SCRIPTS.get(f"imgclf-{name.replace('_', '-')}") == f"imgclf.cli.{name}:main", name
