"""The Dockerfiles, locks and entrypoints read as files: stages, pins, hashes, copy sources, entrypoints."""

from __future__ import annotations

import importlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from imgclf import instances, local
from packaging.version import Version

from tests.conftest import REPO
from tests.dockerfiles import (
    BUILD_ARGS,
    CPU_ONLY,
    CUDA_ONLY,
    DOCKERFILES,
    TOP_LEVEL,
    copy_sources,
    final_env,
    final_stage,
    ignored,
    installed_locks,
    instructions,
    lock_pins,
    top_level,
)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(image):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for source in copy_sources(DOCKERFILES[image], image):
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
    # The dependencies in a deps stage; the training images start it from their shared torch stage.
    first = 1 if image.startswith("train-") else 0
    assert image.startswith("serve") or stages[0].endswith(" AS torch"), f"{dockerfile}: torch in a stage of its own"
    assert len(stages) >= 2 and " AS deps" in stages[first], f"{dockerfile}: build the dependencies in a deps stage"
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
    env = final_env(dockerfile)
    for _, op, args in instructions(dockerfile):  # no installer leaves its download cache in a layer
        for install in re.findall(r"(?:uv )?pip install [^&;]*", args) if op == "RUN" else ():
            assert "--no-cache-dir" in install or install.startswith("uv ") and env.get("UV_NO_CACHE") == "1", install
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
    serving_tests = [p for p in (REPO / "tests").rglob("test_*.py")
                     if p.name != Path(__file__).name and starts_serve.search(p.read_text())]
    assert serving_tests, "no serving test starts imgclf.serve or the `serve` script"
    assert importlib.import_module("imgclf.serve").main
    labels = " ".join(a for op, a in final if op == "LABEL")
    assert "com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true" in labels
    assert "com.amazonaws.sagemaker.capabilities.multi-models=true" in labels  # SageMaker requires it for MME
    runs = " ".join(a for op, a in final if op == "RUN")
    assert re.search(r"openjdk-\d+-jre-headless", runs), "multi-model-server needs a Java runtime"
    assert "EXPOSE 8080" in " ".join(f"{op} {a}" for op, a in final)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_image_pins_are_the_pins_ci_installs(image):
    """One source of truth: every top-level pin of requirements/*.txt is the version locked in the image."""
    locks = installed_locks(DOCKERFILES[image], image)
    pins: dict[str, str] = {}
    for lock in locks:
        for name, version in lock_pins(lock).items():
            assert pins.setdefault(name, version) == version, f"{name} locked twice, differently, for {image}"
    assert_locked(TOP_LEVEL[image], pins, image, excluded=CPU_ONLY if image == "serve-gpu" else set())
    cuda = sorted(n for n in pins if n in CUDA_ONLY)
    if image == "train-gpu":
        assert "torch" in pins and cuda, "the GPU image installs PyPI's CUDA build of torch with its CUDA wheels"
    elif image == "serve":  # the exported graph runs on ONNX Runtime: no torch, no CUDA, nothing that needs them
        assert "onnxruntime" in pins and not {"torch", "torchvision", "timm", "safetensors"} & set(pins), pins
        assert not cuda, cuda
    elif image == "serve-gpu":  # ONNX Runtime's CUDA build (one `onnxruntime` module: never both), still no torch
        assert "onnxruntime-gpu" in pins and "onnxruntime" not in pins, pins
        assert not {"torch", "torchvision", "timm", "safetensors", "triton"} & set(pins), pins
        assert {"nvidia-cublas", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-curand"} \
            <= set(cuda), cuda
    else:
        assert pins["torch"].endswith("+cpu") and pins["torchvision"].endswith("+cpu") and not cuda, cuda


def assert_locked(requirements: str, pins: dict[str, str], what: str, excluded: set[str] = frozenset()) -> None:
    """Every requirement of requirements/X.txt (following -r) has a locked version that satisfies it, but those
    `make lock` excludes from the lock (--excludes)."""
    for name, req in top_level(REPO / requirements).items():
        if name in excluded:
            assert name not in pins, f"{name} is excluded from {what}'s lock, yet locked: run `make lock`"
            continue
        assert name in pins, f"{name} ({requirements}) is not in {what}'s locks: run `make lock`"
        locked = Version(pins[name])
        if str(req.specifier).startswith("=="):
            assert locked.public == Version(str(req.specifier)[2:]).public, f"{name} {locked} vs {req}: make lock"
        else:
            assert req.specifier.contains(locked.public), f"{what}: {name} {locked} does not satisfy {req}"


def test_the_development_environment_runs_the_images_versions():
    """make install (so CI) installs requirements/lock/dev.txt: every top-level pin, and each package at the
    version of the image locks that have it, except where those locks differ among themselves (protobuf)."""
    pins = lock_pins(REPO / "requirements/lock/dev.txt")
    dev = (REPO / "requirements/dev.txt").read_text().split()
    assert "train.txt" in dev and "serve.txt" in dev and "scripts.txt" in dev
    assert_locked("requirements/dev.txt", pins, "the development environment")
    images = [lock_pins(REPO / "requirements/lock" / name) for name in ("train-gpu.txt", "serve-cpu.txt")]
    for name, version in pins.items():
        locked = {image[name] for image in images if name in image}
        assert len(locked) != 1 or locked == {version}, f"{name}: {version} in dev.txt, {locked} in the images"
    assert {"torch", "onnxruntime", "sagemaker-training", "multi-model-server"} <= set(pins)
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"\$\(VENV\)/\.installed: .*requirements/lock/dev\.txt", makefile)
    assert "--require-hashes" in makefile.split("$(VENV)/.installed:")[1].split("touch $@")[0]


@pytest.mark.parametrize("lock", ["build.txt", "train-cpu.txt", "train-gpu.txt", "serve-cpu.txt", "dev.txt",
                                  "train-gpu-cu128.txt", "serve-gpu.txt"])
def test_locks_are_hashed_and_made_by_make_lock(lock):
    text = (REPO / "requirements/lock" / lock).read_text()
    assert "#    make lock" in text.splitlines()[1], "regenerate with `make lock`"
    entries = re.split(r"\n(?=[A-Za-z])", text.split("\n", 2)[2])
    for entry in entries:
        if "==" in entry.splitlines()[0]:
            assert "--hash=sha256:" in entry, f"{lock}: {entry.splitlines()[0]} has no hash"
    makefile = (REPO / "Makefile").read_text()
    assert f"-o requirements/lock/{lock}" in makefile


def test_the_gpu_serving_image_is_the_serving_image_on_the_gpu_lock():
    """make build-serve-gpu: the serving Dockerfile with LOCK=serve-gpu (labelled GPU); make build-serve: its
    defaults, the CPU lock (labelled CPU). The GPU lock is the CPU one with onnxruntime-gpu for onnxruntime: every
    other version the same, and its CUDA wheels the GPU training image's (one download, one cache)."""
    assert DOCKERFILES["serve-gpu"] == DOCKERFILES["serve"] and "serve" not in BUILD_ARGS
    assert BUILD_ARGS["serve-gpu"] == {"LOCK": "serve-gpu", "DEVICE": "GPU", "TITLE": "imgclf-serve-gpu"}
    labels = " ".join(a for op, a in final_stage(DOCKERFILES["serve"]) if op == "LABEL")
    assert 'org.opencontainers.image.description="SageMaker inference image (${DEVICE})' in labels
    assert 'org.opencontainers.image.title="${TITLE}"' in labels
    assert [p.name for p in installed_locks(DOCKERFILES["serve"])] == ["build.txt", "serve-cpu.txt"]
    assert [p.name for p in installed_locks(DOCKERFILES["serve-gpu"], "serve-gpu")] == ["build.txt", "serve-gpu.txt"]
    locks = REPO / "requirements/lock"
    cpu, gpu = lock_pins(locks / "serve-cpu.txt"), lock_pins(locks / "serve-gpu.txt")
    assert {n: v for n, v in gpu.items() if n in cpu} == {n: v for n, v in cpu.items() if n != "onnxruntime"}
    assert set(cpu) - set(gpu) == CPU_ONLY == {"onnxruntime"}
    train_gpu = lock_pins(locks / "train-gpu.txt")
    extra = {n: v for n, v in gpu.items() if n not in cpu}
    assert extra.pop("onnxruntime-gpu") == str(top_level(REPO / "requirements/serve-gpu.txt")["onnxruntime-gpu"]
                                               .specifier)[2:]
    assert extra and extra == {n: train_gpu[n] for n in extra}, "CUDA wheels other than the GPU training lock's"
    makefile = (REPO / "Makefile").read_text()
    assert "--excludes requirements/lock/cpu-only.txt" in makefile.split("-o requirements/lock/serve-gpu.txt")[0]


def torch_locks():
    """containers/torch_locks.py (what `make lock` runs), imported in this process."""
    spec = importlib.util.spec_from_file_location("torch_locks", REPO / "containers/torch_locks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("build", instances.GPU_BUILDS, ids=lambda b: b.name)
def test_each_gpu_build_installs_its_torch_lock(build):
    """imgclf.instances.GPU_BUILDS, the training Dockerfiles' TORCH_SOURCE, the locks and the Makefile agree."""
    lock = f"requirements/lock/torch-{build.torch_source}.txt"
    for image in ("train-cpu", "train-gpu"):  # the torch stage is the same text in both
        assert lock in copy_sources(DOCKERFILES[image])
        runs = " ".join(a for _, op, a in instructions(DOCKERFILES[image]) if op == "RUN")
        assert f"{build.torch_source}) uv pip install --no-deps --require-hashes -r /tmp/lock/{Path(lock).name} ;;" \
            in runs, f"{DOCKERFILES[image]}: TORCH_SOURCE={build.torch_source} must install {lock}"
    default = re.search(r"^ARG TORCH_SOURCE=(\S+)$", (REPO / DOCKERFILES["train-gpu"]).read_text(), re.M)
    assert default and default.group(1) == instances.DEFAULT_BUILD.torch_source
    entries = torch_locks().lock_entries(REPO / lock)
    pins = lock_pins(REPO / lock)
    assert pins["torch"] == build.torch and torch_locks().cuda_line(entries) == build.cuda, (lock, build)
    makefile = (REPO / "Makefile").read_text()
    assert f"gpu_torch_source_{build.name} := {build.torch_source}\n" in makefile
    if build.suffix:  # its own targets, its own tags (scripts/train.py --image-tag latest-cu128)
        assert f"build-train-gpu-{build.name}:" in makefile and f"push-train-gpu-{build.name}:" in makefile
        assert build.suffix == f"-{build.name}" and "tag_suffix_train-gpu = $(gpu_tag_suffix)" in makefile


def test_the_cu128_build_is_locked_like_the_default_one(tmp_path):
    """torch-pypi-cu128.txt + train-cpu.txt (what the cu128 build installs) = train-gpu-cu128.txt: requirements/
    train.txt with requirements/torch-cu128.txt's torch, every other package at the default images' version."""
    locks = REPO / "requirements/lock"
    torch_lock, gpu_lock, rest = locks / "torch-pypi-cu128.txt", locks / "train-gpu-cu128.txt", locks / "train-cpu.txt"
    pins: dict[str, str] = {}
    for lock in (torch_lock, rest):
        for name, version in lock_pins(lock).items():
            assert pins.setdefault(name, version) == version, f"{name} locked twice, differently, for the cu128 build"
    assert pins == lock_pins(gpu_lock), "run `make lock`"
    overrides = top_level(REPO / "requirements/torch-cu128.txt")
    build = next(b for b in instances.GPU_BUILDS if b.torch_source == "pypi-cu128")
    assert set(overrides) == {"torch", "torchvision"} and str(overrides["torch"].specifier) == f"=={build.torch}"
    for name, req in top_level(REPO / "requirements/train.txt").items():
        wanted = overrides.get(name, req).specifier
        assert wanted.contains(pins[name]), f"{name} {pins[name]} vs {wanted}: make lock"
    cuda = [n for n in lock_pins(torch_lock) if n.startswith("nvidia-")]
    assert cuda and all(n.endswith("-cu12") for n in cuda), cuda  # the CUDA 12 wheels, none of CUDA 13's
    assert not set(cuda) & set(lock_pins(locks / "train-gpu.txt"))
    torch_locks().write_variant(str(gpu_lock.relative_to(REPO)), str(rest.relative_to(REPO)), tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == torch_lock.read_text(), "run `make lock`"
    entries = re.split(r"\n(?=[A-Za-z])", torch_lock.read_text())
    assert all("--hash=sha256:" in e for e in entries if "==" in e.splitlines()[0])
    makefile = (REPO / "Makefile").read_text()
    assert "--overrides requirements/torch-cu128.txt" in makefile
    assert "-c requirements/lock/train-cpu.txt -o requirements/lock/train-gpu-cu128.txt" in makefile
