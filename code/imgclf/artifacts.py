"""The model directory contract (weights + config.json) shared by training and serving; every file of it is
written atomically (imgclf.atomic).

config.json carries everything serving needs to rebuild the model and prepare images exactly as
evaluation did: architecture, class names in index order, image size, resize size, normalisation.
"""

from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf import atomic
from imgclf.errors import WeightsError
from imgclf.preprocessing import CROP_MODES, CROP_PCTS, INTERPOLATIONS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

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
    """config.json, checked field by field (WeightsError naming the field): every model artifact is untrusted."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing: the model directory must be a training output "
                           f"({CONFIG_FILE} + {WEIGHTS_FILE}) or model.tar.gz extracted") from None
    except OSError as e:
        raise WeightsError(f"cannot read {path} ({e.strerror or e})") from None
    except RecursionError:
        raise WeightsError(f"{path} is not the config.json training writes (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise WeightsError(f"{path} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path} is not the config.json training writes (a JSON object)")
    required = ("architecture", "class_names", "image_size", "resize_size", "mean", "std")
    missing = [k for k in required if k not in config]
    if missing:
        raise WeightsError(f"{path} lacks {', '.join(missing)}; retrain with this version of the training code")
    problems = config_problems(config)
    if problems:
        raise WeightsError(f"{path} is not usable: {'; '.join(problems)}. Use the config.json that training (or "
                           "python -m imgclf.export) wrote beside the weights")
    return config


def config_problems(config: dict) -> list[str]:
    """What is wrong with config.json's fields (types and bounds: serving sizes its buffers from them)."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    problems = []
    names = config["class_names"]
    if not isinstance(config["architecture"], str) or not config["architecture"]:
        problems.append(f"architecture {str(config['architecture'])[:50]!r} is not a model name")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        problems.append("class_names must be a list of class folder names, in index order")
    elif len(set(names)) != len(names):
        problems.append("class_names repeats a name")
    size, crop_pct = config["image_size"], config.get("crop_pct")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        problems.append(f"image_size {str(size)[:20]} is not a side of {MIN_IMAGE_SIZE}-{MAX_IMAGE_SIZE} pixels")
    if crop_pct is not None and not (number(crop_pct) and CROP_PCTS[0] <= crop_pct <= CROP_PCTS[1]):
        problems.append(f"crop_pct {str(crop_pct)[:20]} is not a ratio of {CROP_PCTS[0]}-{CROP_PCTS[1]}")
    for key in ("mean", "std"):
        values = config[key]
        if not (isinstance(values, list) and len(values) == 3 and all(number(v) for v in values)) or (
                key == "std" and min(values) <= 0):
            problems.append(f"{key} {str(values)[:60]} is not 3 numbers (one per RGB channel"
                            f"{', each above 0' if key == 'std' else ''})")
    for key, choices in (("interpolation", INTERPOLATIONS), ("crop_mode", CROP_MODES)):
        if key in config and config[key] not in choices:
            problems.append(f"{key} {str(config[key])[:20]!r} is not one of {', '.join(choices)}")
    exported = config.get("onnx")
    if exported is not None and not (isinstance(exported, dict) and isinstance(exported.get("int8") or {}, dict)):
        problems.append("onnx is not the export's record (a JSON object)")
    return problems


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
