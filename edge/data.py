"""Training data: CSV or JSONL rows (optionally .gz / .bz2) of text+label or prompt+completion.

Rows that are malformed (unparsable, wrong field count, missing field, empty text, label outside the label map)
are skipped and reported with their line numbers, never fatal, and reading goes on to the end of the file; a file
with no usable row, or corrupt compressed input, is an error naming the file. Shuffling and the train/eval split are deterministic in a
seed (numpy Generator), so the edge and a re-run see the same examples in the same order.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """The data file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Row:
    """One example: ``text`` + ``label`` (classification) or ``text`` = prompt + ``label`` = completion."""

    text: str
    label: str


@dataclass
class Dataset:
    """Usable rows, and every row that was not: ``problems`` lists (line number, reason), in file order."""

    rows: list[Row]
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    problems: list[tuple[int, str]] = field(default_factory=list)


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _csv_records(f, delimiter: str):
    """(line, dict | None, reason) per CSV row; a malformed row is reported and reading goes on."""
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"line 1: the header row cannot be parsed ({e})") from e
    last = reader.line_num
    while True:
        start = last + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            last = reader.line_num
            yield start, None, f"unparsable CSV ({e})"
            continue
        last = reader.line_num
        if not row:
            continue
        if len(row) != len(header):
            yield start, None, f"{len(row)} fields, the header has {len(header)}"
            continue
        yield start, dict(zip(header, row, strict=True)), ""


def _json_records(f):
    for i, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, None, f"not JSON ({e.msg})"
            continue
        yield (i, rec, "") if isinstance(rec, dict) else (i, None, "not a JSON object")


def _records(path: Path):
    """Yield (line number, dict or None, reason) from a CSV/TSV or JSONL file; corrupt compressed input is a
    DataError naming the last line read."""
    stem = path.name.lower().removesuffix(".bz2").removesuffix(".gz")
    if stem.endswith((".csv", ".tsv")):
        parse = lambda f: _csv_records(f, "\t" if stem.endswith(".tsv") else ",")  # noqa: E731
    elif stem.endswith((".jsonl", ".json")):
        parse = _json_records
    else:
        raise DataError(f"{path}: unknown data format (use .csv, .tsv or .jsonl, optionally .gz/.bz2)")
    line = 0
    try:
        with _open_text(path) as f:
            for rec in parse(f):
                line = rec[0]
                yield rec
    except (OSError, EOFError, zlib.error, ValueError) as e:
        if isinstance(e, DataError):
            raise DataError(f"{path}: {e}") from e
        raise DataError(f"{path}: corrupt or truncated file after line {line} ({type(e).__name__}: {e})") from e


def load_rows(
    path: str | os.PathLike,
    text_field: str = "text",
    label_field: str = "label",
    labels: set[str] | None = None,
) -> Dataset:
    """Usable rows of ``path``. ``labels``: keep only rows whose label is one of these (others are skipped).
    Every skipped row is recorded with its line number (``Dataset.problems``); reading never stops early."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    ds = Dataset(rows=[])

    def skip(line: int, reason: str, key: str | None = None) -> None:
        ds.skipped += 1
        ds.reasons[key or reason] = ds.reasons.get(key or reason, 0) + 1
        ds.problems.append((line, reason))

    for line, rec, why in _records(p):
        if rec is None:
            skip(line, why, "unparsable")
            continue
        text, label = rec.get(text_field), rec.get(label_field)
        if text is None or label is None:
            skip(line, f"missing {text_field!r} or {label_field!r}")
            continue
        text, label = str(text).strip(), str(label).strip()
        if not text:
            skip(line, "empty text")
            continue
        if labels is not None and label not in labels:
            skip(line, f"label {label[:40]!r} not in the label map", "label not in label map")
            continue
        if labels is None and not label:
            skip(line, "empty completion")
            continue
        ds.rows.append(Row(text, label))
    if not ds.rows:
        raise DataError(f"{p}: no usable rows ({ds.skipped} skipped: {ds.reasons})")
    return ds


def shuffle_split(rows: list[Row], seed: int, eval_fraction: float = 0.0, max_eval: int = 0) -> tuple[list[Row], list[Row]]:
    """(train, eval) after a seeded shuffle; eval takes ``eval_fraction`` of rows (capped at ``max_eval``)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    order = rng.permutation(len(rows))
    shuffled = [rows[i] for i in order]
    n_eval = int(round(len(rows) * eval_fraction))
    if max_eval:
        n_eval = min(n_eval, max_eval)
    if n_eval >= len(rows):
        raise DataError(f"eval split of {n_eval} leaves no training rows (have {len(rows)})")
    return shuffled[n_eval:], shuffled[:n_eval]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of step ``step``'s mini-batch: epoch-wise seeded permutations, a pure function of its inputs.

    Resuming at step t sees exactly the batches an uninterrupted run would (no data-loader state to save).
    """
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"need n > 0 and batch_size > 0, got {n}, {batch_size}")
    start = step * batch_size
    out = np.empty(batch_size, np.int64)
    for j in range(batch_size):
        epoch, pos = divmod(start + j, n)
        if j == 0 or pos == 0:
            perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(n)
        out[j] = perm[pos]
    return out
