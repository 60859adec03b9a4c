"""Flags that only one path of tune.py reads: the SageMaker tuning job (CLOUD) or the local search (LOCAL).

Each such flag is marked where it is defined (`only_for(CLOUD, group.add_argument(...), ...)`); `given_elsewhere`
names the marked flags of the other path that a command line set, so that tune.py refuses them instead of
silently ignoring them. Unmarked flags (data, output, hyperparameters, search space, ...) serve both.
"""

from __future__ import annotations

import argparse

CLOUD, LOCAL = "cloud", "local"
_MARKED: dict[str, tuple[str, argparse.Action]] = {}  # dest -> (path, its action): one definition per flag


def only_for(path: str, *actions: argparse.Action) -> None:
    for action in actions:
        _MARKED[action.dest] = (path, action)


def given_elsewhere(args: argparse.Namespace, path: str) -> list[str]:
    """The flags of the path that is not `path` whose value differs from their default."""
    return [action.option_strings[0] for dest, (owner, action) in _MARKED.items()
            if owner != path and hasattr(args, dest) and getattr(args, dest) != action.default]
