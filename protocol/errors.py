"""Every way a frame can be refused: :class:`ProtocolError` and one subclass per cause.

Each class carries a stable ``code`` (the string an :class:`~protocol.messages.Error` message sends back),
so a peer can tell *what* was wrong without parsing prose. Decoding never raises anything else.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: a frame or message violated the wire contract. ``str(e)`` says what was wrong."""

    code = "protocol"


class FrameTooLarge(ProtocolError):
    """The declared frame length exceeds the receiver's maximum (refused before reading the body)."""

    code = "frame_too_large"


class TruncatedFrame(ProtocolError):
    """The stream or buffer ended inside a frame (header or body)."""

    code = "truncated_frame"


class ConnectionClosed(TruncatedFrame):
    """The peer closed the stream cleanly at a frame boundary (no partial frame was pending)."""

    code = "connection_closed"


class FrameTimeout(ProtocolError):
    """A frame did not arrive in time (idle peer, or a slow-loris peer trickling bytes)."""

    code = "timeout"


class MalformedFrame(ProtocolError):
    """The body is not a single valid msgpack object, or it breaks a msgpack-level limit."""

    code = "malformed_frame"


class VersionMismatch(ProtocolError):
    """The frame's protocol version ``v`` is not one this side speaks."""

    code = "version_mismatch"


class UnknownMessageType(ProtocolError):
    """The frame's ``type`` names no registered message."""

    code = "unknown_type"


class SchemaError(ProtocolError):
    """A known message whose fields have the wrong type, range, size, or an unknown/missing field."""

    code = "schema"


class LimitExceeded(SchemaError):
    """A declared size (array elements, shape, nesting, string length) is over a hard limit."""

    code = "limit_exceeded"


class CodecError(SchemaError):
    """A compressed array is inconsistent: unknown codec, bad parameters, or payload size ≠ declared shape."""

    code = "codec"


class AuthError(ProtocolError):
    """Authentication failed: unknown client, wrong token (MAC mismatch), or a nonce this server never issued."""

    code = "auth"


class ReplayedNonce(AuthError):
    """A nonce that was already used for an authentication attempt came back (replay)."""

    code = "replayed_nonce"


ERROR_CLASSES: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        FrameTooLarge,
        TruncatedFrame,
        ConnectionClosed,
        FrameTimeout,
        MalformedFrame,
        VersionMismatch,
        UnknownMessageType,
        SchemaError,
        LimitExceeded,
        CodecError,
        AuthError,
        ReplayedNonce,
    )
}


def error_for_code(code: str, message: str) -> ProtocolError:
    """The exception a received ``Error(code, message)`` stands for (``ProtocolError`` for unknown codes)."""
    return ERROR_CLASSES.get(code, ProtocolError)(message)
