"""Tail GGUF: layers s..L-1 of a base model, with its output norm and head, as a model of its own.

FedSPZO's activation reuse (``edge/split.py``) captures the residual stream after layer s-1 and feeds it to this
model through ``llama_batch.embd``; block ``blk.{s+i}`` of the base becomes ``blk.{i}`` here. Tensors are copied
byte for byte (quantized types stay as they are, so the tail computes exactly what the base's layers compute);
metadata is copied with ``block_count = L - s`` and per-layer arrays sliced. ``token_embd`` is kept: llama.cpp
requires it to load, and tied-embedding models (SmolLM2) use it as the output head.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from convert.atomic import atomic_file
from convert.errors import ConvertError
from convert.lora_gguf import open_gguf

KEY_TAIL_START = "edgezo.tail.start_layer"  # provenance: which base layer the tail's blk.0 was
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
_SKIP = ("GGUF.", "general.architecture", "general.alignment")  # the writer sets these itself


def tail_tensor_name(name: str, start: int) -> str | None:
    """The tail's name for base tensor ``name`` (None: a block below ``start``, not in the tail)."""
    m = _BLOCK.match(name)
    if m is None:
        return name
    layer = int(m.group(1))
    return None if layer < start else f"blk.{layer - start}.{m.group(2)}"


def write_tail_gguf(src: Path, dst: Path, start: int) -> Path:
    """Write the tail of ``src`` from layer ``start`` on to ``dst`` atomically; ``0 < start < n_layers``."""
    reader = open_gguf(Path(src))
    arch_f = reader.fields.get("general.architecture")
    if arch_f is None:
        raise ConvertError(f"{src} has no general.architecture")
    arch = arch_f.contents()
    count_f = reader.fields.get(f"{arch}.block_count")
    if count_f is None:
        raise ConvertError(f"{src} has no {arch}.block_count")
    n_layer = int(count_f.contents())
    if not 0 < start < n_layer:
        raise ConvertError(f"tail start layer must be in 1..{n_layer - 1} for a {n_layer}-layer model, got {start}")
    if reader.fields.get("general.type") is not None and reader.fields["general.type"].contents() == "adapter":
        raise ConvertError(f"{src} is an adapter, not a base model")
    with atomic_file(Path(dst)) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        for f in reader.fields.values():
            if f.name.startswith(_SKIP):
                continue
            vtype = f.types[0]
            value = f.contents()
            if f.name == f"{arch}.block_count":
                value = n_layer - start
            elif vtype == gguf.GGUFValueType.ARRAY and f.name.startswith(f"{arch}.") and len(value) == n_layer:
                value = value[start:]  # per-layer hyper-parameters (e.g. head counts of some archs)
            sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
            w.add_key_value(f.name, value, vtype, sub_type=sub)
        w.add_uint32(KEY_TAIL_START, start)
        kept = []
        for t in reader.tensors:
            name = tail_tensor_name(t.name, start)
            if name is None:
                continue
            kept.append(t)
            w.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in kept:
            w.write_tensor_data(np.asarray(t.data))
        w.close()
    return Path(dst)
