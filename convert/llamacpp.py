"""llama.cpp model parameters shared by everything that loads a GGUF (the edge runtime, convert's evaluator).

The AMX guard lives here, below both: on Xeons with AMX, llama.cpp's extra buffer types route quantized mat-muls
through ``ggml_backend_amx_mul_mat``, which segfaults on these models; ``use_extra_bufts=False`` avoids it.
"""

from __future__ import annotations

import llama_cpp


def needs_amx_guard(system_info: bytes) -> bool:
    """True when this llama.cpp build uses AMX, whose quantized mat-mul segfaults (ggml_backend_amx_mul_mat)."""
    return b"AMX_INT8 = 1" in system_info


def safe_model_params(system_info: bytes | None = None) -> llama_cpp.llama_model_params:
    """Default model params with ``use_extra_bufts=False`` when the build uses AMX (avoids the AMX crash).

    Turning extra buffer types off also disables weight repacking, so it is done only where needed.
    ``system_info`` is for tests; by default ``llama_print_system_info()`` is asked.
    """
    if system_info is None:
        system_info = llama_cpp.llama_print_system_info() or b""
    params = llama_cpp.llama_model_default_params()
    if needs_amx_guard(system_info):
        params.use_extra_bufts = False
    return params
