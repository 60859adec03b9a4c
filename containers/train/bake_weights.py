"""Bake torchvision's ImageNet weights into TORCH_HOME at image build time (training with network isolation).

    TORCH_HOME=/opt/torch python bake_weights.py vgg16 resnet50

Each file lands where the training code looks (imgclf.models.torch_home_weights: TORCH_HOME/hub/checkpoints/
<torchvision's file name>), its SHA-256 prefix is checked, and it is loaded into the architecture the way
training will load it, so a broken or misplaced file fails the build instead of a training job.
No names: nothing to do (the default build bakes nothing).
"""

from __future__ import annotations

import logging
import re
import sys

import torch
from imgclf import models
from imgclf.errors import UserError
from torchvision import models as tv_models

log = logging.getLogger("bake_weights")


def bake(name: str) -> None:
    models.check_model_name(name)
    target = models.torch_home_weights(name)
    if target.is_file():
        log.info("%s: %s already present", name, target)
    else:
        url = tv_models.get_model_weights(name).DEFAULT.url
        digest = re.search(r"-([a-f0-9]{6,})\.", url.rsplit("/", 1)[-1])  # torchvision names carry a sha256 prefix
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("%s: downloading %s", name, url)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=digest.group(1) if digest else None,
                                           progress=False)
        except (OSError, RuntimeError) as e:  # no network, HTTP error, or a hash mismatch
            raise UserError(f"{name}: cannot download {url}: {e}. Baking weights needs network access at "
                            "build time; or build without PRETRAINED_MODELS and give the weights in a 'weights' "
                            "channel") from None
    model = models.build_backbone(name)
    source = models.load_pretrained(model, name, weights_dir=None, download=False)
    log.info("%s: baked (%s)", name, source)


def main(names: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not names:
        log.info("no pretrained weights baked (build with --build-arg PRETRAINED_MODELS=\"vgg16 resnet50\")")
        return 0
    try:
        for name in names:
            bake(name)
    except UserError as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
