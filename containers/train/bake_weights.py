"""Bake pretrained weights into the image at build time (training with network isolation).

    TORCH_HOME=/opt/torch HF_HOME=/opt/torch/huggingface python bake_weights.py vgg16 timm/convnext_nano

A torchvision name: the file lands where torchvision caches it and where training looks
(TORCH_HOME/hub/checkpoints/<torchvision's file name>), its SHA-256 prefix is checked, and it is loaded into the
architecture. `timm/<name>[.<tag>]`: timm downloads the weights into the Hugging Face hub cache (HF_HOME/hub,
where training looks with huggingface_hub's own cache lookup) and loads them into the architecture. Either
way a broken or misplaced file fails the build instead of a training job. It needs torch, torchvision and
timm only, not the imgclf package: the image builds this layer from the dependencies alone, so a code change
never re-downloads or re-pushes it. No names: nothing to do (the default build bakes nothing).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import torch
from torchvision import models

log = logging.getLogger("bake_weights")


TIMM_PREFIX = "timm/"  # as the `model` hyperparameter spells timm models


class BakeError(Exception):
    pass


def bake_timm(name: str) -> None:
    import timm
    from huggingface_hub import constants

    bare = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(bare):
        raise BakeError(f"{name!r}: {bare.split('.')[0]!r} is not a timm model (timm.list_models() lists them)")
    log.info("%s: downloading timm's weights into %s", name, constants.HF_HUB_CACHE)
    try:
        timm.create_model(bare, pretrained=True)  # downloads (or finds in the cache), then loads strictly
    except RuntimeError as e:  # an unknown pretrained tag, or a file that does not fit
        raise BakeError(f"{name}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # no network, HTTP error: huggingface_hub raises its own types
        raise BakeError(f"{name}: cannot download timm's weights ({type(e).__name__}: {e}). Baking weights needs "
                        "network access at build time; or build without PRETRAINED_MODELS and give the weights "
                        "in a 'weights' channel") from None
    log.info("%s: baked (Hugging Face hub cache %s)", name, constants.HF_HUB_CACHE)


def bake(name: str) -> None:
    if name.startswith(TIMM_PREFIX):
        bake_timm(name)
        return
    if name not in models.list_models(module=models):
        raise BakeError(f"{name!r} is not a torchvision classification model; choose one of "
                        + ", ".join(models.list_models(module=models)))
    url = models.get_model_weights(name).DEFAULT.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if target.is_file():
        log.info("%s: %s already present", name, target)
    else:
        digest = re.search(r"-([a-f0-9]{6,})\.", url.rsplit("/", 1)[-1])  # torchvision names carry a sha256 prefix
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("%s: downloading %s", name, url)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=digest.group(1) if digest else None,
                                           progress=False)
        except (OSError, RuntimeError) as e:  # no network, HTTP error, or a hash mismatch
            raise BakeError(f"{name}: cannot download {url}: {e}. Baking weights needs network access at "
                            "build time; or build without PRETRAINED_MODELS and give the weights in a 'weights' "
                            "channel") from None
    try:
        models.get_model(name, weights=None).load_state_dict(torch.load(target, map_location="cpu",
                                                                         weights_only=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise BakeError(f"weights file {target} does not fit architecture {name}: "
                        f"{str(e).splitlines()[0]}") from None
    log.info("%s: baked (%s)", name, target)


def main(names: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not names:
        log.info("no pretrained weights baked (build with --build-arg PRETRAINED_MODELS=\"vgg16 timm/convnext_nano\")")
        return 0
    try:
        for name in names:
            bake(name)
    except BakeError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
