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
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.arrays import packb, unpackb
from protocol.codecs import EncodedArray
from protocol.constants import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    KEY_TYPE,
    KEY_VERSION,
    MAC_SIZE,
    MAX_GUIDE_IDS,
    MAX_ID_LEN,
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
from protocol.payloads import (  # noqa: F401 - ReplayRound, ReplayUpdate, digests: importable from here as before
    Guidance,
    Hyper,
    LossStats,
    ReplayRound,
    ReplayUpdate,
    ThetaReplay,
    ThetaT,
    array_digest,
    theta_digest,
)
from protocol.schema import (  # noqa: F401 - the schema kit stays importable from here
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
from protocol.steps import StepsT, step_records_from_wire, step_records_to_wire  # noqa: F401
from protocol.zo import Lambda, StepRecord

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

    ``theta``: either a :class:`ThetaReplay` (apply its rounds to the θ of ``base_round`` the client holds: each
    a round's records, its c-space move or a compressed delta) or a dense θ (an
    :class:`~protocol.codecs.EncodedArray` of shape (d,), ``base_round`` = -1).
    ``theta_digest``: :func:`theta_digest` of θ_round after reconstruction ("" = unchecked).
    ``guidance``: this round's Q / g_B / α (None: plain MeZO). ``lam``: rectification weight λ ∈ [0, 1] or
    LAMBDA_ONLINE (the edge estimates λ* per step; needs g_B; protocol.zo.Lambda). ``deadline``: unix time the upload is due.
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
    lam: Lambda = wf(LamT(), default=0.0)
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
                if r.delta is not None and r.delta.shape != (d,):
                    raise SchemaError(f"{path}.theta: round {r.round_id} delta has shape {r.delta.shape}, spec has d={d}")
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
