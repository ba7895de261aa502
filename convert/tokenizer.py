"""Byte-level BPE tokenizers between HF ``tokenizer.json`` and GGUF ``tokenizer.ggml.*`` metadata.

llama.cpp does not run the HF pre-tokenizer; it picks a built-in regex set by the name in
``tokenizer.ggml.pre``. llama.cpp's own converter finds that name by hashing the ids of a probe string,
which only recognises checkpoints it has seen. Here the name comes from the pre-tokenizer's structure
(PRE_TOKENIZERS), which is what actually decides the splits, so any vocabulary works; the same table
rebuilds the HF pre-tokenizer when going back from GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from convert.errors import ConvertError
from convert.hfio import read_json

LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre name -> the HF pre-tokenizer steps it stands for. A step is
# ("ByteLevel", use_regex) | ("Digits", individual_digits) | ("Split", regex).
PRE_TOKENIZERS: dict[str, tuple[tuple[str, Any], ...]] = {
    "gpt-2": (("ByteLevel", True),),
    "smollm": (("Digits", True), ("ByteLevel", True)),
    "llama-bpe": (("Split", LLAMA3_RE), ("ByteLevel", False)),
    "qwen2": (("Split", QWEN2_RE), ("ByteLevel", False)),
}
# llama.cpp turns BPE merges off for these pre-tokenizers (whole-word vocab hits win), as HF's ignore_merges.
IGNORE_MERGES = {"llama-bpe"}


def _step_key(step: dict) -> tuple[str, Any] | None:
    kind = step.get("type")
    if kind == "ByteLevel":
        return None if step.get("add_prefix_space") else ("ByteLevel", bool(step.get("use_regex", True)))
    if kind == "Digits":
        return ("Digits", bool(step.get("individual_digits")))
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        return ("Split", (step.get("pattern") or {}).get("Regex"))
    return None


def _step_json(key: tuple[str, Any]) -> dict:
    kind, arg = key
    table = {
        "ByteLevel": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": arg},
        "Digits": {"type": "Digits", "individual_digits": arg},
        "Split": {"type": "Split", "pattern": {"Regex": arg}, "behavior": "Isolated", "invert": False},
    }
    return table[kind]


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer name equivalent to a tokenizer.json's pre_tokenizer, or ConvertError."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    key = tuple(_step_key(s) for s in steps)
    for name, known in PRE_TOKENIZERS.items():
        if key == known:
            return name
    raise ConvertError(
        f"unsupported pre-tokenizer {json.dumps(pre)[:300]}; known llama.cpp equivalents: {sorted(PRE_TOKENIZERS)}"
    )


def pre_tokenizer_json(name: str) -> dict:
    """The HF pre_tokenizer JSON for a llama.cpp pre-tokenizer name."""
    if name not in PRE_TOKENIZERS:
        raise ConvertError(f"GGUF pre-tokenizer {name!r} has no HF equivalent here; known: {sorted(PRE_TOKENIZERS)}")
    steps = [_step_json(k) for k in PRE_TOKENIZERS[name]]
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}


def add_hf_tokenizer(writer: gguf.GGUFWriter, src: Path, vocab_size: int) -> None:
    """Write a byte-level BPE tokenizer from an HF folder as GGUF metadata (tokens, types, merges, specials)."""
    tok = read_json(src / "tokenizer.json")
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConvertError(f"{src}/tokenizer.json: only byte-level BPE (gpt2-style) tokenizers are supported")
    pre = pre_tokenizer_name(tok)
    # llama.cpp applies no normalizer; NFC is harmless for these vocabularies (llama.cpp's converter ignores
    # it too), anything else (lowercasing, stripping...) would silently change the ids.
    normalizer = (tok.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise ConvertError(f"{src}/tokenizer.json: normalizer {normalizer!r} has no llama.cpp equivalent")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= vocab_size:
        raise ConvertError(f"tokenizer has id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows beyond the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size)
    # Say explicitly what transformers does; llama.cpp's own default for gpt2 vocabularies differs by model.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def write_hf_tokenizer(reader: gguf.GGUFReader, dst: Path, context_length: int) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json from GGUF metadata; returns the special token ids."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ConvertError(f"GGUF tokenizer model {_field(reader, 'tokenizer.ggml.model')!r} is not supported (gpt2 only)")
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges", [])
    specials = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unk", "padding")}
    specials = {k: int(v) for k, v in specials.items() if v is not None}
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    special_types = {gguf.TokenType.CONTROL: True, gguf.TokenType.USER_DEFINED: False}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": special_types[types[i]]}
        for i, t in enumerate(tokens) if types[i] in special_types
    ]
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != gguf.TokenType.UNUSED}
    # What transformers adds around a text, as llama.cpp's add_bos / add_eos flags say.
    bos = [tokens[specials["bos"]]] if add_bos and "bos" in specials else []
    eos = [tokens[specials["eos"]]] if add_eos and "eos" in specials else []
    tpl_specials = {t: {"id": t, "ids": [tokens.index(t)], "tokens": [t]} for t in bos + eos}

    def template(*seqs: str) -> list[dict]:
        mid = [{"Sequence": {"id": s, "type_id": i}} for i, s in enumerate(seqs)]
        return [{"SpecialToken": {"id": t, "type_id": 0}} for t in bos] + mid + [
            {"SpecialToken": {"id": t, "type_id": 0}} for t in eos
        ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer_json(pre),
        "post_processor": {
            "type": "TemplateProcessing", "single": template("A"), "pair": template("A", "B"),
            "special_tokens": tpl_specials,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab,
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    for kind, hf_key in (("bos", "bos_token"), ("eos", "eos_token"), ("unk", "unk_token"), ("padding", "pad_token")):
        if kind in specials:
            config[hf_key] = tokens[specials[kind]]
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return specials
