"""The guide's public data, as ``[data]`` in guide.toml names it: a packaged set or the operator's own file.

    [data]
    source = "reviews.csv.gz"          # or a packaged name, a .tsv/.jsonl/.parquet file, a save_to_disk folder
    text_field = "text"
    label_field = "label"
    label_words = { neg = "negative", pos = "positive" }   # data label → word; the order is the class index
    template = "Review: {text}\\nSentiment (positive or negative):"

Files are read with Hugging Face ``datasets`` (``load_dataset`` for csv/tsv/json/parquet, compressed or not,
``load_from_disk`` for folders), offline. Every label in the data must be one of ``label_words`` and the template
must hold ``{text}``: otherwise the guide refuses to start, naming what does not match.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from cloud.data import Slice, load_movie_snippets, load_rotten_tomatoes, load_tweets

PACKAGED = {"rotten_tomatoes": load_rotten_tomatoes, "movie_snippets": load_movie_snippets, "tweets": load_tweets}
# (builder, extra kwargs) by file suffix, compression suffixes stripped first
_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".jsonl": ("json", {}),
             ".json": ("json", {}), ".parquet": ("parquet", {})}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


class PublicDataError(ValueError):
    """The public data cannot serve the guide's task; the message names the file and the mismatch."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for c in _COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix


def read_table(path: Path, cache_dir: Path | None = None):
    """A ``datasets.Dataset`` from a file or a save_to_disk folder (the "train" split of a DatasetDict)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise PublicDataError(f"{path}: a DatasetDict without a 'train' split ({list(ds)})")
                ds = ds["train"]
            return ds
        if not path.is_file():
            raise PublicDataError(f"[data] source {path} not found (nor a packaged set: {sorted(PACKAGED)})")
        kind = _BUILDERS.get(_suffix(path))
        if kind is None:
            raise PublicDataError(f"{path}: unknown format; use .csv, .tsv, .jsonl, .json or .parquet "
                                  "(optionally .gz/.bz2/.xz), or a datasets save_to_disk folder")
        builder, kw = kind
        return datasets.load_dataset(builder, data_files=str(path), split="train",
                                     cache_dir=str(cache_dir) if cache_dir else None, **kw)
    except PublicDataError:
        raise
    except Exception as e:  # datasets/pyarrow raise assorted errors on malformed or corrupt files
        raise PublicDataError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e


def load_public(cfg, cache_dir: Path | None = None) -> tuple[Slice, dict]:
    """(Slice, report) for ``[data]``: packaged sets by name, else the operator's table with its fields and
    label words. ``report``: rows read, rows dropped (empty text) and the label counts."""
    if cfg.source in PACKAGED:
        data = PACKAGED[cfg.source]()
        return data, {"source": cfg.source, "rows": len(data), "dropped": 0}
    path = Path(cfg.source).expanduser()
    ds = read_table(path, cache_dir)
    missing = [f for f in (cfg.text_field, cfg.label_field) if f not in ds.column_names]
    if missing:
        raise PublicDataError(f"{path}: no column {missing} (columns: {ds.column_names}); set [data] text_field / "
                              "label_field")
    words = dict(cfg.label_words)
    classes = {str(k): i for i, k in enumerate(words)}
    texts, labels, dropped = [], [], 0
    unknown: Counter = Counter()
    for text, label in zip(ds[cfg.text_field], ds[cfg.label_field], strict=True):
        text = "" if text is None else str(text).strip()
        key = "" if label is None else str(label).strip()
        if not text:
            dropped += 1
            continue
        if key not in classes:
            unknown[key] += 1
            continue
        texts.append(text)
        labels.append(classes[key])
    if unknown:
        raise PublicDataError(f"{path}: labels {dict(unknown.most_common(5))} are not in [data] label_words "
                              f"{words} (the task's classes); map every label of the data to a word")
    if len(set(labels)) < 2:
        raise PublicDataError(f"{path}: only {len(set(labels))} of the task's classes occur; a classifier needs both")
    counts = Counter(labels)
    return Slice(texts, labels), {"source": str(path), "rows": len(ds), "dropped": dropped,
                                  "classes": {w: counts[i] for w, i in zip(words, range(len(words)), strict=True)}}


def cloud_task(cfg):
    """cloud.model.ClassificationTask of ``[data]``: its template and its label words in class order."""
    from cloud.model import ClassificationTask

    words = tuple(w if w.startswith(" ") else " " + w for w in dict(cfg.label_words).values())
    try:
        return ClassificationTask(template=cfg.template, label_words=words)
    except ValueError as e:
        raise PublicDataError(f"[data]: {e}") from e
