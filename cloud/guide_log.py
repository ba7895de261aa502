"""The guide's structured log: one JSON object per line (ts, event, fields), non-finite floats as null."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


# ---- structured logs -----------------------------------------------------------------------------
class JsonLog:
    """JSON-lines event log: one object per line with ts, event and fields."""

    def __init__(self, path: str = "") -> None:
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1) if path else sys.stderr  # noqa: SIM115 - lives as long as the daemon
        self._own = bool(path)

    def __call__(self, event: str, **fields: Any) -> None:
        rec = {"ts": round(time.time(), 3), "event": event, **_finite(fields)}
        try:
            self._f.write(json.dumps(rec, default=_jsonable) + "\n")
        except (ValueError, OSError):  # closed stream at shutdown
            pass

    def close(self) -> None:
        if self._own:
            self._f.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def _finite(fields: dict) -> dict:
    """NaN/inf → None, so every log line is strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fields.items()}


def _json_capped(rows: list[dict], limit: int = 4000) -> str:
    """JSON of ``rows``, dropping the oldest/last ones until it fits a Status string field."""
    while rows:
        text = json.dumps(rows, default=_jsonable)
        if len(text) <= limit:
            return text
        rows = rows[1:] if len(rows) > 1 else []
    return "[]"
