"""The model directory contract (weights + config.json) shared by training and serving; every file of it is
written atomically (imgclf.atomic).

config.json carries everything serving needs to rebuild the model and prepare images exactly as
evaluation did: architecture, class names in index order, image size, resize size, normalisation.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf import atomic
from imgclf.errors import WeightsError

if TYPE_CHECKING:  # torch is imported where weights are read or written: the slim serving image has none
    from torch import nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"  # the exported graph (imgclf.export); the weights above stay the source of truth
FORMAT_VERSION = 1


def extract(tar: tarfile.TarFile, dest: str | os.PathLike) -> None:
    """Extract an untrusted archive: plain files and folders inside `dest` only (no absolute paths, `..`, links
    or devices). tarfile's "data" filter does this from Python 3.11.4; Debian 12's Python 3.11.2, in the
    images, lacks it, so the same rule is applied here before extracting."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = Path(dest).resolve()
    for member in tar.getmembers():
        inside = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or (inside != root and root not in inside.parents):
            raise tarfile.TarError(f"{member.name!r} is not a plain file or folder inside the archive; refused")
    tar.extractall(dest)


def save_model(model_dir: str | os.PathLike, model: nn.Module, config: dict) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(Path(model_dir) / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    atomic.write_json(Path(model_dir) / CONFIG_FILE, {"format_version": FORMAT_VERSION, **config})


def read_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing: the model directory must be a training output "
                           f"({CONFIG_FILE} + {WEIGHTS_FILE}) or model.tar.gz extracted") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None
    required = ("architecture", "class_names", "image_size", "resize_size", "mean", "std")
    missing = [k for k in required if k not in config]
    if missing:
        raise WeightsError(f"{path} lacks {', '.join(missing)}; retrain with this version of the training code")
    return config


def load_model(model_dir: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the architecture from config.json and load the safetensors weights (no pickle), in eval mode."""
    from safetensors.torch import load_file

    from imgclf.models import build_model

    config = read_config(model_dir)
    model, _ = build_model(config["architecture"], len(config["class_names"]))
    path = Path(model_dir) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing next to {CONFIG_FILE}") from None
    except Exception as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not match config.json (architecture {config['architecture']}, "
                           f"{len(config['class_names'])} classes): {str(e).splitlines()[0]}") from None
    return model.eval(), config


def torch_save(path: str | os.PathLike, obj) -> None:
    import torch

    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)
