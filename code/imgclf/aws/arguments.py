"""argparse types of the host scripts' flags, without boto3: predict.py --url imports no AWS SDK."""

from __future__ import annotations

import argparse


def positive_seconds(text: str) -> float:
    """A number of seconds above 0 (a wait, a poll interval, a timeout)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def int_between(low: int, high: int):
    """An argparse type for an integer from `low` to `high`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from {low} to {high}")
        return value
    parse.__name__ = f"int {low}-{high}"
    return parse
