"""Is the cloud extra installed? Probed without importing torch (seconds and hundreds of MB on a Pi)."""

from __future__ import annotations

import importlib.util


class MissingExtra(RuntimeError):
    """A subcommand needs an optional dependency group that is not installed."""


def require_cloud() -> None:
    """Raise MissingExtra with the install hint when torch/transformers are absent.

    Probes with ``find_spec`` so an edge install never imports torch, not even to check for it.
    """
    for name in ("torch", "transformers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ModuleNotFoundError, ValueError):  # a blocking finder, or a module set to None
            found = False
        if not found:
            raise MissingExtra(f"this command needs the cloud extra ({name} is missing): pip install 'edgezo[cloud]'")
