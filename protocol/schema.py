"""The wire schema kit: field types that validate on decode (type, range, size) and name the field that
failed, and the AdapterSpec / Schedule wire forms. Messages (protocol/messages.py) are dataclasses built from it."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import field
from typing import Any

from protocol.codecs import EncodedArray
from protocol.constants import (
    LAMBDA_ONLINE,
    MAX_ID_LEN,
    MAX_SPEC_DIM,
    MAX_SPEC_LAYERS,
    MAX_SPEC_RANK,
    MAX_TEXT_LEN,
    Limits,
)
from protocol.errors import (
    CodecError,
    LimitExceeded,
    ProtocolError,
    SchemaError,
)
from protocol.spec import KINDS, LORA_TARGETS, TRAIN_MODES, AdapterSpec
from protocol.zo import Schedule

I64 = 1 << 63
U64 = 1 << 64

# ================================================================================================
# decoding context and field types
# ================================================================================================
class _Ctx:
    """Per-message decoding budget: array elements and Python records (steps + groups) declared so far."""

    def __init__(self, limits: Limits, body_len: int) -> None:
        self.limits = limits
        self.elements = 0
        # Records are paid for by frame bytes: a tiny frame cannot make us build a million StepRecords.
        self.records_left = 1024 + body_len

    def add_elements(self, n: int, path: str) -> None:
        self.elements += n
        if self.elements > self.limits.max_total_elements:
            raise LimitExceeded(f"{path}: message declares > {self.limits.max_total_elements} array elements in all")

    def add_records(self, n: int, path: str) -> None:
        self.records_left -= n
        if self.records_left < 0:
            raise LimitExceeded(f"{path}: too many step/group records for the frame's size")


def _tname(o: Any) -> str:
    return "nil" if o is None else type(o).__name__


class WireType:
    """How one field goes on the wire: ``dump`` (Python → msgpack-able) and ``load`` (validate → Python)."""

    def dump(self, v: Any) -> Any:
        return v

    def load(self, o: Any, ctx: _Ctx, path: str) -> Any:
        raise NotImplementedError


class IntT(WireType):
    def __init__(self, lo: int = -I64, hi: int = U64 - 1) -> None:
        self.lo, self.hi = lo, hi

    def dump(self, v: Any) -> Any:
        return int(v)

    def load(self, o, ctx, path):
        if type(o) is not int:
            raise SchemaError(f"{path}: expected int, got {_tname(o)}")
        if not self.lo <= o <= self.hi:
            raise SchemaError(f"{path}: {o} out of range [{self.lo}, {self.hi}]")
        return o


class FloatT(WireType):
    """A finite float in [lo, hi] (ints accepted); ``open_lo`` excludes lo."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False) -> None:
        self.lo, self.hi, self.open_lo = lo, hi, open_lo

    def dump(self, v: Any) -> Any:
        return float(v)

    def load(self, o, ctx, path):
        if type(o) not in (float, int):
            raise SchemaError(f"{path}: expected float, got {_tname(o)}")
        f = float(o)
        if not math.isfinite(f):
            raise SchemaError(f"{path}: must be finite, got {f}")
        if f < self.lo or f > self.hi or (self.open_lo and f == self.lo):
            lb = "(" if self.open_lo else "["
            raise SchemaError(f"{path}: {f} out of range {lb}{self.lo}, {self.hi}]")
        return f


class StrT(WireType):
    def __init__(self, max_len: int = MAX_TEXT_LEN, choices: Sequence[str] | None = None, min_len: int = 0) -> None:
        self.max_len, self.choices, self.min_len = max_len, choices, min_len

    def load(self, o, ctx, path):
        if type(o) is not str:
            raise SchemaError(f"{path}: expected str, got {_tname(o)}")
        if not self.min_len <= len(o) <= self.max_len:
            raise SchemaError(f"{path}: length {len(o)} not in [{self.min_len}, {self.max_len}]")
        if self.choices is not None and o not in self.choices:
            raise SchemaError(f"{path}: {o!r} not one of {list(self.choices)}")
        return o


ID = StrT(MAX_ID_LEN, min_len=1)


class BytesT(WireType):
    def __init__(self, size: int) -> None:
        self.size = size

    def load(self, o, ctx, path):
        if type(o) is not bytes:
            raise SchemaError(f"{path}: expected bin, got {_tname(o)}")
        if len(o) != self.size:
            raise SchemaError(f"{path}: expected {self.size} bytes, got {len(o)}")
        return o


class BoolT(WireType):
    def load(self, o, ctx, path):
        if type(o) is not bool:
            raise SchemaError(f"{path}: expected bool, got {_tname(o)}")
        return o


class OptT(WireType):
    def __init__(self, inner: WireType) -> None:
        self.inner = inner

    def dump(self, v):
        return None if v is None else self.inner.dump(v)

    def load(self, o, ctx, path):
        return None if o is None else self.inner.load(o, ctx, path)


class ListT(WireType):
    def __init__(self, inner: WireType, max_len: int = 1 << 16) -> None:
        self.inner, self.max_len = inner, max_len

    def dump(self, v):
        return [self.inner.dump(x) for x in v]

    def load(self, o, ctx, path):
        if type(o) is not list:
            raise SchemaError(f"{path}: expected list, got {_tname(o)}")
        if len(o) > self.max_len:
            raise LimitExceeded(f"{path}: {len(o)} items > limit {self.max_len}")
        return [self.inner.load(x, ctx, f"{path}[{i}]") for i, x in enumerate(o)]


class LamT(WireType):
    """λ: a float in [0, 1] or the string "online"."""

    def dump(self, v):
        return v if v == LAMBDA_ONLINE else float(v)

    def load(self, o, ctx, path):
        if o == LAMBDA_ONLINE:
            return LAMBDA_ONLINE
        return FloatT(0.0, 1.0).load(o, ctx, path)


class EncT(WireType):
    """A compressed array (:class:`~protocol.codecs.EncodedArray`), optionally with a fixed ndim."""

    def __init__(self, ndim: int | None = None) -> None:
        self.ndim = ndim

    def dump(self, v: EncodedArray) -> Any:
        if not isinstance(v, EncodedArray):
            raise SchemaError(f"expected an EncodedArray, got {_tname(v)} (use protocol.codecs.encode)")
        return v.to_wire()

    def load(self, o, ctx, path):
        enc = EncodedArray.from_wire(o, ctx.limits, path)
        if self.ndim is not None and len(enc.shape) != self.ndim:
            raise CodecError(f"{path}: expected a {self.ndim}-d array, got shape {enc.shape}")
        ctx.add_elements(enc.size, path)
        return enc


class ScalarMapT(WireType):
    """A small flat map str → int | float | str | bool (free-form extras, e.g. in Status)."""

    def __init__(self, max_len: int = 64) -> None:
        self.max_len = max_len

    def dump(self, v):
        return {str(k): x for k, x in v.items()}

    def load(self, o, ctx, path):
        if type(o) is not dict:
            raise SchemaError(f"{path}: expected map, got {_tname(o)}")
        if len(o) > self.max_len:
            raise LimitExceeded(f"{path}: {len(o)} entries > limit {self.max_len}")
        out = {}
        for k, x in o.items():
            if type(k) is not str or len(k) > MAX_ID_LEN:
                raise SchemaError(f"{path}: keys must be strings of <= {MAX_ID_LEN} chars")
            if type(x) is str:
                StrT().load(x, ctx, f"{path}.{k}")
            elif type(x) is float and not math.isfinite(x):
                raise SchemaError(f"{path}.{k}: must be finite")
            elif type(x) not in (int, float, bool, str):
                raise SchemaError(f"{path}.{k}: expected a scalar, got {_tname(x)}")
            out[k] = x
        return out


def wf(t: WireType, **kw: Any) -> Any:
    """A dataclass field with its wire type."""
    return field(metadata={"wire": t}, **kw)


@functools.cache
def _fields_of(cls: type) -> dict[str, dataclasses.Field]:
    """A message dataclass's fields by name, computed once per class (``dataclasses.fields`` rebuilds its tuple on
    every call, and the guide decodes thousands of messages a second)."""
    return {f.name: f for f in dataclasses.fields(cls)}


def _dump_fields(obj: Any) -> dict[str, Any]:
    return {name: f.metadata["wire"].dump(getattr(obj, name)) for name, f in _fields_of(type(obj)).items()}


def _load_fields(cls: type, o: Any, ctx: _Ctx, path: str, skip: Sequence[str] = ()) -> Any:
    if type(o) is not dict:
        raise SchemaError(f"{path}: expected map, got {_tname(o)}")
    fields = _fields_of(cls)
    unknown = [k for k in o if k not in fields and k not in skip]
    if unknown:
        raise SchemaError(f"{path}: unknown field(s) {sorted(map(repr, unknown))}")
    kw = {}
    for name, f in fields.items():
        if name not in o:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{path}: missing field {name!r}")
            continue
        kw[name] = f.metadata["wire"].load(o[name], ctx, f"{path}.{name}")
    try:
        obj = cls(**kw)
    except ProtocolError:
        raise
    except (ValueError, TypeError) as e:
        raise SchemaError(f"{path}: {e}") from None
    if hasattr(obj, "check"):
        obj.check(path)
    return obj


class NestedT(WireType):
    """A nested wire dataclass (fields carry their own wire types)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def dump(self, v):
        if not isinstance(v, self.cls):
            raise SchemaError(f"expected {self.cls.__name__}, got {_tname(v)}")
        return _dump_fields(v)

    def load(self, o, ctx, path):
        return _load_fields(self.cls, o, ctx, path)


# ---- AdapterSpec and Schedule (dataclasses owned by spec.py / zo.py) ------------------------------
_DIMS_T = {
    "n_layers": IntT(1, MAX_SPEC_LAYERS),
    "hidden": IntT(1, MAX_SPEC_DIM),
    "intermediate": IntT(1, MAX_SPEC_DIM),
    "n_heads": IntT(1, MAX_SPEC_DIM),
    "n_kv_heads": IntT(1, MAX_SPEC_DIM),
    "head_dim": OptT(IntT(1, MAX_SPEC_DIM)),
}
_SPEC_T = {
    "kind": StrT(16, KINDS),
    "rank": IntT(1, MAX_SPEC_RANK),
    "alpha": FloatT(),
    "targets": ListT(StrT(32, tuple(LORA_TARGETS) + ("l_out",)), len(LORA_TARGETS)),
    "layers": ListT(IntT(0, MAX_SPEC_LAYERS - 1), MAX_SPEC_LAYERS),
    "train": StrT(4, TRAIN_MODES),
}


def _load_map(o: Any, types: dict[str, WireType], ctx: _Ctx, path: str, optional: Sequence[str] = ()) -> dict:
    if type(o) is not dict:
        raise SchemaError(f"{path}: expected map, got {_tname(o)}")
    unknown = [k for k in o if k not in types]
    if unknown:
        raise SchemaError(f"{path}: unknown field(s) {sorted(map(repr, unknown))}")
    missing = [k for k in types if k not in o and k not in optional]
    if missing:
        raise SchemaError(f"{path}: missing field(s) {missing}")
    return {k: types[k].load(v, ctx, f"{path}.{k}") for k, v in o.items()}


class _Passthrough(WireType):
    """Validated by the caller right after (nested maps with their own table)."""

    def load(self, o, ctx, path):
        return o


class SpecT(WireType):
    """An :class:`~protocol.spec.AdapterSpec` as its ``to_dict()``; bounded before it is built (it allocates
    per layer), and its ``d`` must fit ``Limits.max_elements``."""

    def dump(self, v: AdapterSpec):
        return v.to_dict()

    def load(self, o, ctx, path):
        m = _load_map(o, {**_SPEC_T, "dims": _Passthrough()}, ctx, path)
        m["dims"] = _load_map(o["dims"], _DIMS_T, ctx, f"{path}.dims", optional=("head_dim",))
        if m["dims"].get("head_dim") is None:
            m["dims"].pop("head_dim", None)
        try:
            spec = AdapterSpec.from_dict(m)
        except (ValueError, TypeError, KeyError) as e:
            raise SchemaError(f"{path}: {e}") from None
        if spec.d > ctx.limits.max_elements:
            raise LimitExceeded(f"{path}: adapter has d={spec.d} > limit {ctx.limits.max_elements}")
        return spec


_SCHED_T = {
    "lr": FloatT(0.0),
    "eps": FloatT(0.0, open_lo=True),
    "momentum": FloatT(0.0, 1.0),
    "warmup": IntT(0, 1 << 40),
    "decay": StrT(16, ("constant", "cosine", "linear")),
    "total_steps": IntT(0, 1 << 40),
    "min_ratio": FloatT(0.0, 1.0),
    "eps_decay": FloatT(0.0),
}


class ScheduleT(WireType):
    """A :class:`~protocol.zo.Schedule` as a map of its fields."""

    def dump(self, v: Schedule):
        return {k: t.dump(getattr(v, k)) for k, t in _SCHED_T.items()}

    def load(self, o, ctx, path):
        m = _load_map(o, _SCHED_T, ctx, path)
        try:
            return Schedule(**m)
        except ValueError as e:
            raise SchemaError(f"{path}: {e}") from None
