"""Reading Hugging Face checkpoint folders with numpy only: config.json and (sharded) safetensors.

safetensors' own numpy loader cannot read bf16 (numpy has no bf16), so the format — an 8-byte header
length, a JSON header, raw little-endian data — is parsed here directly and bf16 is widened to f32.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from convert.errors import ConvertError

# safetensors dtype -> numpy dtype read from disk (bf16 is read as uint16 and widened below).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}


def read_json(path: Path) -> dict:
    """A JSON file as a dict, or ConvertError naming the file."""
    if not path.is_file():
        raise ConvertError(f"{path.name} not found in {path.parent}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} is not valid JSON: {e}") from e


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen bf16 bit patterns (uint16) to float32 exactly."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as a numpy array (memory-mapped where possible)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ConvertError(f"{path} is not a readable safetensors file: {e}") from e
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConvertError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        arr = data[start:end].view(dtype).reshape(info["shape"])
        out[name] = bf16_to_f32(arr) if info["dtype"] == "BF16" else arr
    return out


def read_hf_tensors(src: Path) -> dict[str, np.ndarray]:
    """All weights of an HF folder: model.safetensors or the shards listed in its index."""
    single = src / "model.safetensors"
    if single.is_file():
        return read_safetensors_file(single)
    index = src / "model.safetensors.index.json"
    if not index.is_file():
        raise ConvertError(f"no model.safetensors (or sharded index) in {src}; only safetensors checkpoints are supported")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(read_json(index)["weight_map"].values())):
        out.update(read_safetensors_file(src / shard))
    return out


NUMPY_TO_SAFETENSORS = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64", np.dtype("<i4"): "I32"}


def write_safetensors_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (in the given order) as one .safetensors file; readable by safetensors/transformers."""
    header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in NUMPY_TO_SAFETENSORS:
            raise ConvertError(f"{name}: dtype {arr.dtype} cannot be written to safetensors here")
        header[name] = {"dtype": NUMPY_TO_SAFETENSORS[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header so tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
