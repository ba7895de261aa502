"""Frames over asyncio streams, with a size cap checked on the header and timeouts against slow peers.

``read_frame`` waits up to ``idle_timeout`` for a frame to *start* (a client may legitimately wait long
for the next round), then the whole frame must arrive within ``timeout`` of its first byte: a slow-loris
peer trickling one byte a second cannot hold a reader longer than that. The declared length is compared
with ``max_size`` before the body is read or any buffer for it exists.
"""

from __future__ import annotations

import asyncio
import sys
from contextlib import nullcontext

from protocol.constants import DEFAULT_LIMITS, DEFAULT_TIMEOUT, HEADER_SIZE, Limits
from protocol.errors import ConnectionClosed, FrameTimeout, TruncatedFrame
from protocol.messages import Message, decode_body, encode, frame_length

_UNSET = object()


def deadline(seconds: float | None):
    """``async with deadline(t)``: asyncio.TimeoutError after ``t`` s (None: no limit). On 3.11+ this is
    ``asyncio.timeout``, which cancels the awaiting task in place; before 3.12 ``asyncio.wait_for`` wraps each await
    in a new Task, three per frame, which a guide answering 1,000 uploads at once pays for. 3.10 gets
    :class:`_WaitFor`, the same timer-and-cancel without a Task."""
    if seconds is None:
        return nullcontext()
    if sys.version_info >= (3, 11):
        return asyncio.timeout(seconds)
    return _WaitFor(seconds)


class _WaitFor:
    """Python 3.10: the deadline as a timer that cancels the current task (what asyncio.timeout does in 3.11)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.fired, self.handle = seconds, False, None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()

        def fire() -> None:
            self.fired = True
            task.cancel()

        self.handle = asyncio.get_running_loop().call_later(self.seconds, fire)

    async def __aexit__(self, et, e, tb) -> bool:
        self.handle.cancel()
        if self.fired and et is asyncio.CancelledError:
            raise asyncio.TimeoutError from None
        return False


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    max_size: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    idle_timeout: float | None | object = _UNSET,
    limits: Limits = DEFAULT_LIMITS,
) -> Message:
    """Read and decode one frame (:func:`read_frame_sized` without the size)."""
    msg, _ = await read_frame_sized(reader, max_size=max_size, timeout=timeout, idle_timeout=idle_timeout,
                                    limits=limits)
    return msg


async def read_frame_sized(
    reader: asyncio.StreamReader,
    *,
    max_size: int | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    idle_timeout: float | None | object = _UNSET,
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[Message, int]:
    """Read and decode one frame; returns the message and the frame's size in bytes (header included).

    max_size: body byte cap (default ``limits.max_frame``); timeout: seconds for the whole frame once its
    first byte arrived (None: no limit); idle_timeout: seconds to wait for the first byte (default: same as
    ``timeout``; None: wait forever). Raises ConnectionClosed (clean EOF between frames), TruncatedFrame
    (EOF inside a frame), FrameTimeout, FrameTooLarge, or any decode ProtocolError.
    """
    cap = limits.max_frame if max_size is None else min(max_size, limits.max_frame)
    idle = timeout if idle_timeout is _UNSET else idle_timeout
    try:
        async with deadline(idle):  # type: ignore[arg-type]
            first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        raise ConnectionClosed("peer closed the connection") from None
    except asyncio.TimeoutError:
        raise FrameTimeout(f"no frame started within {idle} s") from None

    try:
        async with deadline(timeout):  # one deadline for the whole frame
            rest = await reader.readexactly(HEADER_SIZE - 1)
            n = frame_length(first + rest, cap)  # FrameTooLarge before any body byte is read
            body = await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise TruncatedFrame(f"connection closed inside a frame ({len(e.partial)} of {e.expected} bytes)") from None
    except asyncio.TimeoutError:
        raise FrameTimeout(f"frame not complete within {timeout} s (slow or stalled peer)") from None
    return decode_body(body, limits=limits), HEADER_SIZE + len(body)


async def write_frame(writer: asyncio.StreamWriter, message: Message, *, timeout: float | None = DEFAULT_TIMEOUT) -> int:
    """Encode ``message`` and write it; waits for the transport to drain (bounded by ``timeout``).

    Returns the number of bytes written. Raises FrameTimeout when the peer does not read in time.
    """
    frame = encode(message)
    writer.write(frame)
    try:
        async with deadline(timeout):
            await writer.drain()
    except asyncio.TimeoutError:
        raise FrameTimeout(f"peer did not accept a {len(frame)}-byte frame within {timeout} s") from None
    return len(frame)


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` → (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, got {addr!r}")
    return host or "127.0.0.1", int(port)
