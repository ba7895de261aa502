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
import struct
from collections.abc import Sequence
from dataclasses import dataclass
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
    MAC_SIZE,
    MAX_GUIDE_IDS,
    MAX_ID_LEN,
    MAX_SPEC_LAYERS,
    MAX_TEXT_LEN,
    NONCE_SIZE,
    PROTOCOL_VERSION,
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
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    SchemaError,
    TruncatedFrame,
    UnknownMessageType,
    VersionMismatch,
    error_for_code,
)
from protocol.schema import (
    I64,
    ID,
    U64,
    BoolT,
    BytesT,
    EncT,
    FloatT,
    IntT,
    LamT,
    ListT,
    NestedT,
    OptT,
    ScalarMapT,
    ScheduleT,
    SpecT,
    StrT,
    WireType,
    _Ctx,
    _dump_fields,
    _load_fields,
    _tname,
    wf,
)
from protocol.spec import AdapterSpec
from protocol.steps import StepsT
from protocol.zo import GUIDE_KINDS, Guide, Schedule, StepRecord, replay


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

# The schema kit and the step-record encoding live in protocol/schema.py and protocol/steps.py; their public
# names stay importable from here, as before the split.
from protocol.schema import (  # noqa: E402, F401
    I64,
    ID,
    U64,
    BoolT,
    BytesT,
    EncT,
    FloatT,
    IntT,
    LamT,
    ListT,
    NestedT,
    OptT,
    ScalarMapT,
    ScheduleT,
    SpecT,
    StrT,
    WireType,
    wf,
)
from protocol.steps import StepsT, step_records_from_wire, step_records_to_wire  # noqa: E402, F401
