"""The documentation stays true: generated tables, commands, links and IAM policies are checked against the code.

README.md and docs/*.md follow these rules (docs/development.md, "The docs are tested"):
- a generated table sits between `<!-- NAME:start -->` and `<!-- NAME:end -->` and equals what
  scripts/update_readme.py generates from the code;
- every fenced block names its language, and every shell block is preceded by one marker comment:
  `<!-- run -->` (run here for real), `<!-- aws -->` (needs AWS or Docker: syntax, `--help`, `--dry-run`,
  `make -n`), or `<!-- tested-by: tests/integration/test_x.py::test_name ... -->` (those tests exist, are not this test,
  and use every long option of the block's commands);
- every `scripts/X.py` and `python -m imgclf.X` command of a shell block parses with that program's own
  argparse parser, every `make` command passes `make -n`, and every python block compiles;
- every relative link points to an existing file, and every #anchor to a heading of its target;
- the IAM policies in docs/iam/ are valid policies that name real actions and allow what the scripts do.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fnmatch
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
MARKER = re.compile(r"<!--\s*(run|aws|tested-by:(?P<tests>[^>]*?))\s*-->")
PYTHONS = {"python", "python3", "python3.11", ".venv/bin/python"}
# Example values for the variables the AWS commands use; a dry run sends nothing, so none of them is real.
EXAMPLE_ENV = {"BUCKET": "my-ml-bucket", "MODEL": "s3://my-ml-bucket/imgclf/output/job/output/model.tar.gz",
               "SAGEMAKER_ROLE": "arn:aws:iam::123456789012:role/imgclf-sagemaker", "AWS_REGION": "us-east-1",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _load_update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


update_readme = _load_update_readme()


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    marker: str | None  # run, aws, tested-by:... or None
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        start, close = i, fence.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(close):
            j += 1
        previous = next((lines[k].strip() for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.fullmatch(previous)
        found.append(Block(path, start + 1, fence.group(3).lower(), marker.group(1).strip() if marker else None,
                           "\n".join(lines[start + 1:j])))
        i = j + 1
    return found


ALL_BLOCKS = [b for path in DOCS for b in blocks(path)]
SHELL_BLOCKS = [b for b in ALL_BLOCKS if b.language in SHELL_LANGUAGES]


def of_kind(kind: str) -> list[Block]:
    return [b for b in SHELL_BLOCKS if b.marker and b.marker.split(":")[0] == kind]


def commands(text: str) -> list[list[str]]:
    """Simple commands of a shell block (continuations joined, comments dropped, split at ; && || | &)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        command: list[str] = []
        for token in list(lexer) + [";"]:
            if token and set(token) <= set(";&|"):
                if command:
                    found.append(command)
                command = []
            else:
                command.append(token)
    return found


def without_assignments(command: list[str]) -> list[str]:
    """`VAR=x cmd` -> cmd; `VAR=$(cmd ...)` -> cmd ...; `export ...` -> []."""
    if command and command[0] == "export":
        return []
    if command and (sub := re.match(r"^\w+=\$\((.*)$", command[0])):
        inner = [sub.group(1), *command[1:]] if sub.group(1) else command[1:]
        return [*inner[:-1], inner[-1].removesuffix(")")] if inner else []
    while command and re.match(r"^\w+=", command[0]):
        command = command[1:]
    return command


# ---- generated tables --------------------------------------------------------------------------------


def test_generated_tables_equal_the_code():
    used = set()
    for path in DOCS:
        text = path.read_text()
        used |= {m["name"] for m in update_readme.MARKER.finditer(text)}
        assert update_readme.regenerate(text, path.name) == text, \
            f"{path.relative_to(REPO)}: generated tables are out of date; run python scripts/update_readme.py"
    unused = set(update_readme.GENERATORS) - used
    assert not unused, f"tables generated but shown nowhere: {unused}"


def test_update_readme_rewrites_a_stale_table():
    stale = "intro\n<!-- rules:start -->\n| old |\n<!-- rules:end -->\nafter\n"
    new = update_readme.regenerate(stale)
    assert "| old |" not in new and "`overfit`" in new and new.startswith("intro\n") and new.endswith("after\n")
    assert update_readme.regenerate(new) == new


# ---- shell blocks ------------------------------------------------------------------------------------


def test_every_block_has_a_language_and_every_shell_block_a_marker():
    unnamed = [b.id for b in ALL_BLOCKS if not b.language]
    assert not unnamed, f"fenced blocks without a language (use text for output): {unnamed}"
    unmarked = [b.id for b in SHELL_BLOCKS if b.marker is None]
    assert not unmarked, ("shell blocks without <!-- run -->, <!-- aws --> or <!-- tested-by: tests/...::test -->: "
                          f"{unmarked}")


def test_shell_blocks_are_valid_bash():
    for block in SHELL_BLOCKS:
        result = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
        assert result.returncode == 0, f"{block.id}: {result.stderr}"


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_tested_by_names_existing_tests():
    for block in of_kind("tested-by"):
        ids = block.marker.split(":", 1)[1].split()
        assert ids, f"{block.id}: tested-by names no test"
        for test_id in ids:
            file, _, name = test_id.partition("::")
            path = REPO / file
            assert path.is_file() and name, f"{block.id}: {test_id}: no such test file (tests/x.py::test_name)"
            assert name.split("[")[0] in _defined_tests(path), f"{block.id}: {test_id}: no such test in {file}"


@cache
def _make_targets() -> set[str]:
    result = subprocess.run(["make", "-pRrqn", "-f", str(REPO / "Makefile")], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "TAG": "dev"})
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z0-9][\w%.-]*):(?!=)", result.stdout, re.M)}


def _is_target(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, t.replace("%", "*")) if "%" in t else name == t for t in _make_targets())


def test_make_targets_in_the_docs_exist():
    for block in SHELL_BLOCKS:
        for command in map(without_assignments, commands(block.text)):
            if command[:1] == ["make"]:
                targets = [a for a in command[1:] if "=" not in a and not a.startswith("-")]
                for target in targets:
                    assert _is_target(target), f"{block.id}: make {target}: no such target in the Makefile"


# ---- every command through its program's own parser -------------------------------------------------


@dataclass
class Command:
    block: Block
    line: int  # 1-based line of the doc file where the command starts
    env: dict[str, str]  # VAR=value before it, and the block's assignments above it
    argv: list[str]

    @property
    def where(self) -> str:
        return f"{self.block.path.relative_to(REPO)}:{self.line}"


def located_commands(block: Block) -> list[Command]:
    """The simple commands of a block with the doc line each starts on and the variables it sees: `VAR=x cmd`
    (x for cmd), `VAR=x` and `export VAR=x` lines (x for the commands below), `VAR=$(cmd ...)` (cmd ...)."""
    found, assigned, lines, i = [], {}, block.text.splitlines(), 0
    while i < len(lines):
        start, joined = i, lines[i]
        while joined.endswith("\\") and i + 1 < len(lines):
            i += 1
            joined = joined[:-1] + " " + lines[i]
        i += 1
        for command in commands(joined):
            if command[0] == "export":
                command = command[1:]
            prefix = {}
            while command and (m := re.match(r"^(\w+)=(.*)$", command[0])) and not m.group(2).startswith("$("):
                prefix[m.group(1)] = m.group(2)
                command = command[1:]
            if not command:
                assigned.update(prefix)
                continue
            argv = without_assignments(command)
            if argv:
                found.append(Command(block, block.line + 1 + start, {**assigned, **prefix}, argv))
    return found


CONSOLE_SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def program_of(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """("file", "scripts/x.py", args) for `python scripts/x.py args` or `scripts/x.py args`;
    ("module", "imgclf.x", args) for `python -m imgclf.x args`, for a console script (`imgclf-deploy args`) and
    for a scripts/ launcher of one (`python scripts/deploy.py args`: imgclf.cli.deploy); None for other programs."""
    if argv[0] in PYTHONS and len(argv) > 2 and argv[1] == "-m" and argv[2].split(".")[0] == "imgclf":
        return "module", argv[2], argv[3:]
    if argv[0] in CONSOLE_SCRIPTS:
        return "module", CONSOLE_SCRIPTS[argv[0]].partition(":")[0], argv[1:]
    args = argv[1:] if argv[0] in PYTHONS else argv
    if args and args[0].endswith(".py") and not args[0].startswith(("-", "/")):
        path = REPO / args[0]
        if path.is_file() and (launched := re.search(r"^from (imgclf\.cli\.\w+) import main", path.read_text(), re.M)):
            return "module", launched.group(1), args[1:]
        return "file", args[0], args[1:]
    return None


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__("parser captured")
        self.parser = parser


@cache
def program_parser(kind: str, name: str) -> argparse.ArgumentParser | None:
    """The program's own argparse parser: its build_parser() or parser(); else the parser its main() builds,
    taken when main calls parse_args (main stops there: nothing is run). None: a module without main() and
    without argparse (python -m imgclf.config), which takes no arguments."""
    saved_argv = sys.argv
    sys.argv = [name.rsplit("/", 1)[-1]]  # argparse's prog: the program's name in its messages
    try:
        return _program_parser(kind, name)
    finally:
        sys.argv = saved_argv


def _program_parser(kind: str, name: str) -> argparse.ArgumentParser | None:
    if kind == "module":
        module = importlib.import_module(name)
    else:
        path = REPO / name
        assert path.is_file(), f"{name}: no such program"
        sys.path.insert(0, str(path.parent))  # scripts/bench/*.py import their neighbour common.py
        try:
            spec = importlib.util.spec_from_file_location(f"docs_program_{path.stem}_{abs(hash(name))}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
    for factory in ("build_parser", "parser"):
        if callable(getattr(module, factory, None)):
            parser = getattr(module, factory)()
            assert isinstance(parser, argparse.ArgumentParser), f"{name}.{factory}() is not an ArgumentParser"
            return parser
    if not hasattr(module, "main") and "argparse" not in Path(module.__file__).read_text():
        return None

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original, original_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        main = module.main
        main([]) if inspect.signature(main).parameters else main()
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original, original_known
    raise AssertionError(f"{name}: main() returned without parsing arguments; give it a build_parser()")


def substituted(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


PROGRAM_COMMANDS = [(c, p) for b in SHELL_BLOCKS for c in located_commands(b) if (p := program_of(c.argv))]


@pytest.mark.parametrize("command, program", PROGRAM_COMMANDS, ids=[f"{c.where}:{p[1]}" for c, p in PROGRAM_COMMANDS])
def test_program_commands_in_the_docs_parse(command, program):
    """Each `scripts/X.py ...` and `python -m imgclf.X ...` of a shell block goes through that program's own
    argparse parser: an unknown or misspelt flag, a missing argument or an invalid choice fails here."""
    kind, name, args = program
    parser = program_parser(kind, name)
    args = substituted(args, {**EXAMPLE_ENV, **command.env})
    if parser is None:
        assert not args, f"{command.where}: {name} takes no arguments: {shlex.join(args)}"
        return
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:
        message = stderr.getvalue().strip().splitlines()[-1:] or [f"exit {e.code}"]
        flags = sorted(set(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", message[0])))
        pytest.fail(f"{command.where}: {name} {shlex.join(args)}: {'flag ' + ' '.join(flags) + ': ' if flags else ''}"
                    f"{message[0]}")


def _make_command_ids(commands_: list[Command]) -> list[str]:
    return [f"{c.where}:{shlex.join(c.argv)}" for c in commands_]


MAKE_COMMANDS = [c for b in SHELL_BLOCKS for c in located_commands(b) if c.argv[0] == "make"]


@pytest.mark.parametrize("command", MAKE_COMMANDS, ids=_make_command_ids(MAKE_COMMANDS))
def test_make_commands_in_the_docs_dry_run(command):
    """Each `make ...` of a shell block, with the block's variables, passes `make -n` (the Makefile parses the
    variables and every target it would build exists)."""
    env = {k: v for k, v in run_env().items() if k not in ("MAKEFLAGS", "MAKELEVEL")}
    env.update({**EXAMPLE_ENV, **command.env})
    result = subprocess.run(["make", "-n", *substituted(command.argv[1:], env)], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, f"{command.where}: {shlex.join(command.argv)} -n: {result.stderr[-1000:]}"


# ---- tested-by: the named tests use what the block shows --------------------------------------------


@cache
def _top_level_sources(path: Path) -> dict[str, str]:
    """name -> source (decorators included) of each top-level function, class and assignment of a file."""
    text = path.read_text()
    lines, found = text.splitlines(), {}
    for node in ast.parse(text).body:
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        source = "\n".join(lines[first - 1:node.end_lineno])
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            found[node.name] = source
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(target, ast.Name):
                    found[target.id] = source
    return found


def source_of_test(test_id: str) -> str:
    """The source of a test: its function (with its parametrize lists), and, followed through the names it
    uses, the functions, fixtures and constants of its file and of tests/conftest.py that it relies on."""
    file, _, name = test_id.partition("::")
    own, shared = _top_level_sources(REPO / file), _top_level_sources(REPO / "tests" / "conftest.py")
    recipes = _top_level_sources(REPO / "code" / "imgclf" / "local.py")  # local.serving(...) builds the command
    sources, seen, queue = [], set(), [name.split("[")[0].split("::")[0]]
    while queue:
        current = queue.pop()
        if current in seen:
            continue
        seen.add(current)
        source = own.get(current) or shared.get(current) or (current.startswith("local.") and recipes.get(current[6:]))
        if not source:
            continue
        sources.append(source)
        tree = ast.parse(textwrap.dedent(source))
        queue += [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
        queue += [n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)]  # fixtures
        queue += [f"local.{n.attr}" for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "local"]
        queue += [f"local.{n.func.id}" for n in ast.walk(tree)  # within local.py: serving -> server_process
                  if current.startswith("local.") and isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return "\n".join(sources)


def long_options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.fullmatch(r"--[a-z][\w-]*(=.*)?", a)]


@pytest.mark.parametrize("block", of_kind("tested-by"), ids=lambda b: b.id)
def test_tested_by_tests_use_the_blocks_flags(block):
    """A block vouched for by tests shows only flags those tests use: each long option of its `scripts/X.py`
    and `python -m imgclf.X` commands appears in the source of one of the named tests."""
    ids = block.marker.split(":", 1)[1].split()
    source = "\n".join(source_of_test(test_id) for test_id in ids)
    unused = []
    for command in located_commands(block):
        if program := program_of(command.argv):
            unused += [f"{command.where}: {program[1]} {flag}" for flag in long_options(program[2])
                       if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", source)]
    assert not unused, (f"{block.id}: no test of tested-by ({' '.join(ids)}) uses the flag(s):\n" + "\n".join(unused))


def test_no_block_is_vouched_for_by_the_docs_test():
    """The docs test checks every block; naming it in tested-by would vouch for a block with itself."""
    selves = [f"{b.id}: {t}" for b in of_kind("tested-by") for t in b.marker.split(":", 1)[1].split()
              if t.startswith("tests/integration/test_docs.py::")]
    assert not selves, f"tested-by names the docs test itself; name a test that runs the commands: {selves}"


def test_python_blocks_compile():
    python = [b for b in ALL_BLOCKS if b.language in ("python", "py", "python3")]
    assert python, "no python block found: is the fence language still python?"
    for block in python:
        try:
            compile(block.text, block.id, "exec")
        except SyntaxError as e:
            pytest.fail(f"{block.id}: line {block.line + (e.lineno or 0)}: {e.msg}")


def sandbox(tmp_path: Path) -> Path:
    """A folder that looks like the repository (links to its code, scripts, .venv, ...) for commands to run in."""
    for entry in REPO.iterdir():
        if entry.name not in (".git", "docs") and not entry.name.startswith((".pytest", "demo-output")):
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / "docs").symlink_to(REPO / "docs")
    return tmp_path


def run_env() -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
            "PYTHONPATH": str(REPO / "code")}


@pytest.mark.parametrize("block", of_kind("run"), ids=lambda b: b.id)
def test_run_blocks_run(block, tmp_path):
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=sandbox(tmp_path),
                            env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the block's children too
        proc.communicate()
        pytest.fail(f"{block.id}: still running after 60 s: <!-- run --> is for cheap commands")
    assert proc.returncode == 0, f"{block.id}: exit {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}"


def offline_env() -> dict[str, str]:
    """No credentials: a dry run validates and prints its requests and reads nothing (describe calls would
    otherwise go to AWS). Region and example names as the docs' commands expect them."""
    env = {k: v for k, v in run_env().items() if not k.startswith("AWS_")}
    return {**env, **EXAMPLE_ENV, "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


@cache
def script_help(script: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                            env=run_env(), timeout=60)
    assert result.returncode == 0, f"{script} --help: exit {result.returncode}\n{result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def aws_sandbox(tmp_path_factory) -> Path:
    from imgclf import sample_data

    root = sandbox(tmp_path_factory.mktemp("aws-docs"))
    sample_data.generate(root / "dogImages", classes=3)
    (root / "best_hyperparameters.json").write_text(json.dumps({"lr": 0.01, "batch-size": 128, "epochs": 5}))
    return root


@pytest.mark.parametrize("block", of_kind("aws"), ids=lambda b: b.id)
def test_aws_blocks_are_valid_and_dry_run(block, aws_sandbox):
    env = offline_env()
    for command in map(without_assignments, commands(block.text)):
        if command[:1] == ["make"]:
            result = subprocess.run(["make", "-n", *command[1:]], cwd=REPO, capture_output=True, text=True,
                                    env=run_env(), timeout=60)
            assert result.returncode == 0, f"{block.id}: {shlex.join(command)} -n: {result.stderr[-1000:]}"
        if command[:1] and command[0] in PYTHONS and len(command) > 1 and command[1].endswith(".py"):
            script = command[1]
            args = [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), a) for a in command[2:]]
            assert (REPO / script).is_file(), f"{block.id}: {script} does not exist"
            if "--dry-run" in script_help(script):
                dry = args if "--dry-run" in args else [*args, "--dry-run"]
                result = subprocess.run([sys.executable, str(REPO / script), *dry], cwd=aws_sandbox, env=env,
                                        capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, (f"{block.id}: {script} {shlex.join(dry)}: exit {result.returncode}"
                                                f"\n{result.stdout[-1500:]}\n{result.stderr[-1500:]}")
        if command[:2] and command[0] in PYTHONS and command[1] == "-m" and command[2].startswith("imgclf"):
            result = subprocess.run([sys.executable, "-m", command[2], "--help"], env=run_env(), capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 0, f"{block.id}: python -m {command[2]} --help: {result.stderr[-1000:]}"


def test_modules_the_docs_name_exist():
    """imgclf.x.y in the docs is a module of code/imgclf, or an attribute (def, class, NAME =) of one."""
    missing = []
    for path in DOCS:
        for name in sorted(set(re.findall(r"\bimgclf(?:\.\w+)+", path.read_text()))):
            parts, base = name.split("."), REPO / "code"
            depth = 0
            while depth < len(parts) and ((base / "/".join(parts[:depth + 1])).is_dir()
                                          or (base / ("/".join(parts[:depth + 1]) + ".py")).is_file()):
                depth += 1
            if depth == len(parts):
                continue
            module = base / ("/".join(parts[:depth]) + ".py")
            attribute = re.compile(rf"^(?:def|class)\s+{parts[depth]}\b|^{parts[depth]}\b[^=\n]*=", re.M)
            if depth != len(parts) - 1 or not module.is_file() or not attribute.search(module.read_text()):
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert not missing, f"no such module or attribute: {missing}"


# ---- links -------------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def without_fences(text: str) -> str:
    return re.sub(r"^(`{3,}|~{3,}).*?^\1\s*$", "", text, flags=re.M | re.S)


@cache
def anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a file (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    for line in without_fences(path.read_text()).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            if count:
                seen.setdefault(f"{base}-{count}", 1)
    return set(seen)


def links(path: Path) -> list[str]:
    """Link targets outside code (in code, [..](..) is not a link)."""
    text = without_fences(path.read_text())
    text = re.sub(r"`[^`\n]*`", lambda m: m.group(0).replace("[", "(").replace("]", ")"), text)
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOCS:
        for target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(REPO)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def test_slugs_are_githubs():
    assert slug("Hyperparameter search on your own machine (`tune.py --local`)") == \
        "hyperparameter-search-on-your-own-machine-tunepy---local"
    assert slug("On AWS: from `make push` to a prediction") == "on-aws-from-make-push-to-a-prediction"
    assert slug("Permissions (least privilege)") == "permissions-least-privilege"


def test_readme_is_the_newcomers_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 15_000, f"README.md is {len(readme.encode())} bytes: move reference text to docs/"
    assert "make demo" in readme and "make test" in readme
    for heading in ("Requirements", "The architecture in one picture", "Train locally on your own data"):
        assert f"## {heading}" in readme
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md") if t.startswith("docs/")}
    missing = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert not missing, f"README does not link to {missing}"
    assert (REPO / "docs" / "architecture.md").resolve() in linked


# ---- IAM policies ------------------------------------------------------------------------------------

IAM = REPO / "docs" / "iam"
POLICIES = ["execution-role-policy.json", "scripts-policy.json", "push-images-policy.json"]
TRUST = "execution-role-trust-policy.json"
SERVICES = {"sagemaker": ["sagemaker", "sagemaker-runtime"], "s3": ["s3"], "ecr": ["ecr"], "logs": ["logs"],
            "cloudwatch": ["cloudwatch"], "iam": ["iam"], "application-autoscaling": ["application-autoscaling"],
            "kms": ["kms"], "ec2": ["ec2"], "sts": ["sts"]}
# IAM actions that are permissions rather than API operations.
PERMISSION_ONLY = {"s3:ListBucket", "iam:PassRole"}
# API operations the scripts call whose IAM action has another name.
ACTION_OF = {"s3:HeadBucket": "s3:ListBucket", "s3:HeadObject": "s3:GetObject", "s3:ListObjectsV2": "s3:ListBucket"}
EXAMPLE = {"REGION": "us-east-1", "ACCOUNT": "123456789012", "BUCKET": "my-ml-bucket"}


def policy(name: str) -> dict:
    return json.loads((IAM / name).read_text())


def statements(doc: dict) -> list[dict]:
    s = doc["Statement"]
    return s if isinstance(s, list) else [s]


def as_list(value) -> list[str]:
    return value if isinstance(value, list) else [value]


def allows(doc: dict, action: str, resource: str = "*") -> bool:
    """Whether an Allow statement names the action and the resource (IAM wildcards; placeholders filled)."""
    for s in statements(doc):
        if s["Effect"] != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in as_list(s["Action"])):
            continue
        patterns = [re.sub("|".join(EXAMPLE), lambda m: EXAMPLE[m.group(0)], r) for r in as_list(s["Resource"])]
        if resource == "*" or any(fnmatch.fnmatchcase(resource, p.replace("[", "[[]")) for p in patterns):
            return True
    return False


def test_iam_files_are_the_ones_the_docs_link():
    assert sorted(p.name for p in IAM.glob("*.json")) == sorted([*POLICIES, TRUST])
    aws_md = (REPO / "docs" / "aws.md").read_text()
    for name in [*POLICIES, TRUST]:
        assert f"(iam/{name})" in aws_md


def test_policies_are_valid_iam_documents():
    import boto3
    from moto import mock_aws

    with mock_aws():
        iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing")
        for name in POLICIES:
            text = json.dumps(json.loads((IAM / name).read_text()))
            iam.create_policy(PolicyName=name.removesuffix(".json"), PolicyDocument=text)  # moto checks the grammar
        role = iam.create_role(RoleName="imgclf-sagemaker", AssumeRolePolicyDocument=(IAM / TRUST).read_text())
        assert role["Role"]["Arn"].endswith(":role/imgclf-sagemaker")
    trust = policy(TRUST)
    assert trust["Version"] == "2012-10-17"
    assert [(s["Effect"], s["Principal"], s["Action"]) for s in statements(trust)] == [
        ("Allow", {"Service": "sagemaker.amazonaws.com"}, "sts:AssumeRole")]


@cache
def operations(service: str) -> set[str]:
    import botocore.session

    return set(botocore.session.get_session().get_service_model(service).operation_names)


def test_policies_name_real_actions_of_the_services_the_scripts_use():
    for name in [*POLICIES, TRUST]:
        doc = policy(name)
        assert doc["Version"] == "2012-10-17"
        for s in statements(doc):
            for action in as_list(s["Action"]):
                prefix, _, op = action.partition(":")
                assert prefix in SERVICES, f"{name}: {action}: not a service the scripts use"
                if action in PERMISSION_ONLY:
                    continue
                known = set().union(*(operations(svc) for svc in SERVICES[prefix]))
                assert any(fnmatch.fnmatchcase(o, op) for o in known), f"{name}: {action}: no such action"


def test_execution_role_lets_sagemaker_log_and_pull_the_images():
    from imgclf.aws.images import REPOSITORIES

    role = policy("execution-role-policy.json")
    group = "arn:aws:logs:us-east-1:123456789012:log-group:"
    for name in ("/aws/sagemaker/TrainingJobs", "/aws/sagemaker/Endpoints/dog-breeds"):
        assert allows(role, "logs:CreateLogGroup", group + name), f"SageMaker cannot create the log group {name}"
        stream = f"{group}{name}:log-stream:dog-breeds/algo-1-1700000000"
        for action in ("logs:CreateLogStream", "logs:PutLogEvents"):
            assert allows(role, action, stream), f"{action} on {stream}"
    for repository in REPOSITORIES.values():
        arn = f"arn:aws:ecr:us-east-1:123456789012:repository/{repository}"
        for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
            assert allows(role, action, arn), f"{action} on {repository}"
    assert allows(role, "s3:GetObject", "arn:aws:s3:::my-ml-bucket/dogImages/train/001.Affenpinscher/a.jpg")
    assert allows(role, "s3:PutObject", "arn:aws:s3:::my-ml-bucket/imgclf/output/job/checkpoints/last.pt")


def test_push_policy_is_scoped_to_the_three_repositories():
    from imgclf.aws.images import REPOSITORIES

    push = policy("push-images-policy.json")
    arns = {f"arn:aws:ecr:REGION:ACCOUNT:repository/{r}" for r in REPOSITORIES.values()}
    for s in statements(push):
        if as_list(s["Action"]) != ["ecr:GetAuthorizationToken"]:
            assert set(as_list(s["Resource"])) <= arns, f"{s.get('Sid')}: not limited to {sorted(arns)}"
    for repository in REPOSITORIES.values():
        arn = f"arn:aws:ecr:us-east-1:123456789012:repository/{repository}"
        for action in ("CreateRepository", "PutImageScanningConfiguration", "PutLifecyclePolicy",
                       "BatchCheckLayerAvailability", "InitiateLayerUpload", "UploadLayerPart",
                       "CompleteLayerUpload", "PutImage"):
            assert allows(push, f"ecr:{action}", arn), f"make push cannot ecr:{action} on {repository}"
    assert not allows(push, "ecr:PutImage", "arn:aws:ecr:us-east-1:123456789012:repository/other")


def test_every_aws_call_of_the_scripts_is_allowed():
    """Every operation of a service the scripts talk to that the scripts or imgclf.aws name (a string such as
    "CreateTrainingJob", or a client method such as invoke_endpoint) is allowed by the scripts' policy or the
    push policy."""
    sources = [*(REPO / "code" / "imgclf" / "cli").glob("*.py"), *(REPO / "code" / "imgclf" / "aws").rglob("*.py")]
    literals = {node.value for source in sources for node in ast.walk(ast.parse(source.read_text()))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
                and re.fullmatch(r"[A-Z][a-z]+[A-Z][A-Za-z0-9]+", node.value)}
    # client methods called by name (client.invoke_endpoint(...)) -> InvokeEndpoint
    literals |= {"".join(w.capitalize() for w in node.attr.split("_")) for source in sources
                 for node in ast.walk(ast.parse(source.read_text()))
                 if isinstance(node, ast.Attribute) and re.fullmatch(r"[a-z]+(_[a-z0-9]+)+", node.attr)}
    clients = {"sagemaker": "sagemaker", "sagemaker-runtime": "sagemaker", "s3": "s3", "logs": "logs",
               "ecr": "ecr", "application-autoscaling": "application-autoscaling"}
    called = {f"{prefix}:{op}" for service, prefix in clients.items() for op in literals & operations(service)}
    assert {"sagemaker:CreateTrainingJob", "sagemaker:InvokeEndpoint", "ecr:CreateRepository",
            "s3:PutObject", "logs:GetLogEvents"} <= called, sorted(called)
    granted = [policy("scripts-policy.json"), policy("push-images-policy.json")]
    missing = sorted(c for c in called if not any(allows(p, ACTION_OF.get(c, c)) for p in granted))
    assert not missing, f"the scripts call actions no policy in docs/iam/ allows: {missing}"
