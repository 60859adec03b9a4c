"""The Dockerfiles against the code, without a Docker engine: lint, COPY sources, entrypoints, locked pins.

What a build would break on is checked here from the files themselves, and the images' contracts run on
this machine: the training image's environment runs the real `train` over the tree `make local-train`
mounts, and bake_weights.py is run the way the image build runs it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from imgclf import models
from imgclf.aws.images import REPOSITORIES

from tests.conftest import FAST_HPS, REPO, TINY_HPS
from tests.dockerfiles import (
    CUDA_ONLY,
    DOCKERFILES,
    final_env,
    instructions,
    lock_pins,
)

BIN = Path(sys.executable).parent


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
    # make build: the shared torch stage once, before the two training builds that run side by side on it.
    both = subprocess.run(["make", "-n", "build", "TORCH_SOURCE=pypi", "BUILD_JOBS=3"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    assert "-j3 --output-sync=target" in both
    assert both.count("--target torch") == 1
    for name in ("train-cpu", "train-gpu"):
        assert both.index("--target torch") < both.index(f"-f {DOCKERFILES[name]} -t")
    assert "--target torch" not in subprocess.run(["make", "-n", "build"], cwd=REPO, capture_output=True,
                                                  text=True, check=True).stdout


def test_makefile_builds_images_under_the_ecr_repository_names():
    result = subprocess.run(["make", "-n", "build", "TAG=t1"], cwd=REPO, capture_output=True, text=True, check=True)
    for image, repository in REPOSITORIES.items():
        assert f"-f {DOCKERFILES[image]} -t {repository}:t1 -t {repository}:latest" in result.stdout
    bad = subprocess.run(["make", "build-nope"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and f"no image 'nope'; images: {' '.join(REPOSITORIES)}\n" in bad.stdout
    # One serving Dockerfile: the GPU image is its build on the GPU lock, the CPU image its defaults.
    serve_gpu = "--build-arg LOCK=serve-gpu --build-arg DEVICE=GPU --build-arg TITLE=imgclf-serve-gpu"
    assert serve_gpu in result.stdout.split(f"-t {REPOSITORIES['serve-gpu']}:t1")[1].split(" .\n")[0]
    serve = subprocess.run(["make", "-n", "build-serve"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "LOCK=" not in serve.stdout and "DEVICE=" not in serve.stdout


def test_local_tree_runs_the_training_image_environment(tmp_path, sample_dataset):
    """`make local-train`'s tree: self-contained (no links out), and the image's `train` + ENV train over it."""
    tree = tmp_path / "opt_ml"
    hps = {**TINY_HPS, "epochs": "1", "image-size": "32"}
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
