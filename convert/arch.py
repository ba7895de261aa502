"""Supported architectures: one table row per HF class, and the llama rope permutation of Q/K rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convert.errors import ConvertError


@dataclass(frozen=True)
class Arch:
    """How one HF architecture maps to a llama.cpp one."""

    hf_class: str  # config.json "architectures"[0]
    model_type: str  # config.json "model_type"
    gguf_arch: str  # gguf.MODEL_ARCH_NAMES value, also general.architecture
    permute_qk: bool  # llama.cpp's "llama" graph uses interleaved rope pairs; HF uses split halves
    qkv_bias: bool


ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": Arch("LlamaForCausalLM", "llama", "llama", permute_qk=True, qkv_bias=False),
    "Qwen2ForCausalLM": Arch("Qwen2ForCausalLM", "qwen2", "qwen2", permute_qk=False, qkv_bias=True),
}
BY_GGUF_ARCH: dict[str, Arch] = {a.gguf_arch: a for a in ARCHS.values()}


def arch_from_config(config: dict) -> Arch:
    """The Arch row for an HF config, or ConvertError naming the unsupported class."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHS:
            return ARCHS[name]
    raise ConvertError(f"unsupported architecture {names or config.get('model_type')}; supported: {sorted(ARCHS)}")


def arch_from_gguf(name: str) -> Arch:
    """The Arch row for a GGUF general.architecture, or ConvertError."""
    if name not in BY_GGUF_ARCH:
        raise ConvertError(f"unsupported GGUF architecture {name!r}; supported: {sorted(BY_GGUF_ARCH)}")
    return BY_GGUF_ARCH[name]


def qk_row_perm(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's llama arch wants for a Q (n_head) or K (n_kv_head) projection: ``W_gguf = W_hf[perm]``.

    Inside each head, HF rotates pairs (i, i + d/2); llama.cpp rotates (2i, 2i + 1). Same as
    convert_hf_to_gguf's LlamaModel.permute. Applies to weight rows, biases, and a LoRA B's rows.
    """
    if n_rows % (2 * n_head):
        raise ConvertError(f"{n_rows} rows do not split into {n_head} heads of even size")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def inverse_perm(perm: np.ndarray) -> np.ndarray:
    """``inv`` with ``x[perm][inv] == x``."""
    return np.argsort(perm)
