"""Settings from the host scripts' command lines: flag groups as typed settings, and the flags only one path reads.

`FlagGroup`: a frozen dataclass whose fields are named as their flags' dests, built with `.from_flags(vars(args))`:
what the package takes instead of an `argparse.Namespace` (aws.scripting's Access and Waiting, the local search's
options, ...).

tune.py has two paths, the SageMaker tuning job (CLOUD) and the local search (LOCAL). A flag that only one path
reads is marked where it is defined (`only_for(CLOUD, group.add_argument(...), ...)`); `given_elsewhere` names the
marked flags of the other path that a command line set, so that tune.py refuses them instead of silently ignoring
them. Unmarked flags (data, output, hyperparameters, search space, ...) serve both.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, ClassVar

CLOUD, LOCAL = "cloud", "local"
_MARKED: dict[str, tuple[str, argparse.Action]] = {}  # dest -> (path, its action): one definition per flag


class FlagGroup:
    """A dataclass of settings that come from command-line flags, each field named as its flag's dest."""

    OPTIONAL_FLAGS: ClassVar[frozenset[str]] = frozenset()  # fields a parser may lack (they keep their default)
    __dataclass_fields__: ClassVar[dict[str, Any]]  # every subclass is a dataclass (what `fields` reads)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]):
        """The settings from parsed flags (`vars()` of argparse's result)."""
        missing = [f.name for f in fields(cls) if f.name not in flags and f.name not in cls.OPTIONAL_FLAGS]
        if missing:
            raise TypeError(f"{cls.__name__}: the parser has no flag for {', '.join(missing)}")
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})


def only_for(path: str, *actions: argparse.Action) -> None:
    for action in actions:
        _MARKED[action.dest] = (path, action)


def given_elsewhere(flags: Mapping[str, Any], path: str) -> list[str]:
    """The flags of the path that is not `path` whose value differs from their default."""
    return [action.option_strings[0] for dest, (owner, action) in _MARKED.items()
            if owner != path and dest in flags and flags[dest] != action.default]
