"""PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) ⇄ llama.cpp LoRA GGUF.

Names and shapes follow protocol.spec (LORA_TARGETS, PEFT_LORA_NAME, GGUF_LORA_NAME); the base model
(HF folder or GGUF) supplies the architecture and sizes every tensor is checked against.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from convert.arch import arch_from_config
from convert.atomic import atomic_dir
from convert.errors import ConvertError
from convert.hfio import read_json, read_safetensors_file, write_safetensors_file
from convert.lora_gguf import open_gguf, read_lora_gguf, write_lora_gguf
from protocol.spec import GGUF_LORA_NAME, LORA_TARGETS, PEFT_LORA_NAME, ModelDims

PEFT_NAME_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
GGUF_NAME_RE = re.compile(r"^blk\.(\d+)\.(.+)\.weight\.lora_([ab])$")
TARGET_BY_MODULE = {module: t for t, (module, _) in LORA_TARGETS.items()}
TARGET_BY_STEM = {stem: t for t, (_, stem) in LORA_TARGETS.items()}
# adapter_config.json options that change the math in ways a llama.cpp LoRA cannot express.
UNSUPPORTED_PEFT = ("use_dora", "rank_pattern", "alpha_pattern", "layer_replication")


def base_info(base: Path) -> tuple[str, ModelDims]:
    """(GGUF arch name, ModelDims) of a base model given as an HF folder or a GGUF file."""
    base = Path(base)
    if base.is_dir():
        c = read_json(base / "config.json")
        arch = arch_from_config(c)
        n_head = int(c["num_attention_heads"])
        return arch.gguf_arch, ModelDims(
            n_layers=int(c["num_hidden_layers"]), hidden=int(c["hidden_size"]),
            intermediate=int(c["intermediate_size"]), n_heads=n_head,
            n_kv_heads=int(c.get("num_key_value_heads") or n_head), head_dim=c.get("head_dim"),
        )
    from convert.gguf_to_hf import gguf_hparams

    arch, hp = gguf_hparams(open_gguf(base))
    return arch.gguf_arch, ModelDims(
        n_layers=hp["num_hidden_layers"], hidden=hp["hidden_size"], intermediate=hp["intermediate_size"],
        n_heads=hp["num_attention_heads"], n_kv_heads=hp["num_key_value_heads"], head_dim=hp["head_dim"],
    )


def _check_shape(name: str, shape: tuple[int, ...], target: str, part: str, layer: int, dims: ModelDims) -> None:
    if layer >= dims.n_layers:
        raise ConvertError(f"{name}: layer {layer} but the base model has {dims.n_layers} layers")
    out, inp = dims.io(target)
    ok = len(shape) == 2 and (shape[1] == inp if part == "A" else shape[0] == out)
    if not ok:
        want = f"[r, {inp}]" if part == "A" else f"[{out}, r]"
        raise ConvertError(f"{name}: shape {list(shape)} does not fit the base model (expected {want})")


def peft_to_gguf(src: Path, dst: Path, base: Path) -> Path:
    """Convert a PEFT LoRA folder to a llama.cpp LoRA GGUF (F32) for the base model ``base``."""
    src, dst = Path(src), Path(dst)
    cfg = read_json(src / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{src}: peft_type {cfg.get('peft_type')!r} is not LORA")
    bad = [k for k in UNSUPPORTED_PEFT if cfg.get(k)]
    if bad:
        raise ConvertError(f"{src}: PEFT options {bad} are not supported by llama.cpp LoRA")
    if not (src / "adapter_model.safetensors").is_file():
        raise ConvertError(f"adapter_model.safetensors not found in {src}")
    arch, dims = base_info(base)
    peft = read_safetensors_file(src / "adapter_model.safetensors")
    tensors = {}
    for name, arr in peft.items():
        m = PEFT_NAME_RE.match(name)
        if not m or m.group(2) not in TARGET_BY_MODULE:
            raise ConvertError(f"{name}: only LoRA on {sorted(TARGET_BY_MODULE)} inside decoder layers is supported")
        layer, target, part = int(m.group(1)), TARGET_BY_MODULE[m.group(2)], m.group(3)
        _check_shape(name, arr.shape, target, part, layer, dims)
        tensors[GGUF_LORA_NAME.format(bid=layer, stem=LORA_TARGETS[target][1], part=part.lower())] = arr
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    if cfg.get("use_rslora"):  # PEFT scales by alpha/sqrt(r), llama.cpp by alpha/r: fold the difference in
        alpha *= math.sqrt(r)
    return write_lora_gguf(dst, tensors, alpha, arch, n_head=dims.n_heads, n_head_kv=dims.n_kv_heads)


def gguf_to_peft(src: Path, dst: Path, base: Path | None = None) -> Path:
    """Convert a llama.cpp LoRA GGUF to a PEFT folder (adapter_config.json + adapter_model.safetensors).

    ``base`` (HF folder or GGUF) is needed only for llama-arch adapters not written by edgezo (head counts)
    and is recorded as base_model_name_or_path.
    """
    src, dst = Path(src), Path(dst)
    dims = base_info(base)[1] if base is not None else None
    tensors, alpha, _arch = read_lora_gguf(
        src, n_head=dims.n_heads if dims else None, n_head_kv=dims.n_kv_heads if dims else None
    )
    peft, targets, ranks = {}, set(), set()
    for name, arr in tensors.items():
        m = GGUF_NAME_RE.match(name)
        if not m or m.group(2) not in TARGET_BY_STEM:
            raise ConvertError(f"{name}: no PEFT module for GGUF stem {m.group(2) if m else name!r}")
        layer, target, part = int(m.group(1)), TARGET_BY_STEM[m.group(2)], m.group(3).upper()
        if dims is not None:
            _check_shape(name, arr.shape, target, part, layer, dims)
        targets.add(target)
        ranks.add(arr.shape[0] if part == "A" else arr.shape[1])
        peft[PEFT_LORA_NAME.format(bid=layer, module=LORA_TARGETS[target][0], part=part)] = arr
    if len(ranks) != 1:
        raise ConvertError(f"{src}: LoRA tensors have ranks {sorted(ranks)}; PEFT needs one rank")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ranks.pop(),
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "base_model_name_or_path": str(base) if base is not None else None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with atomic_dir(dst) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        write_safetensors_file(tmp / "adapter_model.safetensors", peft)
    return dst


