"""Frames over asyncio streams, with a size cap checked on the header and timeouts against slow peers.

``read_frame`` waits up to ``idle_timeout`` for a frame to *start* (a client may legitimately wait long
for the next round), then the whole frame must arrive within ``timeout`` of its first byte: a slow-loris
peer trickling one byte a second cannot hold a reader longer than that. The declared length is compared
with ``max_size`` before the body is read or any buffer for it exists.
"""

from __future__ import annotations

import asyncio

from protocol.constants import DEFAULT_LIMITS, DEFAULT_TIMEOUT, HEADER_SIZE, Limits
from protocol.errors import ConnectionClosed, FrameTimeout, TruncatedFrame
from protocol.messages import Message, decode_body, encode, frame_length

_UNSET = object()


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    max_size: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    idle_timeout: float | None | object = _UNSET,
    limits: Limits = DEFAULT_LIMITS,
) -> Message:
    """Read and decode one frame.

    max_size: body byte cap (default ``limits.max_frame``); timeout: seconds for the whole frame once its
    first byte arrived (None: no limit); idle_timeout: seconds to wait for the first byte (default: same as
    ``timeout``; None: wait forever). Raises ConnectionClosed (clean EOF between frames), TruncatedFrame
    (EOF inside a frame), FrameTimeout, FrameTooLarge, or any decode ProtocolError.
    """
    cap = limits.max_frame if max_size is None else min(max_size, limits.max_frame)
    idle = timeout if idle_timeout is _UNSET else idle_timeout
    try:
        first = await asyncio.wait_for(reader.readexactly(1), idle)  # type: ignore[arg-type]
    except asyncio.IncompleteReadError:
        raise ConnectionClosed("peer closed the connection") from None
    except asyncio.TimeoutError:
        raise FrameTimeout(f"no frame started within {idle} s") from None

    async def rest_of_frame() -> bytes:
        rest = await reader.readexactly(HEADER_SIZE - 1)
        n = frame_length(first + rest, cap)  # FrameTooLarge before any body byte is read
        return await reader.readexactly(n)

    try:
        body = await asyncio.wait_for(rest_of_frame(), timeout)  # one deadline for the whole frame
    except asyncio.IncompleteReadError as e:
        raise TruncatedFrame(f"connection closed inside a frame ({len(e.partial)} of {e.expected} bytes)") from None
    except asyncio.TimeoutError:
        raise FrameTimeout(f"frame not complete within {timeout} s (slow or stalled peer)") from None
    return decode_body(body, limits=limits)


async def write_frame(writer: asyncio.StreamWriter, message: Message, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
    """Encode ``message`` and write it; waits for the transport to drain (bounded by ``timeout``).

    Returns the number of bytes written. Raises FrameTimeout when the peer does not read in time.
    """
    frame = encode(message)
    writer.write(frame)
    try:
        await asyncio.wait_for(writer.drain(), timeout)
    except asyncio.TimeoutError:
        raise FrameTimeout(f"peer did not accept a {len(frame)}-byte frame within {timeout} s") from None
    return len(frame)


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` → (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {addr!r}")
    return host or "127.0.0.1", int(port)
