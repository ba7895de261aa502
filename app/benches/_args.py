"""Argument types shared by the benches: a bad value is refused at parse time, one line, exit code 2."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [lo, hi] (no upper bound when ``hi`` is None)."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            want = f"in [{lo:,}, {hi:,}]" if hi is not None else f">= {lo:,}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {v:,}")
        return v

    parse.__name__ = "int"  # argparse names the type in its own messages
    return parse


def positive_float(s: str) -> float:
    """An argparse ``type``: a float > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def nonneg_float(s: str) -> float:
    """An argparse ``type``: a finite float >= 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v
