"""Which device the code runs on: the one choice training and serving share."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
