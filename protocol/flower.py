"""edgezo frames inside Flower messages: the keys both sides use, and the checks on what comes out.

On Flower's deployment runtime (``cloud.flower_server``, ``edge.flower_client``) a RoundStart goes to the device
and an Update comes back as one encoded edgezo frame (:func:`protocol.messages.encode`, msgpack, no pickle) held as
a bytes value in a Flower ``ConfigRecord``. So the Flower path and the TCP daemon share every codec, size limit and
schema check. This module does not import flwr: it deals in the plain mapping a ConfigRecord is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from protocol.constants import DEFAULT_LIMITS, Limits
from protocol.errors import MalformedFrame, ProtocolError
from protocol.messages import Message, decode, encode

RECORD = "edgezo"  # the ConfigRecord's key in a Flower message's RecordDict
FRAME = "frame"  # its one entry: the encoded edgezo frame (bytes)
METRICS = "edgezo.metrics"  # an optional MetricRecord next to it (timings, forward passes): never replayed

M = TypeVar("M", bound=Message)


def client_name(node_id: int) -> str:
    """The name a Flower node uploads under, ``node-<node id>``: the ServerApp keeps an upload only when the Update
    names the node it came from (Flower authenticates nodes; edgezo's HMAC tokens are the TCP daemon's)."""
    return f"node-{int(node_id)}"


def frame_entry(msg: Message, *, limits: Limits = DEFAULT_LIMITS) -> dict[str, bytes]:
    """The ConfigRecord contents carrying ``msg`` (validated and size-checked by :func:`encode`)."""
    return {FRAME: encode(msg, limits=limits)}


def message_from_entry(entry: Mapping[str, Any] | None, expect: type[M], *, limits: Limits = DEFAULT_LIMITS) -> M:
    """The edgezo message in a ConfigRecord's contents, which must be an ``expect``.

    Raises a ProtocolError (MalformedFrame, SchemaError, ...) for a missing record, a frame that is not bytes, or
    one that does not decode to ``expect``: the same errors a frame read from a socket raises."""
    if entry is None:
        raise MalformedFrame(f"the Flower message has no {RECORD!r} record")
    frame = entry.get(FRAME)
    if not isinstance(frame, (bytes, bytearray)):
        raise MalformedFrame(f"record {RECORD!r} has no bytes {FRAME!r} (got {type(frame).__name__})")
    msg = decode(bytes(frame), limits=limits)
    if not isinstance(msg, expect):
        raise ProtocolError(f"expected a {expect.__name__} frame, got {type(msg).__name__}")
    return msg
