"""Backbone registry (torchvision's), new heads, pretrained-weight loading and freezing.

Pretrained weights never need the network: they come from a file (the `weights` channel or a path), from
a TORCH_HOME cache (baked into the image), and only when allowed from torchvision's download.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from imgclf.errors import HyperparameterError, WeightsError

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def available_models() -> list[str]:
    return models.list_models(module=models)


def check_model_name(name: str) -> None:
    if name not in available_models():
        raise HyperparameterError(
            f"hyperparameter model={name!r} is not a torchvision classification model; choose one of "
            + ", ".join(available_models())
        )


def _classifier_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that output ImageNet's 1000 classes (main head and any auxiliary heads)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == IMAGENET_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == IMAGENET_CLASSES)
    ]


def _new_layer(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes)
    return nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)


def build_backbone(name: str) -> nn.Module:
    """The ImageNet architecture with random weights (auxiliary heads off: they only serve Inception training)."""
    check_model_name(name)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    return models.get_model(name, weights=None, **kwargs)


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Swap every 1000-class layer for a new `num_classes` one; return their module names (the head)."""
    layers = _classifier_layers(model)
    if not layers:
        raise HyperparameterError(f"cannot find the classification layer of {type(model).__name__}")
    for name, old in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _new_layer(old, num_classes))
    return [name for name, _ in layers]


def build_model(name: str, num_classes: int) -> tuple[nn.Module, list[str]]:
    model = build_backbone(name)
    return model, replace_head(model, num_classes)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or torch.load(weights_only=True), never arbitrary pickles."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights file {path}: {type(e).__name__}: {e}. "
                           "Give a torchvision state_dict (.pth) or a .safetensors file.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state_dict (a mapping of names to tensors)")
    return state


def torch_home_weights(name: str) -> Path:
    """Where torchvision caches `name`'s default ImageNet weights (TORCH_HOME/hub/checkpoints/<file>)."""
    url = models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def find_weights_file(name: str, weights_dir: Path | None) -> tuple[Path | None, list[str]]:
    """First weights file found for `name` offline, and every place that was looked at."""
    looked = []
    if weights_dir is not None:
        looked.append(f"weights channel {weights_dir}")
        if weights_dir.is_file():
            return weights_dir, looked
        if weights_dir.is_dir():
            files = sorted(p for p in weights_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
            named = [p for p in files if p.name.startswith(name)]
            if named or len(files) == 1:
                return (named or files)[0], looked
            if files:
                raise WeightsError(f"weights channel {weights_dir} holds several weight files "
                                   f"({', '.join(p.name for p in files)}) and none starts with {name!r}")
    cached = torch_home_weights(name)
    looked.append(f"TORCH_HOME cache {cached}")
    return (cached if cached.is_file() else None), looked


def load_pretrained(model: nn.Module, name: str, weights_dir: Path | None, download: bool) -> str:
    """Load ImageNet weights into the still 1000-class `model`; return where they came from."""
    path, looked = find_weights_file(name, weights_dir)
    if path is None:
        if not download:
            raise WeightsError(
                f"pretrained weights for {name} not found offline; looked in: {'; '.join(looked)}. "
                f"Put the torchvision state_dict file in a 'weights' channel (local mode: --weights FILE), "
                f"bake it into the image's TORCH_HOME, set download-weights=true (needs internet), "
                f"or set pretrained=false"
            )
        state = models.get_model_weights(name).DEFAULT.get_state_dict(progress=False)
        source = "torchvision download"
    else:
        state = read_state_dict(path)
        source = str(path)
    if name in ("inception_v3", "googlenet"):  # built without the auxiliary heads
        state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise WeightsError(f"weights file {source} does not fit architecture {name}: {' '.join(first)}. "
                           f"Give the torchvision weights of {name} itself.") from None
    log.info("pretrained %s weights loaded from %s", name, source)
    return source


def set_trainable(model: nn.Module, head: list[str], backbone_trains: bool) -> None:
    """Backbone frozen -> no gradients; its BatchNorm/Dropout layers are put in eval by `train_mode`."""
    head_params = {id(p) for h in head for p in model.get_submodule(h).parameters()}
    for p in model.parameters():
        p.requires_grad = backbone_trains or id(p) in head_params


def train_mode(model: nn.Module, head: list[str], backbone_trains: bool) -> None:
    """model.train(), except a frozen backbone stays in eval mode so its BatchNorm statistics do not drift."""
    model.train(backbone_trains)
    for h in head:
        model.get_submodule(h).train()


def param_groups(model: nn.Module, head: list[str], lr: float, backbone_lr_factor: float) -> list[dict]:
    head_ids = {id(p) for h in head for p in model.get_submodule(h).parameters()}
    head_params = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return [{"params": head_params, "lr": lr, "name": "head"},
            {"params": backbone, "lr": lr * backbone_lr_factor, "name": "backbone"}]
