"""The Dockerfiles and locks as the tests read them: instructions, final stages, environments, pins."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

from packaging.requirements import Requirement

from tests.conftest import REPO

DOCKERFILES = {"train-cpu": "containers/train/Dockerfile.cpu", "train-gpu": "containers/train/Dockerfile.gpu",
               "serve": "containers/serve/Dockerfile", "serve-gpu": "containers/serve/Dockerfile"}


def makefile_build_args() -> dict[str, dict[str, str]]:
    """image -> the --build-arg NAME=VALUE pairs the Makefile's build_args_<image> passes (serve-gpu's LOCK...)."""
    found = re.findall(r"^build_args_(\S+) := (.*)$", (REPO / "Makefile").read_text(), re.M)
    return {image: dict(a.split("=", 1) for a in re.findall(r"--build-arg (\S+)", args)) for image, args in found}


BUILD_ARGS = makefile_build_args()


# The top-level requirements each image is locked from (CI installs dev.txt, which includes both).
TOP_LEVEL = {"train-cpu": "requirements/train.txt", "train-gpu": "requirements/train.txt",
             "serve": "requirements/serve.txt", "serve-gpu": "requirements/serve-gpu.txt"}


def names(path: str) -> set[str]:
    lines = (line.strip() for line in (REPO / path).read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


# The CUDA-only dependencies of PyPI's torch, kept out of the CPU images (make lock excludes them).
CUDA_ONLY = names("requirements/lock/cuda-only.txt")
# The CPU build of ONNX Runtime, which the GPU serving image's lock leaves out for onnxruntime-gpu.
CPU_ONLY = names("requirements/lock/cpu-only.txt")


def arg_defaults(dockerfile: str) -> dict[str, str]:
    """NAME -> default of every `ARG NAME=default` (several on one line too)."""
    defaults = {}
    for _, op, args in instructions(dockerfile):
        if op == "ARG":
            defaults.update(item.split("=", 1) for item in shlex.split(args) if "=" in item)
    return defaults


def expand(text: str, dockerfile: str, image: str | None = None) -> str:
    """${NAME} and $NAME as the build of `image` sees them: its Makefile build arguments, else the ARG defaults."""
    values = {**arg_defaults(dockerfile), **BUILD_ARGS.get(image or "", {})}
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def instructions(dockerfile: str) -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / dockerfile).read_text())
    out, stage = [], -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            stage += 1
        out.append((stage, op, " ".join(args.split())))
    return out


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last = max(s for s, _, _ in ins)
    return [(op, args) for s, op, args in ins if s == last]


def env_of(args_list: list[str]) -> dict[str, str]:
    env = {}
    for args in args_list:
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def final_env(dockerfile: str) -> dict[str, str]:
    """The final image's environment, with what it inherits from the stages it is built FROM."""
    ins = instructions(dockerfile)
    names = {a.split()[-1]: s for s, op, a in ins if op == "FROM" and " AS " in a}
    chain, stage = [], max(s for s, _, _ in ins)
    while stage is not None:
        chain.insert(0, stage)
        parent = next(a.split()[0] for s, op, a in ins if s == stage and op == "FROM")
        stage = names.get(parent)
    return env_of([a for s, op, a in ins if op == "ENV" and s in chain])


def copy_sources(dockerfile: str, image: str | None = None) -> list[str]:
    """What the build context gives the COPY and ADD instructions, with `image`'s build arguments (expand)."""
    sources = []
    for _, op, args in instructions(dockerfile):
        if op in ("COPY", "ADD") and "--from=" not in args:
            sources += [expand(s, dockerfile, image) for s in shlex.split(args)[:-1] if not s.startswith("--")]
    return sources


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins, a pattern matching a parent folder matches."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        pat = pattern.removeprefix("!")
        if pat.startswith("**/"):  # at any depth
            hit = any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pat[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) for p in prefixes)
        if hit:
            result = not pattern.startswith("!")
    return result


def lock_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;\\]+)", line)
        if m:
            pins[Requirement(m.group(1)).name.lower().replace("_", "-")] = m.group(2)
    return pins


def top_level(path: Path) -> dict[str, Requirement]:
    """Every requirement of a requirements file, following -r includes."""
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            reqs.update(top_level(path.parent / line[3:].strip()))
        elif line and not line.startswith("-"):
            req = Requirement(line)
            reqs[req.name.lower().replace("_", "-")] = req
    return reqs


def installed_locks(dockerfile: str, image: str | None = None) -> list[Path]:
    """The requirement files the image pip-installs (-r /tmp/lock/X) with its default TORCH_SOURCE and the
    Makefile's build arguments for `image`."""
    copied = {Path(s).name: REPO / s for s in copy_sources(dockerfile, image) if s.startswith("requirements/")}
    runs = " ".join(a for _, op, a in instructions(dockerfile) if op == "RUN")
    names = re.findall(r"-r /tmp/lock/(\S+)", expand(runs, dockerfile, image))
    assert names, f"{dockerfile} installs no requirement file from /tmp/lock"
    source = re.search(r"^ARG TORCH_SOURCE=(\w+)$", (REPO / dockerfile).read_text(), re.M)
    return [copied[n] for n in names if not n.startswith("torch-") or source and n == f"torch-{source.group(1)}.txt"]
