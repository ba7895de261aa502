"""The one exception type of the convert package: the CLI prints it and exits 2."""

from __future__ import annotations


class ConvertError(Exception):
    """A conversion cannot proceed: unsupported architecture, missing or corrupt file, shape mismatch.

    The message names the file or tensor at fault. No output is left behind when it is raised.
    """
