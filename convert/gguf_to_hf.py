"""GGUF base model (any llama.cpp quantization) -> HF folder: config.json, fp32 model.safetensors, tokenizer.

Read with gguf-py's GGUFReader and dequantized with gguf.quants (numpy), Q/K rows un-permuted for the
llama arch; no torch needed. transformers loads the result offline with ``from_pretrained(dst)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from convert.arch import Arch, arch_from_gguf, inverse_perm, qk_row_perm
from convert.atomic import atomic_dir
from convert.errors import ConvertError
from convert.hfio import write_safetensors_file
from convert.lora_gguf import open_gguf
from convert.tokenizer import write_hf_tokenizer

# config.json key -> GGUF key (without the "{arch}." prefix): the hyper-parameters as a table.
HPARAMS: dict[str, str] = {
    "num_hidden_layers": "block_count",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "head_dim": "attention.key_length",
}
LAYER_TENSORS = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
PROGRESS_TENSORS = 100  # show a progress bar for models with more tensors than this


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _short_float(x: float) -> float:
    # GGUF stores float32; 9.999999747378752e-06 should come back as the 1e-05 it was written from.
    return float(str(np.float32(x)))


def gguf_hparams(reader: gguf.GGUFReader) -> tuple[Arch, dict[str, Any]]:
    """(Arch, HF config keys) from a GGUF base model's metadata."""
    if _field(reader, "general.type", "model") != "model":
        raise ConvertError(f"GGUF general.type is {_field(reader, 'general.type')!r}, expected a base model")
    arch = arch_from_gguf(str(_field(reader, "general.architecture")))
    hp: dict[str, Any] = {}
    for hf_key, key in HPARAMS.items():
        v = _field(reader, f"{arch.gguf_arch}.{key}")
        if v is not None:
            hp[hf_key] = _short_float(v) if isinstance(v, float) else int(v)
    missing = {"num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"} - set(hp)
    if missing:
        raise ConvertError(f"GGUF metadata lacks {sorted(missing)}")
    hp.setdefault("num_key_value_heads", hp["num_attention_heads"])
    hp.setdefault("head_dim", hp["hidden_size"] // hp["num_attention_heads"])
    hp.setdefault("rope_theta", 10000.0)
    return arch, hp


def hf_names_by_gguf(arch: Arch, n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF name for every tensor the architecture can have."""
    hf = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    per_layer = LAYER_TENSORS + (QKV_BIASES if arch.qkv_bias else ())
    hf += [f"model.layers.{i}.{t}" for i in range(n_layers) for t in per_layer]
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.gguf_arch.upper()], n_layers)
    out = {}
    for h in hf:
        g = names.get_name(h, try_suffixes=(".weight", ".bias"))
        if g is None:  # the table above and gguf-py disagree: a programming error, not bad input
            raise ConvertError(f"gguf-py has no GGUF name for {h}")
        out[g] = h
    return out


def dequantize(t: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 in its torch shape (numpy order: reversed ggml ne)."""
    if t.tensor_type == gguf.GGMLQuantizationType.F32:
        data = np.asarray(t.data)
    else:
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConvertError(f"{t.name}: cannot dequantize {t.tensor_type.name}: {e}") from e
    return np.array(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def hf_tensors(reader: gguf.GGUFReader, arch: Arch, hp: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantized, renamed to HF and, for the llama arch, Q/K rows un-permuted."""
    by_gguf = hf_names_by_gguf(arch, hp["num_hidden_layers"])
    heads = {"q_proj": hp["num_attention_heads"], "k_proj": hp["num_key_value_heads"]}
    out: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="dequantize", disable=len(reader.tensors) <= PROGRESS_TENSORS):
        if t.name not in by_gguf:
            raise ConvertError(f"GGUF tensor {t.name} has no HF counterpart for {arch.hf_class}")
        name, data = by_gguf[t.name], dequantize(t)
        proj = name.rsplit(".", 2)[-2]
        if arch.permute_qk and proj in heads:
            data = data[inverse_perm(qk_row_perm(data.shape[0], heads[proj]))]
        out[name] = np.ascontiguousarray(data)
    return dict(sorted(out.items()))


def hf_config(arch: Arch, hp: dict[str, Any], n_vocab: int, tied: bool, specials: dict[str, int]) -> dict:
    """config.json contents for transformers."""
    return {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        **{k: v for k, v in hp.items() if k != "rope_theta"},
        "vocab_size": n_vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "rope_theta": hp["rope_theta"],  # transformers < 5
        "rope_parameters": {"rope_theta": hp["rope_theta"], "rope_type": "default"},  # transformers >= 5
        "bos_token_id": specials.get("bos"),
        "eos_token_id": specials.get("eos"),
        "pad_token_id": specials.get("padding"),
        "attention_bias": arch.qkv_bias if arch.model_type == "llama" else None,
        "torch_dtype": "float32",
    }


def gguf_to_hf(src: Path, dst: Path, *, reader: gguf.GGUFReader | None = None) -> Path:
    """Convert a GGUF base model (F32/F16/BF16 or quantized) to an HF folder ``dst`` (replaced atomically).

    ``reader``: an already-open GGUFReader of ``src``, to skip a second parse (seconds for a real vocabulary).
    """
    src, dst = Path(src), Path(dst)
    reader = reader or open_gguf(src)
    arch, hp = gguf_hparams(reader)
    tensors = hf_tensors(reader, arch, hp)
    if "model.embed_tokens.weight" not in tensors:
        raise ConvertError(f"{src} has no token_embd.weight")
    n_vocab = int(tensors["model.embed_tokens.weight"].shape[0])
    tied = "lm_head.weight" not in tensors  # llama.cpp reuses token_embd when output.weight is absent
    with atomic_dir(dst) as tmp:
        specials = write_hf_tokenizer(reader, tmp, hp.get("max_position_embeddings", 2048))
        config = {k: v for k, v in hf_config(arch, hp, n_vocab, tied, specials).items() if v is not None}
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        write_safetensors_file(tmp / "model.safetensors", tensors)
    return dst
