"""HF checkpoint folder (Llama, Qwen2) -> GGUF base model, written with gguf-py; no torch needed."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from convert.arch import Arch, arch_from_config, qk_row_perm
from convert.atomic import atomic_file, scratch_file
from convert.errors import ConvertError
from convert.hfio import read_hf_tensors, read_json
from convert.tokenizer import add_hf_tokenizer

# --type values written directly: (GGML type of 2-D weights, general.file_type).
FLOAT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
PROGRESS_BYTES = 64 << 20  # show a progress bar above this much tensor data
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; llama.cpp recomputes them


def _hparam(config: dict, *keys: str) -> int | float:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    raise ConvertError(f"config.json lacks {' / '.join(keys)}")


def rope_theta(config: dict) -> float:
    """rope base from either transformers 5 ``rope_parameters`` or the older flat keys; only plain rope."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConvertError(f"rope type {kind!r} is not supported (only plain rope)")
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def add_hparams(writer: gguf.GGUFWriter, config: dict, n_vocab: int) -> dict[str, int]:
    """Write the llama-family hyper-parameters; returns the head counts the Q/K permutation needs."""
    if config.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"hidden_act {config['hidden_act']!r} is not supported (silu only)")
    hidden = int(_hparam(config, "hidden_size"))
    n_head = int(_hparam(config, "num_attention_heads"))
    n_kv = int(config.get("num_key_value_heads") or n_head)
    head_dim = int(config.get("head_dim") or hidden // n_head)
    writer.add_context_length(int(_hparam(config, "max_position_embeddings")))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(_hparam(config, "num_hidden_layers")))
    writer.add_feed_forward_length(int(_hparam(config, "intermediate_size")))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(_hparam(config, "rms_norm_eps")))
    writer.add_vocab_size(n_vocab)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * n_head != hidden:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    return {"n_head": n_head, "n_kv": n_kv}


def gguf_tensors(arch: Arch, config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF tensors renamed to GGUF names (gguf-py's TensorNameMap), Q/K rows permuted where llama.cpp needs it."""
    n_layers = int(_hparam(config, "num_hidden_layers"))
    n_head = int(_hparam(config, "num_attention_heads"))
    n_kv = int(config.get("num_key_value_heads") or n_head)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH[arch.gguf_arch.upper()], n_layers)
    heads = {"q_proj": n_head, "k_proj": n_kv}
    out: dict[str, np.ndarray] = {}
    for hf_name, data in tensors.items():
        if hf_name.endswith(IGNORED_TENSORS):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConvertError(f"tensor {hf_name} has no GGUF name for architecture {arch.gguf_arch}")
        proj = hf_name.rsplit(".", 2)[-2]
        if arch.permute_qk and proj in heads:
            data = data[qk_row_perm(data.shape[0], heads[proj])]
        out[name] = data
    if config.get("tie_word_embeddings") and "output.weight" in out:
        del out["output.weight"]  # llama.cpp reuses token_embd when output is absent
    return out


def _write(src: Path, tmp: Path, out_type: str) -> None:
    config = read_json(src / "config.json")
    arch = arch_from_config(config)
    tensors = gguf_tensors(arch, config, read_hf_tensors(src))
    if "token_embd.weight" not in tensors:
        raise ConvertError(f"{src} has no token embedding tensor (model.embed_tokens.weight)")
    n_vocab = int(tensors["token_embd.weight"].shape[0])
    if int(config.get("vocab_size", n_vocab)) != n_vocab:
        raise ConvertError(f"config vocab_size {config['vocab_size']} != embedding rows {n_vocab}")
    qtype, ftype = FLOAT_TYPES[out_type]
    writer = gguf.GGUFWriter(tmp, arch.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(src.resolve().name)
    add_hparams(writer, config, n_vocab)
    writer.add_file_type(int(ftype))
    add_hf_tokenizer(writer, src, n_vocab)
    total = 0
    for name, data in tensors.items():
        # Norms and biases stay F32, as llama.cpp's converter does: they are tiny and precision-sensitive.
        t = qtype if data.ndim >= 2 else gguf.GGMLQuantizationType.F32
        arr = np.ascontiguousarray(data, dtype=np.float32)
        if t == gguf.GGMLQuantizationType.F16:
            arr = arr.astype(np.float16)
        elif t == gguf.GGMLQuantizationType.BF16:
            arr = gguf.quants.quantize(arr, t)
        writer.add_tensor(name, arr, raw_dtype=t)
        total += arr.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=total > PROGRESS_BYTES)
    writer.close()


def hf_to_gguf(src: Path, dst: Path, out_type: str = "f32") -> Path:
    """Convert an HF folder (config.json, model.safetensors, tokenizer.json) to a GGUF file at ``dst``.

    out_type: f32, f16, bf16, or a llama.cpp quantization (q8_0, q4_0, q4_1, q4_k_m, q5_k_m, q6_k, iq4_nl; an F32
    GGUF is written to a temp file and quantized by llama.cpp). Raises ConvertError; never leaves a partial dst.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a folder")
    from convert.quantize import QUANT_TYPES, quantize_gguf

    if out_type not in FLOAT_TYPES and out_type not in QUANT_TYPES:
        raise ConvertError(f"unknown --type {out_type!r}; choose from {sorted(FLOAT_TYPES) + sorted(QUANT_TYPES)}")
    with atomic_file(dst) as tmp:
        if out_type in FLOAT_TYPES:
            _write(src, tmp, out_type)
        else:
            with scratch_file(dst.parent, dst.name + ".f32") as f32:
                _write(src, f32, "f32")
                quantize_gguf(f32, tmp, out_type)
    return dst
