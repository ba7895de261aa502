"""Message schemas, and ``encode`` / ``decode`` of whole frames.

A frame is ``4-byte big-endian body length | msgpack map {"v": PROTOCOL_VERSION, "type": NAME, <fields>}``.
Each message is a keyword-only dataclass; its field names are the wire keys and each field's ``wire``
metadata says how it is validated (type, range, size). Decoding refuses unknown fields, missing required
fields, wrong types and out-of-range values with a :class:`~protocol.errors.SchemaError` naming the field.

Conversation (the cloud daemon is the server)::

    client                          server
    Hello(client_id, versions)  →
                                ←   Challenge(nonce)
    Auth(client_id, nonce, mac) →                      (protocol.auth: HMAC-SHA256 over the nonce)
                                ←   Welcome(session_id)  | Error(code="auth"/"replayed_nonce")
    RoundRequest(last_round)    →
                                ←   RoundStart(round_id, spec, theta, guidance, lam, hyper, deadline)
    Update(round_id, steps,...) →
                                ←   Ack(round_id, accepted, reason)
    ...                                                 (StatusRequest → Status at any time after Welcome)
    Bye()                       →

Non-finite floats: every float field must be finite (SchemaError otherwise), except where a docstring says
so; raw float arrays (Update grads) must be finite too. Compressed arrays: see :mod:`protocol.codecs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from protocol.arrays import packb, unpackb
from protocol.codecs import CodecConfig, EncodedArray
from protocol.codecs import encode as encode_array
from protocol.constants import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    KEY_TYPE,
    KEY_VERSION,
    LAMBDA_ONLINE,
    MAC_SIZE,
    MAX_GUIDE_IDS,
    MAX_ID_LEN,
    MAX_SPEC_DIM,
    MAX_SPEC_LAYERS,
    MAX_SPEC_RANK,
    MAX_TEXT_LEN,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    STEPS_COUNT,
    STEPS_GRADS,
    STEPS_KEYS,
    STEPS_LAMS,
    STEPS_N_GROUPS,
    STEPS_SEEDS,
    STEPS_SIZES,
    STEPS_SPAN_IDX,
    STEPS_SPANS,
    SUPPORTED_VERSIONS,
    T_ACK,
    T_AUTH,
    T_BYE,
    T_CHALLENGE,
    T_ERROR,
    T_GUIDANCE_NEXT,
    T_GUIDANCE_REQUEST,
    T_HELLO,
    T_ROUND_REQUEST,
    T_ROUND_START,
    T_STATUS,
    T_STATUS_REQUEST,
    T_UPDATE,
    T_WELCOME,
    Limits,
)
from protocol.errors import (
    CodecError,
    FrameTooLarge,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    SchemaError,
    TruncatedFrame,
    UnknownMessageType,
    VersionMismatch,
    error_for_code,
)
from protocol.spec import KINDS, LORA_TARGETS, TRAIN_MODES, AdapterSpec
from protocol.zo import GUIDE_KINDS, Group, Guide, Schedule, StepRecord, replay

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


def _dump_fields(obj: Any) -> dict[str, Any]:
    return {f.name: f.metadata["wire"].dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _load_fields(cls: type, o: Any, ctx: _Ctx, path: str, skip: Sequence[str] = ()) -> Any:
    if type(o) is not dict:
        raise SchemaError(f"{path}: expected map, got {_tname(o)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
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


# ---- StepRecord lists, compactly ------------------------------------------------------------------
def _compact_ints(vals: Sequence[int]) -> int | np.ndarray:
    """An int when every value is the same (or there are none), else the smallest unsigned array."""
    if not vals or all(v == vals[0] for v in vals):
        return int(vals[0]) if vals else 0
    m = max(vals)
    dt = np.uint8 if m < 1 << 8 else np.uint16 if m < 1 << 16 else np.uint32 if m < 1 << 32 else np.uint64
    return np.asarray(vals, dtype=dt)


def _expand_ints(o: Any, n: int, hi: int, path: str) -> np.ndarray:
    """Inverse of :func:`_compact_ints` for ``n`` values (int64), each in [0, hi] (so sums cannot overflow)."""
    if type(o) is int:
        if not 0 <= o <= hi:
            raise SchemaError(f"{path}: {o} out of range [0, {hi}]")
        return np.full(n, o, np.int64)
    if not isinstance(o, np.ndarray) or o.ndim != 1 or o.dtype.kind != "u":
        raise SchemaError(f"{path}: expected an int or a 1-d unsigned int array, got {_tname(o)}")
    if o.size != n:
        raise SchemaError(f"{path}: expected {n} values, got {o.size}")
    if o.size and int(o.max()) > hi:
        raise SchemaError(f"{path}: value {int(o.max())} out of range [0, {hi}]")
    return o.astype(np.int64)


def step_records_to_wire(steps: Sequence[StepRecord]) -> dict[str, Any]:
    """The compact wire form of a StepRecord list: all seeds in one uint64 array, all grads in one float32
    array, per-step group counts / per-group sizes and span indices as one int each when uniform (else a
    small uint array), the distinct spans once, λ as one float when uniform. ≈ 12 bytes per perturbation."""
    groups = [g for s in steps for g in s.groups]
    spans: dict[tuple[int, int], int] = {}
    span_idx = [spans.setdefault((int(g.start), int(g.stop)), len(spans)) for g in groups]
    lams = [float(s.lam) for s in steps]
    seeds = np.concatenate([g.seeds for g in groups]) if groups else np.zeros(0, np.uint64)
    grads = np.concatenate([g.grads for g in groups]) if groups else np.zeros(0, np.float32)
    return {
        STEPS_COUNT: len(steps),
        STEPS_SEEDS: seeds.astype(np.uint64, copy=False),
        STEPS_GRADS: grads.astype(np.float32, copy=False),
        STEPS_N_GROUPS: _compact_ints([len(s.groups) for s in steps]),
        STEPS_SIZES: _compact_ints([int(g.seeds.size) for g in groups]),
        STEPS_SPAN_IDX: _compact_ints(span_idx),
        STEPS_SPANS: [list(sp) for sp in spans],
        STEPS_LAMS: lams[0] if lams and all(v == lams[0] for v in lams) else np.asarray(lams, np.float64)
        if lams else 0.0,
    }


def step_records_from_wire(o: Any, limits: Limits = DEFAULT_LIMITS, d: int | None = None,
                           _ctx: _Ctx | None = None, path: str = "steps") -> list[StepRecord]:
    """Validate and rebuild the StepRecord list of :func:`step_records_to_wire`; spans checked against ``d``."""
    ctx = _ctx or _Ctx(limits, 1 << 30)
    if type(o) is not dict:
        raise SchemaError(f"{path}: expected map, got {_tname(o)}")
    if set(o) != set(STEPS_KEYS):
        raise SchemaError(f"{path}: keys {sorted(map(str, o))} != {sorted(STEPS_KEYS)}")
    n_steps = IntT(0, limits.max_list).load(o[STEPS_COUNT], ctx, f"{path}.{STEPS_COUNT}")
    seeds, grads = o[STEPS_SEEDS], o[STEPS_GRADS]
    if not (isinstance(seeds, np.ndarray) and seeds.dtype == np.uint64 and seeds.ndim == 1):
        raise SchemaError(f"{path}.{STEPS_SEEDS}: expected a 1-d uint64 array")
    if not (isinstance(grads, np.ndarray) and grads.dtype == np.float32 and grads.shape == seeds.shape):
        raise SchemaError(f"{path}.{STEPS_GRADS}: expected a float32 array matching seeds ({seeds.size})")
    if not np.isfinite(grads).all():
        raise SchemaError(f"{path}.{STEPS_GRADS}: non-finite projected gradients are refused")
    ctx.add_records(n_steps, path)
    n_groups = _expand_ints(o[STEPS_N_GROUPS], n_steps, limits.max_list, f"{path}.{STEPS_N_GROUPS}")
    total_groups = int(n_groups.sum())
    ctx.add_records(total_groups, path)
    sizes = _expand_ints(o[STEPS_SIZES], total_groups, seeds.size, f"{path}.{STEPS_SIZES}")
    if int(sizes.sum()) != seeds.size:
        raise SchemaError(f"{path}: group sizes sum to {int(sizes.sum())}, {seeds.size} seeds sent")
    spans_o = o[STEPS_SPANS]
    if type(spans_o) is not list or len(spans_o) > max(1, total_groups):
        raise SchemaError(f"{path}.{STEPS_SPANS}: expected a list of at most one span per group")
    spans = []
    for i, sp in enumerate(spans_o):
        if type(sp) is not list or len(sp) != 2 or type(sp[0]) is not int or type(sp[1]) is not int:
            raise SchemaError(f"{path}.{STEPS_SPANS}[{i}]: expected [start, stop]")
        start, stop = sp
        hi = d if d is not None else I64
        if not (0 <= start <= hi and (stop == -1 or start < stop <= hi)):
            raise SchemaError(f"{path}.{STEPS_SPANS}[{i}]: span {sp} invalid (0 <= start < stop <= d, or stop -1)")
        spans.append((start, stop))
    span_idx = _expand_ints(o[STEPS_SPAN_IDX], total_groups, max(0, len(spans) - 1), f"{path}.{STEPS_SPAN_IDX}")
    if total_groups and (not spans or int(span_idx.max()) >= len(spans)):
        raise SchemaError(f"{path}.{STEPS_SPAN_IDX}: index out of range of {len(spans)} spans")
    lams_o = o[STEPS_LAMS]
    if isinstance(lams_o, np.ndarray):
        if lams_o.dtype != np.float64 or lams_o.shape != (n_steps,):
            raise SchemaError(f"{path}.{STEPS_LAMS}: expected float64 array of {n_steps}")
        if not (np.isfinite(lams_o).all() and ((lams_o >= 0) & (lams_o <= 1)).all()):
            raise SchemaError(f"{path}.{STEPS_LAMS}: λ must be finite and in [0, 1]")
        lams = lams_o.tolist()
    else:
        lams = [FloatT(0.0, 1.0).load(lams_o, ctx, f"{path}.{STEPS_LAMS}")] * n_steps
    out: list[StepRecord] = []
    offs = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    gi = 0
    for s in range(n_steps):
        grps = []
        for _ in range(int(n_groups[s])):
            a, b = offs[gi], offs[gi + 1]
            start, stop = spans[int(span_idx[gi])]
            grps.append(Group(seeds[a:b].copy(), grads[a:b].copy(), start, stop))
            gi += 1
        out.append(StepRecord(groups=grps, lam=lams[s]))
    return out


class StepsT(WireType):
    def dump(self, v):
        return step_records_to_wire(v)

    def load(self, o, ctx, path):
        return step_records_from_wire(o, ctx.limits, None, ctx, path)


# ================================================================================================
# nested payload dataclasses
# ================================================================================================
def array_digest(*arrays: np.ndarray, extra: bytes = b"") -> str:
    """A short hex digest (sha256, 16 hex chars) of arrays' dtypes, shapes and bytes: θ and guide ids."""
    h = hashlib.sha256(extra)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def theta_digest(theta: np.ndarray) -> str:
    """Digest of θ (float32): lets edge and cloud check they hold the same bits after a replay."""
    return array_digest(np.asarray(theta, np.float32))


@dataclass(kw_only=True)
class Guidance:
    """Cloud guidance of one round on the wire: basis Q (d, k), cloud gradient g_B (d,) or None, mixing α.

    Q and g_B are compressed, so they are lossy: **both sides must use the decoded arrays** (``to_guide()``),
    the cloud included when it replays uploads, or replay stops being exact. ``guide_id`` is the digest of the
    decoded arrays and α (:meth:`from_guide` computes it); the edge echoes it in :class:`Update`.
    """

    basis: EncodedArray = wf(EncT(2))
    grad: EncodedArray | None = wf(OptT(EncT(1)), default=None)
    alpha: float = wf(FloatT(0.0, 1.0, open_lo=True), default=0.5)
    guide_id: str = wf(StrT(MAX_ID_LEN), default="")
    kind: str = wf(StrT(16, choices=GUIDE_KINDS), default="guided")  # "subspace": θ = θ_t + Q·c (round v2)

    def check(self, path: str) -> None:
        d, k = self.basis.shape
        if k < 1 or d < k:
            raise SchemaError(f"{path}.basis: shape {self.basis.shape} must be (d, k) with d >= k >= 1")
        if self.grad is not None and self.grad.shape != (d,):
            raise SchemaError(f"{path}.grad: shape {self.grad.shape} != ({d},)")

    @property
    def d(self) -> int:
        return int(self.basis.shape[0])

    def to_guide(self) -> Guide:
        """The :class:`~protocol.zo.Guide` both sides use (decoded, float32)."""
        grad = None if self.grad is None else self.grad.decode().astype(np.float32)
        return Guide(self.basis.decode().astype(np.float32), self.alpha, grad, self.kind)

    @classmethod
    def from_guide(cls, guide: Guide, basis_codec: str | CodecConfig = "q8",
                   grad_codec: str | CodecConfig = "q8") -> Guidance:
        """Compress a Guide and stamp the digest of what the receiver will decode."""
        basis = encode_array(guide.basis, basis_codec)
        grad = None if guide.grad is None else encode_array(guide.grad, grad_codec)
        g = cls(basis=basis, grad=grad, alpha=float(guide.alpha), kind=guide.kind)
        g.guide_id = g.digest()
        return g

    def digest(self) -> str:
        """Digest of the decoded basis, gradient, α and kind."""
        arrays = [self.basis.decode().astype(np.float32)]
        if self.grad is not None:
            arrays.append(self.grad.decode().astype(np.float32))
        extra = struct.pack("<d", self.alpha) + (b"" if self.kind == "guided" else self.kind.encode())
        return array_digest(*arrays, extra=extra)


@dataclass(kw_only=True)
class Hyper:
    """Hyper-parameters of a round. ``schedule``: lr/ε/momentum schedule (t = ``first_step`` + local step);
    ``q``: perturbations per step; ``local_steps``: τ; ``batch_size``: examples per loss;
    ``split_layer``/``p1``/``p2``: FedSPZO split (-1: no split); ``seed_base``: the edge draws its seeds
    from a counter starting here (the cloud gives clients disjoint ranges)."""

    schedule: Schedule = wf(ScheduleT())
    q: int = wf(IntT(1, 1 << 16))
    local_steps: int = wf(IntT(1, 1 << 20))
    batch_size: int = wf(IntT(1, 1 << 20))
    first_step: int = wf(IntT(0, 1 << 40), default=0)
    split_layer: int = wf(IntT(-1, MAX_SPEC_LAYERS), default=-1)
    p1: int = wf(IntT(0, 1 << 16), default=0)
    p2: int = wf(IntT(0, 1 << 16), default=0)
    seed_base: int = wf(IntT(0, U64 - 1), default=0)


@dataclass(kw_only=True)
class LossStats:
    """Loss statistics over a client's round: mean, min, max and the last measured value."""

    mean: float = wf(FloatT())
    min: float = wf(FloatT())
    max: float = wf(FloatT())
    last: float = wf(FloatT())


@dataclass(kw_only=True)
class ReplayUpdate:
    """One accepted client upload of a past round, with its aggregation weight."""

    weight: float = wf(FloatT(0.0, 1.0))
    first_step: int = wf(IntT(0, 1 << 40), default=0)
    steps: list[StepRecord] = wf(StepsT(), default_factory=list)


@dataclass(kw_only=True)
class ReplayRound:
    """Everything needed to redo one cloud round: θ_{t+1} = θ_t + Σ_i w_i (replay_i(θ_t) − θ_t)."""

    round_id: int = wf(IntT(0, I64 - 1))
    schedule: Schedule = wf(ScheduleT())
    guidance: Guidance | None = wf(OptT(NestedT(Guidance)), default=None)
    updates: list[ReplayUpdate] = wf(ListT(NestedT(ReplayUpdate)), default_factory=list)

    def apply(self, theta: np.ndarray, guide: Guide | None = None) -> np.ndarray:
        """θ after this round. THE aggregation function: the cloud must compute its θ_{t+1} with this very
        function (same float32 ops, same order) for edge replay to be bit-exact. ``guide``: the decoded
        guidance, to skip decoding it again."""
        theta = np.asarray(theta, np.float32)
        if guide is None and self.guidance is not None:
            guide = self.guidance.to_guide()
        if not self.updates:
            return theta.copy()
        # float64 accumulation in list order, like cloud.aggregate.aggregate (the cloud lists updates in
        # the order it summed them): Δ_i = θ_i − θ_t is exact in float64, one rounding at the end.
        base = theta.astype(np.float64)
        acc = np.zeros(theta.shape, np.float64)
        for u in self.updates:
            theta_i = replay(theta, u.steps, self.schedule, guide, u.first_step)
            acc += u.weight * (theta_i.astype(np.float64) - base)
        return (base + acc).astype(np.float32)


@dataclass(kw_only=True)
class ThetaReplay:
    """θ as replay records: apply ``rounds`` in order to the θ the client holds for ``RoundStart.base_round``."""

    rounds: list[ReplayRound] = wf(ListT(NestedT(ReplayRound)), default_factory=list)

    def apply(self, theta: np.ndarray) -> np.ndarray:
        """θ after every round (a new array)."""
        theta = np.array(theta, np.float32, copy=True)
        for r in self.rounds:
            theta = r.apply(theta)
        return theta


class ThetaT(WireType):
    """θ: ``{"dense": EncodedArray}`` or ``{"replay": ThetaReplay}``."""

    def dump(self, v):
        if isinstance(v, EncodedArray):
            return {"dense": v.to_wire()}
        if isinstance(v, ThetaReplay):
            return {"replay": _dump_fields(v)}
        raise SchemaError(f"theta must be an EncodedArray or a ThetaReplay, got {_tname(v)}")

    def load(self, o, ctx, path):
        if type(o) is not dict or len(o) != 1 or next(iter(o)) not in ("dense", "replay"):
            raise SchemaError(f"{path}: expected {{'dense': array}} or {{'replay': records}}")
        if "dense" in o:
            return EncT(1).load(o["dense"], ctx, f"{path}.dense")
        return _load_fields(ThetaReplay, o["replay"], ctx, f"{path}.replay")


# ================================================================================================
# messages
# ================================================================================================
MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message:
    """Base of every message; subclasses are keyword-only dataclasses registered under ``TYPE``."""

    TYPE: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of the frame body (envelope included)."""
        return {KEY_VERSION: PROTOCOL_VERSION, KEY_TYPE: self.TYPE, **_dump_fields(self)}

    def check(self, path: str) -> None:
        """Cross-field checks, run after the fields validated (override)."""


def message(type_name: str):
    """Class decorator: make a keyword-only dataclass message and register it under ``type_name``."""

    def wrap(cls: type) -> type:
        cls = dataclass(kw_only=True)(cls)
        if type_name in MESSAGE_TYPES:
            raise ValueError(f"message type {type_name!r} registered twice")
        names = {f.name for f in dataclasses.fields(cls)}
        if names & {KEY_VERSION, KEY_TYPE}:
            raise ValueError(f"{cls.__name__}: fields may not be named {KEY_VERSION!r} or {KEY_TYPE!r}")
        cls.TYPE = type_name
        MESSAGE_TYPES[type_name] = cls
        return cls

    return wrap


@message(T_HELLO)
class Hello(Message):
    """Client → server, first frame: who I am and which protocol versions I speak."""

    client_id: str = wf(ID)
    versions: list[int] = wf(ListT(IntT(0, 1 << 16), 16), default_factory=lambda: list(SUPPORTED_VERSIONS))
    software: str = wf(StrT(MAX_ID_LEN), default="")


@message(T_CHALLENGE)
class Challenge(Message):
    """Server → client: a fresh random nonce to authenticate against (:mod:`protocol.auth`)."""

    nonce: bytes = wf(BytesT(NONCE_SIZE))
    server_id: str = wf(StrT(MAX_ID_LEN), default="")


@message(T_AUTH)
class Auth(Message):
    """Client → server: ``mac`` = HMAC-SHA256(token, domain ‖ nonce ‖ client_id), the nonce echoed."""

    client_id: str = wf(ID)
    nonce: bytes = wf(BytesT(NONCE_SIZE))
    mac: bytes = wf(BytesT(MAC_SIZE))


@message(T_WELCOME)
class Welcome(Message):
    """Server → client: authenticated. ``server_time`` (unix) lets the client judge deadlines."""

    client_id: str = wf(ID)
    session_id: str = wf(StrT(MAX_ID_LEN), default="")
    server_time: float = wf(FloatT(0.0), default=0.0)
    version: int = wf(IntT(0, 1 << 16), default=PROTOCOL_VERSION)  # the negotiated protocol version


AuthOk = Welcome


@message(T_ROUND_REQUEST)
class RoundRequest(Message):
    """Client → server: ready for a round; I hold θ of ``last_round`` (-1: none) with this digest, and the
    decoded guidance of ``guide_ids`` (prefetched with :class:`GuidanceRequest`: the server may then send a
    RoundStart that names its guidance by id instead of carrying it)."""

    last_round: int = wf(IntT(-1, I64 - 1), default=-1)
    theta_digest: str = wf(StrT(MAX_ID_LEN), default="")
    guide_ids: list[str] = wf(ListT(StrT(MAX_ID_LEN), MAX_GUIDE_IDS), default_factory=list)


@message(T_GUIDANCE_REQUEST)
class GuidanceRequest(Message):
    """Client → server (usually on a second connection, while it trains): the guidance of round ``round_id``
    as soon as the guide has built it (long poll)."""

    round_id: int = wf(IntT(0, I64 - 1))


@message(T_GUIDANCE_NEXT)
class GuidanceNext(Message):
    """Server → client: the guidance round ``round_id`` will use. ``ready`` False: not built yet (ask again);
    ready with ``guidance`` None: that round runs without guidance."""

    round_id: int = wf(IntT(0, I64 - 1))
    ready: bool = wf(BoolT(), default=True)
    guidance: Guidance | None = wf(OptT(NestedT(Guidance)), default=None)


@message(T_ROUND_START)
class RoundStart(Message):
    """Server → client: run a round.

    ``theta``: either a :class:`ThetaReplay` (apply its rounds to the θ of ``base_round`` the client holds)
    or a compressed dense θ (an :class:`~protocol.codecs.EncodedArray` of shape (d,), ``base_round`` = -1).
    ``theta_digest``: :func:`theta_digest` of θ_round after reconstruction ("" = unchecked).
    ``guidance``: this round's Q / g_B / α (None: plain MeZO). ``lam``: rectification weight λ ∈ [0, 1] or
    ``"online"`` (the edge estimates λ* per step; needs g_B). ``deadline``: unix time the upload is due.
    ``guidance_id``: with ``guidance`` None, the round's guidance is the one the client prefetched
    (:class:`GuidanceNext`) and listed in ``RoundRequest.guide_ids``; with ``guidance`` set, its id.
    """

    round_id: int = wf(IntT(0, I64 - 1))
    base_round: int = wf(IntT(-1, I64 - 1), default=-1)
    spec: AdapterSpec = wf(SpecT())
    theta: EncodedArray | ThetaReplay = wf(ThetaT())
    theta_digest: str = wf(StrT(MAX_ID_LEN), default="")
    guidance: Guidance | None = wf(OptT(NestedT(Guidance)), default=None)
    guidance_id: str = wf(StrT(MAX_ID_LEN), default="")
    lam: float | str = wf(LamT(), default=0.0)
    hyper: Hyper = wf(NestedT(Hyper))
    deadline: float = wf(FloatT(0.0))

    def check(self, path: str) -> None:
        d = self.spec.d
        if isinstance(self.theta, EncodedArray):
            if self.theta.shape != (d,):
                raise SchemaError(f"{path}.theta: dense θ has shape {self.theta.shape}, spec has d={d}")
        else:
            for r in self.theta.rounds:
                if r.guidance is not None and r.guidance.d != d:
                    raise SchemaError(f"{path}.theta: round {r.round_id} guidance is for d={r.guidance.d} != {d}")
                for u in r.updates:
                    _check_spans(u.steps, d, f"{path}.theta.round[{r.round_id}]")
        if self.guidance is not None and self.guidance.d != d:
            raise SchemaError(f"{path}.guidance: basis is for d={self.guidance.d}, spec has d={d}")
        if self.guidance is not None and self.guidance_id and self.guidance_id != self.guidance.guide_id:
            raise SchemaError(f"{path}.guidance_id: {self.guidance_id!r} is not the id of the guidance sent")
        by_ref = self.guidance is None and bool(self.guidance_id)  # the client holds it (prefetched)
        if self.lam != 0.0 and not by_ref and (self.guidance is None or self.guidance.grad is None):
            raise SchemaError(f"{path}.lam: λ={self.lam!r} needs guidance with a cloud gradient")


def _check_spans(steps: Sequence[StepRecord], d: int, path: str) -> None:
    for st in steps:
        for g in st.groups:
            if g.start >= d or (g.stop != -1 and g.stop > d):
                raise SchemaError(f"{path}: span [{g.start}, {g.stop}) outside d={d}")


@message(T_UPDATE)
class Update(Message):
    """Client → server: the round's records. ``steps``: one StepRecord per local step (compact on the wire,
    ≈ 12 B per perturbation); ``first_step``: global step index of steps[0] (schedule time);
    ``n_examples``: examples seen (aggregation weight); ``loss``: statistics; ``guide_id``: the guidance
    used ("" if none); ``theta_digest``: digest of the θ the client started from."""

    round_id: int = wf(IntT(0, I64 - 1))
    client_id: str = wf(ID)
    steps: list[StepRecord] = wf(StepsT(), default_factory=list)
    first_step: int = wf(IntT(0, 1 << 40), default=0)
    n_examples: int = wf(IntT(0, I64 - 1))
    loss: LossStats = wf(NestedT(LossStats))
    guide_id: str = wf(StrT(MAX_ID_LEN), default="")
    theta_digest: str = wf(StrT(MAX_ID_LEN), default="")
    duration_s: float = wf(FloatT(0.0), default=0.0)

    @property
    def n_perturbations(self) -> int:
        return sum(s.n_perturbations for s in self.steps)

    def check_spans(self, d: int) -> None:
        """SchemaError unless every group span lies in [0, d] (decode cannot check it: d is the receiver's)."""
        _check_spans(self.steps, d, "Update.steps")


@message(T_ACK)
class Ack(Message):
    """Server → client: the update of ``round_id`` was durably recorded (``accepted``) or refused (``reason``)."""

    round_id: int = wf(IntT(0, I64 - 1))
    accepted: bool = wf(BoolT())
    reason: str = wf(StrT(), default="")


@message(T_ERROR)
class Error(Message):
    """Either side: something went wrong. ``code``: a ProtocolError code (``protocol.errors``) or an
    application code; ``fatal``: the sender closes the connection after this frame."""

    code: str = wf(StrT(MAX_ID_LEN, min_len=1))
    message: str = wf(StrT(), default="")
    fatal: bool = wf(BoolT(), default=True)

    @classmethod
    def from_exception(cls, exc: BaseException, fatal: bool = True) -> Error:
        """The Error frame reporting ``exc`` (its ``code`` if a ProtocolError, else "internal")."""
        code = exc.code if isinstance(exc, ProtocolError) else "internal"
        return cls(code=code, message=str(exc)[:MAX_TEXT_LEN], fatal=fatal)

    def exception(self) -> ProtocolError:
        """The ProtocolError subclass this error stands for (raise it on the receiving side)."""
        return error_for_code(self.code, f"peer reported: {self.message}")


@message(T_BYE)
class Bye(Message):
    """Either side: closing politely."""

    reason: str = wf(StrT(), default="")


@message(T_STATUS_REQUEST)
class StatusRequest(Message):
    """Operator/client → server: ask for :class:`Status` (``edgezo guide status``)."""


@message(T_STATUS)
class Status(Message):
    """Server → requester: the guide daemon's state. ``phase``: e.g. "idle" / "round" / "aggregating";
    ``deadline``: unix time of the current round's deadline (None: no round); ``extra``: free-form scalars."""

    server_id: str = wf(StrT(MAX_ID_LEN), default="")
    round_id: int = wf(IntT(-1, I64 - 1), default=-1)
    phase: str = wf(StrT(MAX_ID_LEN), default="idle")
    clients_connected: int = wf(IntT(0, I64 - 1), default=0)
    clients_known: int = wf(IntT(0, I64 - 1), default=0)
    updates_received: int = wf(IntT(0, I64 - 1), default=0)
    updates_accepted: int = wf(IntT(0, I64 - 1), default=0)
    deadline: float | None = wf(OptT(FloatT(0.0)), default=None)
    uptime_s: float = wf(FloatT(0.0), default=0.0)
    d: int = wf(IntT(0, I64 - 1), default=0)
    guide_id: str = wf(StrT(MAX_ID_LEN), default="")
    extra: dict[str, Any] = wf(ScalarMapT(), default_factory=dict)


# ================================================================================================
# frames
# ================================================================================================
def encode_body(msg: Message, *, validate: bool = True, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The msgpack body of ``msg`` (no length header). ``validate``: run the receiver's schema check first,
    so a malformed message fails here (SchemaError) and not on the peer."""
    if not isinstance(msg, Message):
        raise TypeError(f"expected a protocol message, got {_tname(msg)}")
    wire = msg.to_wire()
    if validate:
        _load_fields(type(msg), {k: v for k, v in wire.items() if k not in (KEY_VERSION, KEY_TYPE)},
                     _Ctx(limits, 1 << 40), type(msg).__name__)
    try:
        return packb(wire)
    except (TypeError, ValueError, OverflowError) as e:  # only reachable with validate=False
        raise SchemaError(f"{type(msg).__name__}: cannot pack: {e}") from None


def encode(msg: Message, *, validate: bool = True, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """A full frame: 4-byte big-endian body length + msgpack body ``{"v", "type", fields...}``.

    Raises SchemaError for an invalid message and FrameTooLarge when the body exceeds ``limits.max_frame``
    (the peer would refuse it: better to know before sending)."""
    body = encode_body(msg, validate=validate, limits=limits)
    if len(body) > limits.max_frame:
        raise FrameTooLarge(f"{type(msg).__name__}: body of {len(body)} bytes exceeds the limit {limits.max_frame}")
    return struct.pack(">I", len(body)) + body


def frame_length(header: bytes, max_size: int) -> int:
    """The body length a 4-byte header declares; FrameTooLarge above ``max_size``, MalformedFrame if 0."""
    if len(header) != HEADER_SIZE:
        raise TruncatedFrame(f"frame header needs {HEADER_SIZE} bytes, got {len(header)}")
    (n,) = struct.unpack(">I", header)
    if n > max_size:
        raise FrameTooLarge(f"frame declares a {n}-byte body, limit is {max_size}")
    if n == 0:
        raise MalformedFrame("frame declares an empty body")
    return n


def decode_body(body: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode and validate one frame body. Raises only ProtocolError (subclasses)."""
    obj = unpackb(body, limits)
    if type(obj) is not dict:
        raise SchemaError(f"frame body must be a map, got {_tname(obj)}")
    v = obj.get(KEY_VERSION)
    if type(v) is not int:
        raise SchemaError(f"frame lacks an int protocol version {KEY_VERSION!r} (got {_tname(v)})")
    if v not in SUPPORTED_VERSIONS:
        raise VersionMismatch(f"frame is protocol version {v}; this side speaks {list(SUPPORTED_VERSIONS)}")
    t = obj.get(KEY_TYPE)
    if type(t) is not str:
        raise SchemaError(f"frame lacks a string {KEY_TYPE!r} (got {_tname(t)})")
    cls = MESSAGE_TYPES.get(t)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {t[:64]!r}; known: {sorted(MESSAGE_TYPES)}")
    fields = {k: x for k, x in obj.items() if k not in (KEY_VERSION, KEY_TYPE)}
    try:
        return _load_fields(cls, fields, _Ctx(limits, len(body)), cls.__name__)
    except ProtocolError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, MemoryError) as e:
        # Defence in depth: a schema gap must still surface as a ProtocolError, never a crash.
        raise SchemaError(f"{cls.__name__}: invalid message ({type(e).__name__}: {e})") from None


def decode(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode one complete frame (header + body, nothing after). Raises only ProtocolError (subclasses)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedFrame(f"expected bytes, got {_tname(data)}")
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise TruncatedFrame(f"{len(data)} bytes cannot hold the {HEADER_SIZE}-byte frame header")
    n = frame_length(data[:HEADER_SIZE], limits.max_frame)
    have = len(data) - HEADER_SIZE
    if have < n:
        raise TruncatedFrame(f"frame declares {n} body bytes, only {have} present")
    if have > n:
        raise MalformedFrame(f"frame declares {n} body bytes, {have - n} extra bytes follow")
    return decode_body(data[HEADER_SIZE:], limits=limits)
