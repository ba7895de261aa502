"""numpy arrays as a msgpack ext type, and the limit-enforcing msgpack pack/unpack used by every frame.

Ext payload (code :data:`~protocol.constants.EXT_NDARRAY`): ``dtype code (u8) | ndim (u8) | ndim × uint32 LE
dims | raw little-endian bytes``. Never pickle: a dtype code outside the table is refused, as is any payload
whose byte count differs from ``prod(shape) * itemsize`` (checked before anything is allocated).
Non-finite floats in raw arrays are preserved bit for bit; message schemas decide whether they are allowed.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np

from protocol.constants import DEFAULT_LIMITS, EXT_NDARRAY, NDARRAY_DTYPES, Limits
from protocol.errors import LimitExceeded, MalformedFrame, ProtocolError, SchemaError

_CODE_OF: dict[str, int] = {np.dtype(s).str: c for c, s in NDARRAY_DTYPES.items()}
_DTYPE_OF: dict[int, np.dtype] = {c: np.dtype(s) for c, s in NDARRAY_DTYPES.items()}


def pack_ndarray(a: np.ndarray) -> msgpack.ExtType:
    """The ext-type form of ``a`` (any byte order in, little-endian out). Raises TypeError on unsupported dtypes."""
    a = np.asarray(a)
    le = a.dtype.newbyteorder("<") if a.dtype.byteorder not in ("|", "=", "<") else a.dtype
    if le.byteorder == "=":
        le = le.newbyteorder("<")
    code = _CODE_OF.get(le.str)
    if code is None:
        raise TypeError(f"arrays of dtype {a.dtype} cannot go on the wire (allowed: {sorted(NDARRAY_DTYPES.values())})")
    if a.ndim > 255 or any(n >= 1 << 32 for n in a.shape):
        raise TypeError(f"array shape {a.shape} cannot go on the wire")
    head = struct.pack(f"<BB{a.ndim}I", code, a.ndim, *a.shape)
    return msgpack.ExtType(EXT_NDARRAY, head + np.ascontiguousarray(a, dtype=le).tobytes())


def unpack_ndarray(data: bytes, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Inverse of :func:`pack_ndarray`; validates dtype, ndim, element count and byte count before copying."""
    if len(data) < 2:
        raise MalformedFrame(f"ndarray ext payload of {len(data)} bytes is shorter than its 2-byte header")
    code, ndim = data[0], data[1]
    dt = _DTYPE_OF.get(code)
    if dt is None:
        raise SchemaError(f"ndarray ext: unknown dtype code {code}")
    if ndim > limits.max_ndim:
        raise LimitExceeded(f"ndarray ext: {ndim} dimensions > limit {limits.max_ndim}")
    head = 2 + 4 * ndim
    if len(data) < head:
        raise MalformedFrame(f"ndarray ext: {len(data)} bytes cannot hold a {ndim}-d shape")
    shape = struct.unpack_from(f"<{ndim}I", data, 2)
    n = math.prod(shape)  # Python int: no overflow
    if n > limits.max_elements:
        raise LimitExceeded(f"ndarray ext: shape {shape} has {n} elements > limit {limits.max_elements}")
    if len(data) - head != n * dt.itemsize:
        raise MalformedFrame(
            f"ndarray ext: shape {shape} of {dt} needs {n * dt.itemsize} bytes, payload has {len(data) - head}"
        )
    # copy: callers get an ordinary writable array, not a view pinning the whole frame.
    return np.frombuffer(data, dtype=dt, count=n, offset=head).reshape(shape).astype(dt.newbyteorder("="))


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return pack_ndarray(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot put {type(obj).__name__} on the wire")


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (ndarrays as ext types, numpy scalars as Python scalars, floats as doubles)."""
    return msgpack.packb(obj, default=_default, use_bin_type=True, strict_types=False)


def check_depth(obj: Any, max_depth: int) -> None:
    """Raise LimitExceeded if containers nest deeper than ``max_depth`` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, list):
            children = o
        elif isinstance(o, dict):
            children = list(o.values())
        else:
            continue
        if depth > max_depth:
            raise LimitExceeded(f"containers nested deeper than the limit of {max_depth}")
        stack.extend((c, depth + 1) for c in children if isinstance(c, (list, dict)))


def unpackb(body: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one msgpack object under ``limits``; every failure is a ProtocolError.

    The per-container limits are also capped by ``len(body)``: each item takes at least one byte, so a header
    claiming more items than bytes left is refused before msgpack preallocates a list for it.
    """
    n = len(body)

    def ext_hook(code: int, data: bytes) -> Any:
        if code != EXT_NDARRAY:
            raise SchemaError(f"unknown msgpack ext type {code}")
        return unpack_ndarray(data, limits)

    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=ext_hook,
            max_str_len=min(limits.max_str, n),
            max_bin_len=min(limits.max_bin, n),
            max_array_len=min(limits.max_list, n),
            max_map_len=min(limits.max_map, n // 2),
            max_ext_len=min(limits.max_bin, n),
        )
    except ProtocolError:
        raise
    except msgpack.exceptions.StackError:
        raise MalformedFrame("frame body nests containers deeper than msgpack's stack allows") from None
    except msgpack.ExtraData as e:
        raise MalformedFrame(f"frame body holds trailing bytes after one msgpack object ({e})") from None
    except (ValueError, TypeError, msgpack.UnpackException, UnicodeDecodeError, OverflowError) as e:
        # ValueError covers msgpack's FormatError/StackError and "exceeds max_*_len" limit errors.
        raise MalformedFrame(f"frame body is not valid msgpack under the limits: {type(e).__name__}: {e}") from None
    except RecursionError:
        raise MalformedFrame("frame body nests too deeply") from None
    check_depth(obj, limits.max_depth)
    return obj
