"""The Dockerfiles against the code, without a Docker engine: lint, COPY sources, entrypoints, locked pins.

What a build would break on is checked here from the files themselves, and the images' contracts run on
this machine: the training image's environment runs the real `train` over the tree `make local-train`
mounts, and bake_weights.py is run the way the image build runs it.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from imgclf import local, models
from imgclf.aws.images import REPOSITORIES
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import FAST_HPS, REPO

BIN = Path(sys.executable).parent
DOCKERFILES = {"train-cpu": "containers/train/Dockerfile.cpu", "train-gpu": "containers/train/Dockerfile.gpu",
               "serve": "containers/serve/Dockerfile"}
# The top-level requirements each image is locked from (CI installs dev.txt, which includes both).
TOP_LEVEL = {"train-cpu": "requirements/train.txt", "train-gpu": "requirements/train.txt",
             "serve": "requirements/serve.txt"}
# The CUDA-only dependencies of PyPI's torch, kept out of the CPU images (make lock excludes them).
CUDA_ONLY = {line.strip() for line in (REPO / "requirements/lock/cuda-only.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}


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


def copy_sources(dockerfile: str) -> list[str]:
    sources = []
    for _, op, args in instructions(dockerfile):
        if op in ("COPY", "ADD") and "--from=" not in args:
            sources += [s for s in shlex.split(args)[:-1] if not s.startswith("--")]
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


def installed_locks(dockerfile: str) -> list[Path]:
    """The requirement files the image pip-installs (-r /tmp/lock/X) with its default TORCH_SOURCE."""
    copied = {Path(s).name: REPO / s for s in copy_sources(dockerfile) if s.startswith("requirements/")}
    names = re.findall(r"-r /tmp/lock/(\S+)", " ".join(a for _, op, a in instructions(dockerfile) if op == "RUN"))
    assert names, f"{dockerfile} installs no requirement file from /tmp/lock"
    source = re.search(r"^ARG TORCH_SOURCE=(\w+)$", (REPO / dockerfile).read_text(), re.M)
    return [copied[n] for n in names if not n.startswith("torch-") or source and n == f"torch-{source.group(1)}.txt"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_hadolint_passes(image):
    result = subprocess.run([BIN / "hadolint", "--config", REPO / ".hadolint.yaml", DOCKERFILES[image]],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The linter and its configuration do reject what they should (unpinned base image and pip packages)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD python -m imgclf\n")
    result = subprocess.run([BIN / "hadolint", "--config", REPO / ".hadolint.yaml", bad], capture_output=True,
                            text=True)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3025"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("image", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(image):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for source in copy_sources(DOCKERFILES[image]):
        path = REPO / source
        assert path.exists(), f"{DOCKERFILES[image]}: COPY {source}: no such file in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            assert not ignored(rel, patterns), f"{rel} is COPY'd by {DOCKERFILES[image]} but .dockerignore drops it"
    assert ignored("tests/conftest.py", patterns) and ignored(".venv/bin/python", patterns)
    assert ignored("code/imgclf/__pycache__/x.pyc", patterns)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_images_are_lean_multi_stage_builds(image):
    dockerfile = DOCKERFILES[image]
    stages = [a for _, op, a in instructions(dockerfile) if op == "FROM"]
    assert len(stages) >= 2 and " AS deps" in stages[0], f"{dockerfile}: build the dependencies in a deps stage"
    assert stages[-1] == "deps", f"{dockerfile}: the image is the dependencies plus small layers (no venv copy)"
    final = final_stage(dockerfile)
    runs = " ".join(a for op, a in final if op == "RUN")
    # A compiler stays only where compile=on needs one (the GPU image); elsewhere it leaves in the step that
    # brought it, so no layer keeps it.
    for _, op, args in instructions(dockerfile):
        if op == "RUN" and re.search(r"apt-get install[^&]*\bgcc\b", args):
            purged = re.search(r"apt-get purge[^&]*\bgcc\b", args)
            assert bool(purged) == (image != "train-gpu"), args
            assert image != "train-gpu" or "g++" in args, "torch.compile needs g++ too"
    installs = re.findall(r"pip install [^&]*", runs)
    assert installs == ["pip install --no-cache-dir --no-deps --no-build-isolation --no-compile /src "], installs
    copies = [args for op, args in final if op == "COPY"]
    assert all(args.split()[-1] == "/opt/torch" for args in copies if "--from=" in args), copies
    # Dependencies before the package: a code or README change leaves their layers as they are.
    package = [i for i, args in enumerate(copies) if "code/imgclf" in args or "README.md" in args]
    assert package and all("--from=" not in args for args in copies[package[0]:]), copies
    weights = [a for _, op, a in instructions(dockerfile) if op == "FROM" and " AS weights" in a]
    assert all(a.startswith("deps ") for a in weights), "baked weights must build from the dependencies only"
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    for _, op, args in instructions(dockerfile):
        if op == "RUN" and "pip install" in args:
            assert "--no-cache-dir" in args, args
    env = final_env(dockerfile)
    assert env.get("PYTHONUNBUFFERED") == "1" and env.get("PYTHONDONTWRITEBYTECODE") == "1", env
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "/opt/ml/model" in runs and "mkdir -p" in runs


@pytest.mark.parametrize("image", ["train-cpu", "train-gpu"])
def test_training_module_is_the_one_local_mode_runs_and_imports(image):
    env = final_env(DOCKERFILES[image])
    assert env["SAGEMAKER_TRAINING_MODULE"] == local.TRAINING_MODULE
    module, _, function = env["SAGEMAKER_TRAINING_MODULE"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    for d in ("input/config", "input/data", "model", "output/data", "checkpoints"):
        assert f"/opt/ml/{d}" in " ".join(a for op, a in final_stage(DOCKERFILES[image]) if op == "RUN")
    # `docker run IMAGE` with no command (the SDK's ModelTrainer local mode) trains.
    assert [a for op, a in final_stage(DOCKERFILES[image]) if op == "CMD"] == ['["train"]']


def test_serve_entrypoint_is_the_serve_script_of_the_serving_tests():
    final = final_stage(DOCKERFILES["serve"])
    entrypoints = [a for op, a in final if op == "ENTRYPOINT"]
    assert entrypoints == ['["serve"]'], f"exec-form ENTRYPOINT [\"serve\"] expected, got {entrypoints}"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("serve") == "imgclf.serving.serve:main", scripts
    # The serving tests start the same `serve` executable (directly, or through imgclf.local's serve command).
    starts_serve = re.compile(r'(venv_bin\("serve"\)|parent / "serve"|BIN / "serve")')
    serving_tests = [p for p in (REPO / "tests").glob("test_*.py")
                     if p.name != Path(__file__).name and starts_serve.search(p.read_text())]
    assert serving_tests, "no serving test starts imgclf.serve or the `serve` script"
    assert importlib.import_module("imgclf.serve").main
    labels = " ".join(a for op, a in final if op == "LABEL")
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels
    runs = " ".join(a for op, a in final if op == "RUN")
    assert re.search(r"openjdk-\d+-jre-headless", runs), "multi-model-server needs a Java runtime"
    assert "EXPOSE 8080" in " ".join(f"{op} {a}" for op, a in final)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_pins_are_the_pins_ci_installs(image):
    """One source of truth: every top-level pin of requirements/*.txt is the version locked in the image."""
    locks = installed_locks(DOCKERFILES[image])
    pins: dict[str, str] = {}
    for lock in locks:
        for name, version in lock_pins(lock).items():
            assert pins.setdefault(name, version) == version, f"{name} locked twice, differently, for {image}"
    for name, req in top_level(REPO / TOP_LEVEL[image]).items():
        assert name in pins, f"{name} ({TOP_LEVEL[image]}) is not in {image}'s locks: run `make lock`"
        locked = Version(pins[name])
        if str(req.specifier).startswith("=="):
            assert locked.public == Version(str(req.specifier)[2:]).public, f"{name} {locked} vs {req}: make lock"
        else:
            assert req.specifier.contains(locked.public), f"{image}: {name} {locked} does not satisfy {req}"
    cuda = sorted(n for n in pins if n in CUDA_ONLY)
    if image == "train-gpu":
        assert "torch" in pins and cuda, "the GPU image installs PyPI's CUDA build of torch with its CUDA wheels"
    elif image == "serve":  # the exported graph runs on ONNX Runtime: no torch, no CUDA, nothing that needs them
        assert "onnxruntime" in pins and not {"torch", "torchvision", "timm", "safetensors"} & set(pins), pins
        assert not cuda, cuda
    else:
        assert pins["torch"].endswith("+cpu") and pins["torchvision"].endswith("+cpu") and not cuda, cuda
    dev = (REPO / "requirements/dev.txt").read_text().split()
    assert "train.txt" in dev and "serve.txt" in dev  # CI installs dev.txt: the same top-level pins


@pytest.mark.parametrize("lock", ["build.txt", "train-cpu.txt", "train-gpu.txt", "serve-cpu.txt"])
def test_locks_are_hashed_and_made_by_make_lock(lock):
    text = (REPO / "requirements/lock" / lock).read_text()
    assert "#    make lock" in text.splitlines()[1], "regenerate with `make lock`"
    entries = re.split(r"\n(?=[A-Za-z])", text.split("\n", 2)[2])
    for entry in entries:
        if "==" in entry.splitlines()[0]:
            assert "--hash=sha256:" in entry, f"{lock}: {entry.splitlines()[0]} has no hash"
    makefile = (REPO / "Makefile").read_text()
    assert f"-o requirements/lock/{lock}" in makefile


def test_torch_locks_are_up_to_date(tmp_path):
    subprocess.run([sys.executable, "containers/torch_locks.py", "requirements/base.txt",
                    "requirements/lock/train-gpu.txt", tmp_path], check=True, cwd=REPO)
    for name in ("torch-cpu.txt", "torch-pypi.txt"):
        assert (tmp_path / name).read_text() == (REPO / "requirements/lock" / name).read_text(), "run `make lock`"
    pypi = lock_pins(REPO / "requirements/lock/torch-pypi.txt")
    assert set(pypi) == {"torch", "torchvision"} | CUDA_ONLY, "PyPI's torch with exactly its CUDA wheels"
    assert pypi == {n: v for n, v in lock_pins(REPO / "requirements/lock/train-gpu.txt").items() if n in pypi}
    entries = re.split(r"\n(?=[A-Za-z])", (REPO / "requirements/lock/torch-pypi.txt").read_text())
    assert all("--hash=sha256:" in e for e in entries if "==" in e.splitlines()[0])


@pytest.mark.parametrize("image", ["train-cpu"])
def test_cpu_images_can_take_pypis_torch_and_share_the_gpu_images_torch_layer(image):
    """TORCH_SOURCE=pypi (no PyTorch CPU index): the same torch install step, text for text, as the GPU image."""
    def torch_step(dockerfile):
        ins = [(op, a) for _, op, a in instructions(dockerfile)]
        end = next(i for i, (op, a) in enumerate(ins) if op == "RUN" and "torch-pypi.txt" in a)
        return [(op, a) for op, a in ins[:end + 1] if op != "ARG"]
    assert torch_step(DOCKERFILES[image]) == torch_step(DOCKERFILES["train-gpu"])
    result = subprocess.run(["make", "-n", f"build-{image}", "TORCH_SOURCE=pypi"], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert "--build-arg TORCH_SOURCE=pypi" in result.stdout and "--platform linux/amd64" in result.stdout


def test_makefile_builds_images_under_the_ecr_repository_names():
    result = subprocess.run(["make", "-n", "build", "TAG=t1"], cwd=REPO, capture_output=True, text=True, check=True)
    for image, repository in REPOSITORIES.items():
        assert f"-f {DOCKERFILES[image]} -t {repository}:t1 -t {repository}:latest" in result.stdout
    bad = subprocess.run(["make", "build-nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "no image 'nope'" in bad.stdout


def test_local_tree_runs_the_training_image_environment(tmp_path, sample_dataset):
    """`make local-train`'s tree: self-contained (no links out), and the image's `train` + ENV train over it."""
    tree = tmp_path / "opt_ml"
    hps = {**FAST_HPS, "epochs": "1", "image-size": "32"}
    cmd = [sys.executable, REPO / "containers/local_tree.py", tree, "--data", sample_dataset]
    subprocess.run(cmd + [f"--hp={k}={v}" for k, v in hps.items()], check=True, cwd=REPO, capture_output=True)
    assert not [p for p in tree.rglob("*") if p.is_symlink()]
    assert json.loads((tree / "input/config/hyperparameters.json").read_text()) == hps
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode != 0 and "--clean" in again.stderr
    env = {**os.environ, **final_env(DOCKERFILES["train-cpu"]), "SAGEMAKER_BASE_DIR": str(tree),
           "TORCH_HOME": str(tmp_path / "torch"), "IMGCLF_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(["train"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tree / "model" / "config.json").is_file() and (tree / "model" / "model.safetensors").is_file()


def test_gpu_instance_without_usable_cuda_fails_in_its_first_seconds(tmp_path, sample_dataset):
    """resourceconfig.json says ml.g5.xlarge (NVIDIA A10G), and this machine's torch cannot use CUDA: the job
    stops before training, with the reason in output/failure, instead of training on the CPU for hours."""
    tree = tmp_path / "opt_ml"
    cmd = [sys.executable, REPO / "containers/local_tree.py", tree, "--data", sample_dataset]
    subprocess.run(cmd + [f"--hp={k}={v}" for k, v in FAST_HPS.items()], check=True, cwd=REPO, capture_output=True)
    resources = tree / "input/config/resourceconfig.json"
    resources.write_text(json.dumps({**json.loads(resources.read_text()), "current_instance_type": "ml.g5.xlarge"}))
    env = {**os.environ, **final_env(DOCKERFILES["train-gpu"]), "SAGEMAKER_BASE_DIR": str(tree),
           "IMGCLF_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(["train"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    failure = (tree / "output" / "failure").read_text()
    assert failure.startswith("CudaUnusableError: this ml.g5.xlarge has NVIDIA GPUs"), failure
    assert "epoch=" not in result.stdout and not (tree / "model" / "model.safetensors").exists()


def test_bake_weights_puts_files_where_training_finds_them(tmp_path, monkeypatch, caplog):
    for image in ("train-cpu", "train-gpu"):
        assert final_env(DOCKERFILES[image])["TORCH_HOME"] == "/opt/torch"
        assert "PRETRAINED_MODELS" in (REPO / DOCKERFILES[image]).read_text()
    script = REPO / "containers/train/bake_weights.py"
    # A file already in place (as a finished download would be) is checked by loading it like training does.
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(models.build_backbone("resnet18").state_dict(), target)
    ok = subprocess.run([sys.executable, script, "resnet18"], env={**os.environ, "TORCH_HOME": str(tmp_path)},
                        capture_output=True, text=True)  # as the image build runs it
    assert ok.returncode == 0 and f"baked ({target})" in ok.stderr, ok.stderr

    spec = importlib.util.spec_from_file_location("bake_weights", script)
    bake_weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bake_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger="bake_weights")
    torch.save({"fc.weight": torch.zeros(3, 3)}, target)  # not resnet18's weights
    assert bake_weights.main(["resnet18"]) == 2
    assert "does not fit architecture resnet18" in caplog.text
    assert bake_weights.main(["resnet9000"]) == 2
    assert "not a torchvision classification model" in caplog.text
    assert bake_weights.main([]) == 0 and "no pretrained weights baked" in caplog.text
