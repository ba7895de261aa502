"""GGUF quantization through llama.cpp's own ``llama_model_quantize`` (the low-level binding)."""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from convert.atomic import atomic_file
from convert.errors import ConvertError

# --type -> llama_ftype (include/llama.h, enum llama_ftype).
QUANT_TYPES: dict[str, int] = {
    "q4_0": 2,  # LLAMA_FTYPE_MOSTLY_Q4_0
    "q4_1": 3,  # LLAMA_FTYPE_MOSTLY_Q4_1
    "q8_0": 7,  # LLAMA_FTYPE_MOSTLY_Q8_0
    "q4_k_m": 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "q5_k_m": 17,  # LLAMA_FTYPE_MOSTLY_Q5_K_M
    "q6_k": 18,  # LLAMA_FTYPE_MOSTLY_Q6_K
    "iq4_nl": 25,  # LLAMA_FTYPE_MOSTLY_IQ4_NL (4.5 bits, non-linear levels; no imatrix needed)
}


# llama.cpp logs one "[  12/ 272] name ..." line per tensor while quantizing: that is the progress.
TENSOR_LINE = re.compile(rb"^\[\s*(\d+)/\s*(\d+)\]")
GGML_LOG_LEVEL_ERROR = 4


@contextmanager
def _log_as_progress(desc: str) -> Iterator[list[str]]:
    """Turn llama.cpp's per-tensor log lines into a tqdm bar for the duration; yields the error lines seen."""
    import llama_cpp

    bar: list[tqdm] = []
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:  # pragma: no cover - C callback
        m = TENSOR_LINE.match(text or b"")
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append((text or b"").decode(errors="replace").strip())
        elif m:
            if not bar:
                total = int(m.group(2))
                bar.append(tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=total <= 100))
            bar[0].n = int(m.group(1))
            bar[0].refresh()

    old_cb, old_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_data))
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(old_cb, old_data)  # whatever logger was there before (edge may have one)
        if bar:
            bar[0].close()


def quantize_gguf(src: Path, dst: Path, qtype: str, nthread: int = 0) -> Path:
    """Quantize an F32/F16 GGUF ``src`` into ``dst`` (atomically). nthread 0: all cores."""
    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise ConvertError(f"unknown quantization {qtype!r}; choose from {sorted(QUANT_TYPES)}")
    if not Path(src).is_file():
        raise ConvertError(f"{src} not found")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = nthread or (os.cpu_count() or 1)
    with atomic_file(Path(dst)) as tmp:
        with _log_as_progress(f"quantize {qtype}") as errors:
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
        if rc != 0:
            raise ConvertError(f"llama.cpp failed to quantize {src} to {qtype}: {' '.join(errors) or f'code {rc}'}")
    return Path(dst)
