"""Adapters llama.cpp holds, rewritten in place between decodes.

An F32 LoRA GGUF is loaded once with ``llama_adapter_lora_init``; its tensors live in host memory. We find
their data pointers once, through the eval callback of a short-lived discovery context (the LoRA
``mul_mat`` nodes have the adapter tensors as ``src[0]``), and from then on θ ± εz is written straight into
those buffers with numpy: no file reload, no graph rebuild (DESIGN.md, "Zeroth-order step").
"""

from __future__ import annotations

import ctypes
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import llama_cpp
import numpy as np

from edge.runtime import Runtime, RuntimeErrorEZ, check_gguf
from protocol.spec import LORA_TARGETS, AdapterSpec, ModelDims

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_TYPE_F32 = 0
_LORA_NAME = re.compile(rb"^blk\.\d+\.\w+\.weight\.lora_[ab]$")


class GGMLTensor(ctypes.Structure):
    """The fields of ``struct ggml_tensor`` (vendor/llama.cpp/ggml/include/ggml.h) up to ``name``."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


# ---- adapter files -------------------------------------------------------------------------------------
def write_adapter_gguf(path: str | os.PathLike, spec: AdapterSpec, tensors: Mapping[str, np.ndarray], arch: str) -> None:
    """A standard llama.cpp LoRA GGUF (F32; tensors given in PEFT layout), written atomically by convert.lora_gguf.

    For the llama arch, B rows of attn_q / attn_k are stored rope-permuted, as llama.cpp holds Q and K.
    """
    from convert.lora_gguf import write_lora_gguf

    out: dict[str, np.ndarray] = {}
    for info in spec.tensors:
        arr = np.asarray(tensors[info.gguf_name], dtype=np.float32)
        if tuple(arr.shape) != info.shape:
            raise ValueError(f"{info.gguf_name}: shape {arr.shape} != spec shape {info.shape}")
        out[info.gguf_name] = arr
    write_lora_gguf(Path(path), out, spec.alpha, arch, n_head=spec.dims.n_heads, n_head_kv=spec.dims.n_kv_heads)


def read_adapter_gguf(path: str | os.PathLike, dims: ModelDims | None = None) -> tuple[dict[str, np.ndarray], float, str]:
    """(tensors in PEFT layout keyed by GGUF name, alpha, arch); clear errors for missing/corrupt files."""
    from convert.errors import ConvertError
    from convert.lora_gguf import read_lora_gguf

    p = check_gguf(path, "adapter")
    try:
        return read_lora_gguf(
            p, n_head=dims.n_heads if dims else None, n_head_kv=dims.n_kv_heads if dims else None
        )
    except ConvertError as e:
        raise RuntimeErrorEZ(f"adapter {p}: {e}") from e
    except Exception as e:  # gguf raises assorted errors on corrupt files
        raise RuntimeErrorEZ(f"adapter file {p} is corrupt: {e}") from e


def infer_spec(tensors: Mapping[str, np.ndarray], alpha: float, dims: ModelDims) -> AdapterSpec:
    """The AdapterSpec (train="AB") of a LoRA adapter from its tensor names and shapes."""
    stems = {stem: t for t, (_, stem) in LORA_TARGETS.items()}
    layers: set[int] = set()
    targets: list[str] = []
    rank = 0
    for name, arr in tensors.items():
        m = _LORA_NAME.match(name.encode())
        parts = name.split(".")
        if not m or parts[2] not in stems:
            raise RuntimeErrorEZ(f"adapter tensor {name!r} is not a LoRA tensor edgezo knows")
        layers.add(int(parts[1]))
        if stems[parts[2]] not in targets:
            targets.append(stems[parts[2]])
        if name.endswith("lora_a"):
            rank = int(arr.shape[0])
    order = [t for t in LORA_TARGETS if t in targets]
    try:
        spec = AdapterSpec("lora", dims, rank=rank, alpha=alpha, targets=tuple(order), layers=tuple(sorted(layers)))
    except ValueError as e:
        raise RuntimeErrorEZ(f"adapter does not fit this model: {e}") from e
    for info in spec.tensors:
        arr = tensors.get(info.gguf_name)
        if arr is None or tuple(arr.shape) != info.shape:
            got = None if arr is None else tuple(arr.shape)
            raise RuntimeErrorEZ(f"adapter does not fit this model: {info.gguf_name} has shape {got}, model needs {info.shape}")
    return spec


def check_adapter_fits(spec: AdapterSpec, rt: Runtime, arch: str | None, tensors: Mapping[str, np.ndarray]) -> None:
    """Clear errors for an adapter made for another architecture or model shape."""
    if arch and arch != rt.arch:
        raise RuntimeErrorEZ(f"adapter is for architecture {arch!r}, model is {rt.arch!r}")
    dims = rt.dims()
    if spec.dims != dims:
        raise RuntimeErrorEZ(f"adapter was made for model dims {spec.dims.to_dict()}, model has {dims.to_dict()}")
    for info in spec.tensors:
        arr = tensors.get(info.gguf_name)
        if arr is None:
            raise RuntimeErrorEZ(f"adapter tensor {info.gguf_name} missing")
        if tuple(arr.shape) != info.shape:
            raise RuntimeErrorEZ(f"adapter tensor {info.gguf_name} has shape {tuple(arr.shape)}, model needs {info.shape}")


# ---- in-place LoRA ---------------------------------------------------------------------------------------
def _find_lora_buffers(rt: Runtime, adapter) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{gguf name: (data pointer, numpy shape)} of every LoRA tensor, found via a discovery context's eval callback."""
    found: dict[str, tuple[int, tuple[int, ...]]] = {}
    bad: list[str] = []

    def cb(t: int, ask: bool, user_data: int) -> bool:
        node = GGMLTensor.from_address(t)
        for s in node.src:
            if not s:
                continue
            src = GGMLTensor.from_address(s)
            name = src.name
            if _LORA_NAME.match(name) and name not in found:
                if src.type != GGML_TYPE_F32 or not src.data:
                    bad.append(name.decode())
                    continue
                ne = [int(src.ne[i]) for i in range(GGML_MAX_DIMS)]
                found[name.decode()] = (int(src.data), (ne[1], ne[0]))  # numpy row-major = reversed ne
        return False  # we never need the node's data

    cb_c = llama_cpp.ggml_backend_sched_eval_callback(cb)
    params = rt.context_params(cb_c)
    params.n_ctx = params.n_batch = params.n_ubatch = 64
    ctx = llama_cpp.llama_init_from_model(rt.model, params)
    if not ctx:
        raise RuntimeErrorEZ("could not create the adapter discovery context")
    try:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        llama_cpp.llama_set_adapters_lora(ctx, adapters, 1, scales)
        rt.logits([rt.bos() or [0]], [[0]], cols=[0], ctx=ctx, kind="discovery")
        llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
    finally:
        llama_cpp.llama_free(ctx)
    if bad:
        raise RuntimeErrorEZ(f"adapter tensors are not host F32 buffers: {bad[:3]}")
    return found


class LoraAdapter:
    """A LoRA adapter llama.cpp holds on ``rt.ctx`` whose tensors we rewrite in place.

    ``write(theta)`` puts θ's trainable tensors into llama.cpp's buffers; frozen tensors (train="B": A)
    keep the values they were loaded with.
    """

    def __init__(self, rt: Runtime, spec: AdapterSpec, tensors: Mapping[str, np.ndarray]) -> None:
        if spec.kind != "lora":
            raise ValueError(f"LoraAdapter needs a lora spec, got {spec.kind!r}")
        check_adapter_fits(spec, rt, None, tensors)
        self.rt, self.spec = rt, spec
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "adapter.gguf"
            write_adapter_gguf(f, spec, tensors, rt.arch)
            self.handle = llama_cpp.llama_adapter_lora_init(rt.model, str(f).encode())
        if not self.handle:
            raise RuntimeErrorEZ("llama.cpp rejected the adapter (wrong architecture or shapes?)")
        found = _find_lora_buffers(rt, self.handle)
        self.views: dict[str, np.ndarray] = {}
        for info in spec.tensors:
            if info.gguf_name not in found:
                raise RuntimeErrorEZ(f"adapter tensor {info.gguf_name} is not used by the model graph")
            ptr, shape = found[info.gguf_name]
            if shape != info.shape:
                raise RuntimeErrorEZ(f"{info.gguf_name}: llama.cpp holds shape {shape}, spec says {info.shape}")
            buf = (ctypes.c_float * info.size).from_address(ptr)
            self.views[info.gguf_name] = np.ctypeslib.as_array(buf).reshape(info.shape)
        from convert.lora_gguf import lora_row_perms

        shapes = [(i.gguf_name, i.shape[0]) for i in spec.tensors if i.part == "B"]
        self.perms = lora_row_perms(shapes, rt.arch, spec.dims.n_heads, spec.dims.n_kv_heads)  # llama: Q/K B rows
        self._set(self.handle)

    def _set(self, handle) -> None:
        if handle is None:
            llama_cpp.llama_set_adapters_lora(self.rt.ctx, None, 0, None)
            return
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(handle)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self.rt.ctx, adapters, 1, scales) != 0:
            raise RuntimeErrorEZ("llama_set_adapters_lora failed")

    def write(self, theta: np.ndarray) -> None:
        """Write θ (d,) float32 into the trainable tensors llama.cpp reads at the next decode."""
        for info in self.spec.tensors:
            if info.trainable:
                src = theta[info.offset : info.offset + info.size].reshape(info.shape)  # PEFT layout
                perm = self.perms.get(info.gguf_name)
                self.views[info.gguf_name][...] = src if perm is None else src[perm]

    def write_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Write tensors (PEFT layout, keyed by GGUF name) into llama.cpp's buffers."""
        for name, arr in tensors.items():
            perm = self.perms.get(name)
            self.views[name][...] = arr if perm is None else np.asarray(arr)[perm]

    def read(self) -> dict[str, np.ndarray]:
        """Copies of every adapter tensor as llama.cpp holds them now, in PEFT layout."""
        out = {}
        for k, v in self.views.items():
            perm = self.perms.get(k)
            out[k] = v.copy() if perm is None else v[np.argsort(perm)].copy()
        return out

    def close(self) -> None:
        """Detach from the context, then free (never free an adapter the context still uses)."""
        if self.handle is not None:
            self._set(None)
            self.views.clear()
            llama_cpp.llama_adapter_lora_free(self.handle)
            self.handle = None


# ---- control vectors ---------------------------------------------------------------------------------------
CONTROL_ARCH = "controlvector"  # general.architecture of llama.cpp's control-vector GGUF (common/common.cpp)


class ControlAdapter:
    """A control vector: one direction per layer, added to the residual stream after that layer.

    llama.cpp owns one (n_embd,) F32 tensor per layer 1..n_layer-1 (layer 0 has no slot) and
    ``llama_set_adapter_cvec`` copies a host buffer into them; nothing is reloaded or reallocated after the first
    call, so ``write(theta)`` is the same in-place write as LoRA's, just through llama.cpp's own copy.
    """

    def __init__(self, rt: Runtime, spec: AdapterSpec, tensors: Mapping[str, np.ndarray]) -> None:
        if spec.kind != "control":
            raise ValueError(f"ControlAdapter needs a control spec, got {spec.kind!r}")
        if spec.dims != rt.dims():
            raise RuntimeErrorEZ(f"control vector made for dims {spec.dims.to_dict()}, model has {rt.dims().to_dict()}")
        if 0 in spec.layers:
            raise ValueError("llama.cpp has no control-vector slot for layer 0: use layers 1..n_layers-1")
        self.rt, self.spec = rt, spec
        self.buf = np.zeros((rt.n_layer - 1, rt.n_embd), np.float32)  # row il-1 holds layer il
        self.write_tensors(tensors)

    def _apply(self) -> None:
        ptr = self.buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if llama_cpp.llama_set_adapter_cvec(self.rt.ctx, ptr, self.buf.size, self.rt.n_embd, 1, self.rt.n_layer - 1):
            raise RuntimeErrorEZ("llama_set_adapter_cvec failed")

    def write(self, theta: np.ndarray) -> None:
        """θ (d,) float32 → the per-layer directions llama.cpp adds at the next decode."""
        for info in self.spec.tensors:
            self.buf[info.layer - 1] = theta[info.offset : info.offset + info.size]
        self._apply()

    def write_tensors(self, tensors: Mapping[str, np.ndarray]) -> None:
        for info in self.spec.tensors:
            arr = tensors.get(info.gguf_name)
            if arr is None or tuple(np.shape(arr)) != info.shape:
                got = None if arr is None else tuple(np.shape(arr))
                raise RuntimeErrorEZ(f"control tensor {info.gguf_name} has shape {got}, model needs {info.shape}")
            self.buf[info.layer - 1] = arr
        self._apply()

    def read(self) -> dict[str, np.ndarray]:
        return {i.gguf_name: self.buf[i.layer - 1].copy() for i in self.spec.tensors}

    def close(self) -> None:
        """Clear the context's control vector (llama.cpp keeps its small buffers until the context is freed)."""
        if self.rt.ctx:
            llama_cpp.llama_set_adapter_cvec(self.rt.ctx, None, 0, self.rt.n_embd, -1, -1)


def make_adapter(rt: Runtime, spec: AdapterSpec, tensors: Mapping[str, np.ndarray]) -> LoraAdapter | ControlAdapter:
    """The in-place adapter for ``spec.kind``."""
    return ControlAdapter(rt, spec, tensors) if spec.kind == "control" else LoraAdapter(rt, spec, tensors)


def write_control_gguf(path: str | os.PathLike, spec: AdapterSpec, tensors: Mapping[str, np.ndarray], arch: str) -> None:
    """llama.cpp's control-vector GGUF (``--control-vector FILE``): tensors ``direction.{il}``, written atomically."""
    import gguf

    from convert.atomic import atomic_file

    with atomic_file(Path(path)) as tmp:
        w = gguf.GGUFWriter(str(tmp), CONTROL_ARCH)
        w.add_string(f"{CONTROL_ARCH}.model_hint", arch)
        w.add_uint32(f"{CONTROL_ARCH}.layer_count", len(spec.tensors))
        for info in spec.tensors:
            w.add_tensor(info.gguf_name, np.ascontiguousarray(tensors[info.gguf_name], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def adapter_kind(path: str | os.PathLike) -> str:
    """"control" for a control-vector GGUF, else "lora" (read from general.architecture)."""
    import gguf

    try:
        f = gguf.GGUFReader(Path(path)).fields.get("general.architecture")
        arch = bytes(f.parts[f.data[0]]).decode() if f else ""
    except Exception as e:  # gguf raises assorted errors on corrupt files
        raise RuntimeErrorEZ(f"adapter {path}: not a readable GGUF ({e})") from e
    return "control" if arch == CONTROL_ARCH else "lora"


def read_control_gguf(path: str | os.PathLike, dims: ModelDims) -> tuple[AdapterSpec, dict[str, np.ndarray], str]:
    """(spec, tensors, model hint) of a control-vector GGUF; clear errors for another model's vector."""
    import gguf

    p = check_gguf(path, "control vector")
    r = gguf.GGUFReader(p)
    f = r.fields.get("general.architecture")
    if f is None or bytes(f.parts[f.data[0]]).decode() != CONTROL_ARCH:
        raise RuntimeErrorEZ(f"{p} is not a control-vector GGUF")
    hint_f = r.fields.get(f"{CONTROL_ARCH}.model_hint")
    hint = bytes(hint_f.parts[hint_f.data[0]]).decode() if hint_f else ""
    tensors = {t.name: np.array(t.data, np.float32).reshape(-1) for t in r.tensors}
    layers = []
    for name, arr in tensors.items():
        if not re.fullmatch(r"direction\.\d+", name) or arr.size != dims.hidden:
            raise RuntimeErrorEZ(f"{p}: tensor {name} with {arr.size} values does not fit a model of width {dims.hidden}")
        layers.append(int(name.split(".")[1]))
    try:
        spec = AdapterSpec("control", dims, layers=tuple(sorted(layers)))
    except ValueError as e:
        raise RuntimeErrorEZ(f"{p}: {e}") from e
    return spec, tensors, hint
