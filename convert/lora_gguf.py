"""llama.cpp LoRA adapter GGUF files, numpy only (the edge imports this; no torch here).

Tensors are keyed by GGUF name (``blk.{bid}.{stem}.weight.lora_{a|b}``) and given in the DESIGN.md
layout: A ``[r, in]``, B ``[out, r]``, exactly PEFT's ``lora_A`` / ``lora_B``. One exception is handled
here: llama.cpp's *llama* architecture stores Q and K with their rows permuted for its rope layout
(see convert.arch.qk_row_perm), so a LoRA B on ``attn_q`` / ``attn_k`` must be permuted the same way in
the file and in memory. ``write_lora_gguf`` applies that permutation and ``read_lora_gguf`` undoes it;
code that writes θ straight into llama.cpp's tensors must apply ``lora_row_perms`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import gguf
import numpy as np

from convert.arch import inverse_perm, qk_row_perm
from convert.atomic import atomic_file
from convert.errors import ConvertError

LORA_NAME_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight\.lora_([ab])$")
# GGUF stems whose LoRA B rows follow the Q/K permutation, with the head count that drives it, per arch.
PERMUTED_STEMS: dict[str, dict[str, str]] = {
    "llama": {"attn_q": "n_head", "attn_k": "n_head_kv"},
    "qwen2": {},
}
KEY_N_HEAD = "edgezo.lora.n_head"  # our own keys, so read_lora_gguf can undo the permutation alone
KEY_N_HEAD_KV = "edgezo.lora.n_head_kv"


def lora_row_perms(
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, int]],
    arch: str,
    n_head: int | None,
    n_head_kv: int | None,
) -> dict[str, np.ndarray]:
    """For each LoRA B that needs it, the row order llama.cpp expects: ``gguf_b = peft_b[perm]``.

    ``tensors``: arrays keyed by GGUF name, or ``(gguf_name, n_rows)`` pairs (only ``.lora_b`` names matter);
    the inverse is ``peft_b = gguf_b[np.argsort(perm)]``.
    Empty for architectures without a rope permutation (qwen2). Raises ConvertError when a head count
    is needed but missing.
    """
    if arch not in PERMUTED_STEMS:
        raise ConvertError(f"unsupported LoRA architecture {arch!r}; supported: {sorted(PERMUTED_STEMS)}")
    heads = {"n_head": n_head, "n_head_kv": n_head_kv}
    out: dict[str, np.ndarray] = {}
    for name, rows in _b_rows(tensors):
        m = LORA_NAME_RE.match(name)
        which = PERMUTED_STEMS[arch].get(m.group(2)) if m else None
        if which is None:
            continue
        if heads[which] is None:
            raise ConvertError(f"{name}: arch {arch!r} needs {which} to lay out a Q/K LoRA for llama.cpp")
        out[name] = qk_row_perm(rows, int(heads[which]))
    return out


def _b_rows(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    pairs = [(n, int(np.shape(a)[0])) for n, a in tensors.items()] if isinstance(tensors, Mapping) else tensors
    return [(n, int(r)) for n, r in pairs if n.endswith(".lora_b")]


def check_lora_tensors(tensors: Mapping[str, np.ndarray]) -> None:
    """Names follow GGUF_LORA_NAME, every A has its B, shapes are 2-D and agree on the rank."""
    for name, arr in tensors.items():
        m = LORA_NAME_RE.match(name)
        if not m:
            raise ConvertError(f"{name!r} is not a LoRA tensor name (blk.N.STEM.weight.lora_a|lora_b)")
        if np.ndim(arr) != 2:
            raise ConvertError(f"{name}: LoRA tensors are 2-D, got shape {np.shape(arr)}")
        other = name[:-1] + ("b" if m.group(3) == "a" else "a")
        if other not in tensors:
            raise ConvertError(f"{name} has no matching {other}")
        if m.group(3) == "a" and np.shape(arr)[0] != np.shape(tensors[other])[1]:
            raise ConvertError(f"{name} has rank {np.shape(arr)[0]} but {other} has {np.shape(tensors[other])[1]}")


def write_lora_gguf(
    path: Path,
    tensors: Mapping[str, np.ndarray],
    alpha: float,
    arch: str = "llama",
    *,
    n_head: int | None = None,
    n_head_kv: int | None = None,
) -> Path:
    """Write a llama.cpp LoRA adapter GGUF (F32) atomically; tensors in PEFT layout, keyed by GGUF name.

    ``n_head`` / ``n_head_kv`` are required for the llama arch when attn_q / attn_k are adapted.
    """
    check_lora_tensors(tensors)
    perms = lora_row_perms(tensors, arch, n_head, n_head_kv)
    with atomic_file(Path(path)) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if n_head is not None:
            w.add_uint32(KEY_N_HEAD, int(n_head))
        if n_head_kv is not None:
            w.add_uint32(KEY_N_HEAD_KV, int(n_head_kv))
        for name, arr in tensors.items():
            data = np.ascontiguousarray(arr, dtype=np.float32)
            w.add_tensor(name, data[perms[name]] if name in perms else data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)


def read_lora_gguf(
    path: Path, *, n_head: int | None = None, n_head_kv: int | None = None
) -> tuple[dict[str, np.ndarray], float, str]:
    """(tensors in PEFT layout keyed by GGUF name, alpha, arch) from a LoRA GGUF.

    Head counts come from the file's edgezo keys when present (files from write_lora_gguf), else from
    the arguments (adapters made by other tools).
    """
    reader = open_gguf(path)
    if _value(reader, "general.type") != "adapter" or _value(reader, gguf.Keys.Adapter.TYPE) != "lora":
        raise ConvertError(f"{path} is not a LoRA adapter GGUF (general.type / adapter.type)")
    arch = str(_value(reader, "general.architecture"))
    alpha = float(_value(reader, gguf.Keys.Adapter.LORA_ALPHA, 0.0))
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type != gguf.GGMLQuantizationType.F32 else t.data
        tensors[t.name] = np.array(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
    check_lora_tensors(tensors)
    n_head = _value(reader, KEY_N_HEAD, n_head)
    n_head_kv = _value(reader, KEY_N_HEAD_KV, n_head_kv)
    for name, perm in lora_row_perms(tensors, arch, n_head, n_head_kv).items():
        tensors[name] = tensors[name][inverse_perm(perm)]
    return tensors, alpha, arch


def open_gguf(path: Path) -> gguf.GGUFReader:
    """A GGUFReader, or ConvertError for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct errors, IndexError… on corrupt input
        raise ConvertError(f"{path} is not a valid GGUF file: {e}") from e


def _value(reader: gguf.GGUFReader, key: str, default: object = None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()
