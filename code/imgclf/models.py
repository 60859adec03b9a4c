"""Backbone registries (torchvision's, and timm's as `timm/<name>`), new heads, pretrained weights, freezing,
and the preprocessing each backbone expects.

Pretrained weights never need the network: they come from a file (the `weights` channel or a path), from
a cache baked into the image (TORCH_HOME for torchvision, the Hugging Face hub cache for timm), and only
when allowed from a download (torchvision's, or timm's from the Hugging Face hub).

timm is imported inside the functions that need it: a torchvision-only job or server never loads it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from imgclf.config import TIMM_PREFIX
from imgclf.errors import HyperparameterError, WeightsError
from imgclf.preprocessing import Preprocessing

log = logging.getLogger(__name__)

IMAGENET_CLASSES = 1000
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# The files timm's Hugging Face hub repositories hold, in the order timm prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def available_models() -> list[str]:
    return models.list_models(module=models)


def is_timm(name: str) -> bool:
    """`timm/<name>[.<pretrained tag>]`, e.g. timm/convnext_small.fb_in22k_ft_in1k."""
    return name.startswith(TIMM_PREFIX)


def timm_name(name: str) -> str:
    return name.removeprefix(TIMM_PREFIX)


def timm_pretrained_cfg(name: str):
    """timm's pretrained config of `timm/<name>` (the default tag's without one); HyperparameterError if unknown."""
    import timm
    from timm.models import get_pretrained_cfg

    bare = timm_name(name)
    if not timm.is_model(bare):
        import difflib

        close = difflib.get_close_matches(bare.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        raise HyperparameterError(
            f"hyperparameter model={name!r}: {bare.split('.')[0]!r} is not a timm model"
            + (f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else "")
            + " (python -c 'import timm; print(timm.list_models(\"*convnext*\"))' lists them)"
        )
    try:
        return get_pretrained_cfg(bare, allow_unregistered=False)
    except RuntimeError as e:
        tags = timm.list_pretrained(f"{bare.split('.')[0]}.*")
        raise HyperparameterError(f"hyperparameter model={name!r}: {e}; pretrained tags: "
                                  + (", ".join(TIMM_PREFIX + t for t in tags) or "none")) from None


def check_model_name(name: str) -> None:
    if is_timm(name):
        timm_pretrained_cfg(name)
        return
    if name not in available_models():
        raise HyperparameterError(
            f"hyperparameter model={name!r} is not a torchvision classification model; choose one of "
            + ", ".join(available_models()) + ", or a timm model as timm/<name> (e.g. timm/convnext_nano)"
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
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"{type(old).__name__} is not a classification layer (Linear or Conv2d)")
    # the attributes are typed for any number of dimensions (_ConvNd), the constructor for two
    return nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)  # type: ignore[arg-type]


def build_backbone(name: str, drop_path: float = 0.0) -> nn.Module:
    """The ImageNet architecture with random weights (auxiliary heads off: they only serve Inception training).
    A timm model keeps the head of its pretrained config (e.g. 21,843 classes for an in21k tag) until
    replace_head, so that its pretrained weights load strictly; `drop_path` is its stochastic depth rate."""
    check_model_name(name)
    if is_timm(name):
        import timm

        options: dict[str, Any] = {"drop_path_rate": drop_path} if drop_path else {}
        return timm.create_model(timm_name(name), pretrained=False, **options)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    return models.get_model(name, weights=None, **kwargs)


def replace_timm_head(model: nn.Module, num_classes: int) -> list[str]:
    """timm's own API: reset_classifier builds the new head, get_classifier names it (two for distilled ViTs)."""
    timm_model: Any = model  # nn.Module does not declare timm's methods
    timm_model.reset_classifier(num_classes)
    classifier = timm_model.get_classifier()
    layers = classifier if isinstance(classifier, tuple | list) else (classifier,)
    names = [name for name, m in model.named_modules() if any(m is layer for layer in layers)]
    if len(names) != len(layers) or any(isinstance(m, nn.Identity) for m in layers):
        raise HyperparameterError(f"cannot find the classification layer of {type(model).__name__} "
                                  f"(timm's get_classifier gave {type(classifier).__name__})")
    return names


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Swap the classification layer(s) for a new `num_classes` one; return their module names (the head).
    timm models: timm's reset_classifier; torchvision models: every 1000-class layer."""
    if hasattr(model, "reset_classifier") and hasattr(model, "get_classifier"):
        return replace_timm_head(model, num_classes)
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
        if "Weights only load failed" in str(e):  # a pickle of more than tensors: never unpickled (it can run code)
            raise WeightsError(f"weights file {path} is a pickle of objects, not only tensors (a whole model saved "
                               "with torch.save(model)?): it is not loaded, since unpickling can run code; save "
                               "model.state_dict() instead, or a .safetensors file") from None
        said = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(e).split()))[:300]  # one short line, no colours
        raise WeightsError(f"cannot read weights file {path} ({type(e).__name__}: {said}): give a torchvision "
                           "state_dict (.pth) or a .safetensors file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel / DDP
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} is not a state_dict (a mapping of names to tensors)")
    return state


def torch_home_weights(name: str) -> Path:
    """Where torchvision caches `name`'s default ImageNet weights (TORCH_HOME/hub/checkpoints/<file>)."""
    url = models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _matches(path: Path, name: str) -> bool:
    """A weights file named after the model (vgg16-397923af.pth, convnext_nano.safetensors), or a file in the
    model's Hugging Face hub cache folder (models--timm--convnext_nano.in12k_ft_in1k/snapshots/<hash>/...)."""
    if not is_timm(name):
        return path.name.startswith(name)
    bare = timm_name(name)
    folder = f"models--timm--{bare}"
    return path.name.startswith(bare) or any(part == folder or part.startswith(folder + ".") for part in path.parts)


def _channel_weights(name: str, weights_dir: Path) -> Path | None:
    if weights_dir.is_file():
        return weights_dir
    if not weights_dir.is_dir():
        return None
    files = sorted(p for p in weights_dir.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    named = [p for p in files if _matches(p, name)]
    if named or len(files) == 1:
        return (named or files)[0]
    if files:
        raise WeightsError(f"weights channel {weights_dir} holds several weight files "
                           f"({', '.join(p.name for p in files[:10])}) and none is named after {name!r}")
    return None


def timm_cached_weights(name: str) -> tuple[Path | None, list[str]]:
    """`timm/<name>`'s weights in the Hugging Face hub cache (HF_HOME, baked into the training image by
    bake_weights.py), or in TORCH_HOME for the few timm weights hosted by URL; and the places looked at."""
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm_pretrained_cfg(name)
    looked = []
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        looked.append(f"Hugging Face hub cache {constants.HF_HUB_CACHE} (repository {repo})")
        for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES:
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found), looked
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        looked.append(f"TORCH_HOME cache {cached}")
        if cached.is_file():
            return cached, looked
    return None, looked


def find_weights_file(name: str, weights_dir: Path | None) -> tuple[Path | None, list[str]]:
    """First weights file found for `name` offline, and every place that was looked at."""
    looked = []
    if weights_dir is not None:
        looked.append(f"weights channel {weights_dir}")
        path = _channel_weights(name, weights_dir)
        if path is not None:
            return path, looked
    if is_timm(name):
        path, places = timm_cached_weights(name)
        return path, looked + places
    cached = torch_home_weights(name)
    looked.append(f"TORCH_HOME cache {cached}")
    return (cached if cached.is_file() else None), looked


def download_state_dict(name: str) -> tuple[dict[str, torch.Tensor], str]:
    if is_timm(name):
        import timm

        return timm.create_model(timm_name(name), pretrained=True).state_dict(), "timm download (Hugging Face hub)"
    return models.get_model_weights(name).DEFAULT.get_state_dict(progress=False), "torchvision download"


def load_pretrained(model: nn.Module, name: str, weights_dir: Path | None, download: bool) -> str:
    """Load ImageNet weights into `model` before its head is replaced; return where they came from."""
    path, looked = find_weights_file(name, weights_dir)
    kind = "timm state_dict (.safetensors or .pth)" if is_timm(name) else "torchvision state_dict file"
    cache = "Hugging Face hub cache (PRETRAINED_MODELS=timm/<name>)" if is_timm(name) else "TORCH_HOME"
    if path is None:
        if not download:
            raise WeightsError(
                f"pretrained weights for {name} not found offline; looked in: {'; '.join(looked)}. "
                f"Put the {kind} in a 'weights' channel (local mode: --weights FILE), "
                f"bake it into the image's {cache}, set download-weights=true (needs internet), "
                f"or set pretrained=false"
            )
        state, source = download_state_dict(name)
    else:
        state = read_state_dict(path)
        source = str(path)
    if name in ("inception_v3", "googlenet"):  # built without the auxiliary heads
        state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the hint first: SageMaker shows a failure reason's first 1,024 characters
        detail = " ".join(str(e).split())
        raise WeightsError(f"weights file {source} does not fit architecture {name}: give the "
                           f"{'timm' if is_timm(name) else 'torchvision'} weights of {name} itself ({detail[:400]}"
                           f"{'...' if len(detail) > 400 else ''})") from None
    log.info("pretrained %s weights loaded from %s", name, source)
    return source


def preprocessing(name: str, model: nn.Module, image_size: int = 0) -> Preprocessing:
    """What the backbone expects: timm's data config for a timm model (mean, std, input size, interpolation,
    crop fraction), ImageNet's statistics at 224 px for a torchvision one. image_size > 0 overrides the size."""
    if not is_timm(name):
        return Preprocessing(image_size or 224)
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    _, height, width = cfg["input_size"]
    if image_size and image_size != height and timm_pretrained_cfg(name).fixed_input_size:
        raise HyperparameterError(f"hyperparameter image-size={image_size}: {name} takes {height}x{width} "
                                  "images only; leave image-size out (0 = the model's own) or choose another model")
    if height != width and not image_size:
        raise HyperparameterError(f"{name} expects {height}x{width} images; set image-size to train it on squares")
    crop_mode = cfg.get("crop_mode", "center")
    if crop_mode not in ("center", "squash"):
        log.warning("%s: timm's crop_mode=%s is not supported; using center crops", name, crop_mode)
        crop_mode = "center"
    return Preprocessing(image_size or height, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"],
                         float(cfg["crop_pct"]), crop_mode)


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


def head_lr(optimizer: torch.optim.Optimizer) -> float:
    """The head's learning rate: the largest of param_groups' groups (the backbone's, and with layer-decay every
    lower layer's, are scaled down from it), wherever the head's group sits in the list."""
    return max(g["lr"] for g in optimizer.param_groups)


def param_groups(model: nn.Module, head: list[str], lr: float, backbone_lr_factor: float,
                 weight_decay: float = 0.0, layer_decay: float = 1.0) -> list[dict]:
    """The optimizer's groups: head and backbone (lr x backbone_lr_factor), each split into weights, which decay,
    and biases and normalisation parameters (every 1-D tensor), which do not: decaying a norm's scale or a bias
    pulls it to 0 and only hurts (torchvision's references and timm exclude them the same way).

    layer_decay < 1 (timm models): timm's layer-wise groups instead, each block's lr layer_decay times the one
    above it, the head's lr itself, with the same weight decay rule."""
    if layer_decay < 1:
        from timm.optim import param_groups_layer_decay

        skip = getattr(model, "no_weight_decay", lambda: ())()  # e.g. a ViT's position embedding
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
        return [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": lr * g.get("lr_scale", 1.0),
                 "name": f"layer-decay x{g.get('lr_scale', 1.0):.3g}"} for g in groups if g["params"]]
    head_ids = {id(p) for h in head for p in model.get_submodule(h).parameters()}
    groups = []
    for name, in_head, group_lr in (("head", True, lr), ("backbone", False, lr * backbone_lr_factor)):
        params = [p for p in model.parameters() if (id(p) in head_ids) == in_head]
        groups += [{"params": [p for p in params if p.ndim > 1], "lr": group_lr, "weight_decay": weight_decay,
                    "name": name},
                   {"params": [p for p in params if p.ndim <= 1], "lr": group_lr, "weight_decay": 0.0,
                    "name": f"{name} (biases and norms)"}]
    return groups
