"""A minimal llama.cpp evaluator for checking conversions: logits at every position, tokenization.

Exact settings (F32 KV cache, flash attention off) so that an F32 GGUF can be compared with torch at 1e-4.
Models are loaded with the AMX guard (convert.llamacpp.safe_model_params, shared with the edge runtime).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from convert.errors import ConvertError
from convert.llamacpp import safe_model_params


def model_params() -> llama_cpp.llama_model_params:
    """Default model params with the AMX guard (use_extra_bufts off where AMX quantized matmul crashes)."""
    return safe_model_params()


class LlamaEval:
    """One GGUF model + context; optional LoRA adapters. Use as a context manager to free it."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = 512,
        loras: Sequence[tuple[Path, float]] = (),
        n_threads: int = 0,
        vocab_only: bool = False,
    ):
        llama_cpp.llama_backend_init()
        params = model_params()
        params.vocab_only = vocab_only  # tokenizer checks need no weights
        self.model = llama_cpp.llama_model_load_from_file(os.fsencode(path), params)
        self.ctx = None
        self.adapters: list = []
        if not self.model:
            raise ConvertError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = n_ctx
        if vocab_only:
            return
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32  # an F16 cache alone costs ~3e-3 in the logits
        cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.n_threads = cp.n_threads_batch = n_threads or (os.cpu_count() or 1)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise ConvertError(f"llama.cpp could not create a context for {path}")
        for lora_path, _ in loras:
            a = llama_cpp.llama_adapter_lora_init(self.model, os.fsencode(lora_path))
            if not a:
                self.close()
                raise ConvertError(f"llama.cpp could not load LoRA {lora_path}")
            self.adapters.append(a)
        if loras:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(loras))(*self.adapters)
            scales = (ctypes.c_float * len(loras))(*[s for _, s in loras])
            if llama_cpp.llama_set_adapters_lora(self.ctx, arr, len(loras), scales) != 0:
                self.close()
                raise ConvertError("llama.cpp refused the LoRA adapters")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), n_vocab] float32 logits of one sequence, from an empty KV cache."""
        n = len(ids)
        if self.ctx is None:
            raise ConvertError("this LlamaEval was opened vocab_only")
        if not 0 < n <= self.n_ctx:
            raise ValueError(f"sequence length {n} not in 1..{self.n_ctx}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = n
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise ConvertError("llama_decode failed")
            rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                    for i in range(n)]
            return np.array(rows, dtype=np.float32)
        finally:
            llama_cpp.llama_batch_free(batch)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's token ids for ``text``."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def close(self) -> None:
        """Free adapters, context and model."""
        for a in self.adapters:
            llama_cpp.llama_adapter_lora_free(a)
        self.adapters = []
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaEval:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
