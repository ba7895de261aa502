"""The guide's connection layer: handshake (Hello → Challenge → Auth → Welcome, or a public status), one
answer per authenticated message, and the per-connection loop that drops a client after max_errors."""

from __future__ import annotations

import asyncio
import time

from protocol.auth import negotiate_version
from protocol.errors import AuthError, FrameTooLarge, ProtocolError, SchemaError, VersionMismatch
from protocol.framing import read_frame, read_frame_sized, write_frame
from protocol.messages import (
    Ack,
    Auth,
    Bye,
    Error,
    GuidanceRequest,
    Hello,
    Message,
    RoundRequest,
    StatusRequest,
    Update,
    Welcome,
)

HANDSHAKE_MAX_FRAME = 4096
# Pre-encoded frames (RoundStart: θ and the guidance, MBs) go out in slices of this size with a drain between them:
# a TLS transport encrypts (and buffers) whatever it is handed at once, so one write of the whole frame to every
# selected client would hold the event loop for the round's whole downlink (uploads and acks of the clients
# served first wait behind it) and buffer every client's encrypted copy (GBs at 1,000 clients).
WRITE_SLICE = 1 << 18


class StatusNeedsToken(AuthError):
    """A StatusRequest before Hello on a guide without public_status."""


class _Refuse(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def write_sliced(writer: asyncio.StreamWriter, frame: bytes, timeout: float) -> None:
    """Write ``frame`` in :data:`WRITE_SLICE` slices, draining after each (other connections' reads, commits and
    acks run in between; at most about a slice per connection is buffered), the whole within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    view = memoryview(frame)
    for i in range(0, len(view), WRITE_SLICE):
        writer.write(view[i:i + WRITE_SLICE])
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        await asyncio.wait_for(writer.drain(), left)


class ConnectionsMixin:
    """GuideServer's TCP/TLS side (mixed into cloud.daemon.GuideServer: it reads the server's state)."""

    # ---- connections -----------------------------------------------------------------------------
    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        """Hello → Challenge → Auth → Welcome (protocol.auth's Authenticator); a public StatusRequest is
        answered before any Hello. Returns the authenticated client id, or None when the connection is done."""
        s = self.cfg.server
        first = await read_frame(reader, max_size=HANDSHAKE_MAX_FRAME, timeout=s.io_timeout_s)
        if isinstance(first, StatusRequest):
            if not s.public_status:
                raise StatusNeedsToken("status needs a client token (edgezo guide status --client-id ID --token T), or "
                                "public_status = true on the guide")
            await write_frame(writer, await self._status_full(public=True), timeout=s.io_timeout_s)
            return None
        if not isinstance(first, Hello):
            raise SchemaError(f"expected Hello, got {type(first).__name__}")
        version = negotiate_version(first)
        ch = self.authn.challenge()
        await write_frame(writer, ch, timeout=s.io_timeout_s)
        auth = await read_frame(reader, max_size=HANDSHAKE_MAX_FRAME, timeout=s.io_timeout_s)
        if not isinstance(auth, Auth):
            raise SchemaError(f"expected Auth, got {type(auth).__name__}")
        if auth.client_id != first.client_id:
            raise AuthError(f"Auth is for {auth.client_id!r} but Hello said {first.client_id!r}")
        self.authn.verify(auth, ch.nonce)
        await write_frame(writer, Welcome(client_id=auth.client_id, server_time=time.time(), version=version),
                          timeout=s.io_timeout_s)
        return auth.client_id

    async def _reply(self, client: str, msg: Message, size: int = 0) -> Message | bytes | None:
        """The answer to one authenticated message of ``size`` bytes (None: the client said Bye)."""
        if isinstance(msg, RoundRequest):
            return await self._on_round_request(client, msg)
        if isinstance(msg, GuidanceRequest):
            return await self._on_guidance_request(msg)
        if isinstance(msg, Update):
            return await self._on_update(client, msg, size)
        if isinstance(msg, StatusRequest):
            return await self._status_full()
        if isinstance(msg, Bye):
            return None
        raise _Refuse("unexpected", f"{type(msg).__name__} is not expected from a client here")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        client = None
        s = self.cfg.server
        # a selected client is silent while it trains: allow it until the deadline (+ slack)
        idle = s.io_timeout_s + s.long_poll_s + self.cfg.rounds.deadline_s
        errors = 0
        try:
            try:
                client = await self._handshake(reader, writer)
            except (AuthError, SchemaError, VersionMismatch) as e:
                auth_fail = isinstance(e, AuthError)
                kind = "version_mismatch" if isinstance(e, VersionMismatch) else (
                    "auth_failed" if auth_fail else "malformed")
                self.stats[kind] = self.stats.get(kind, 0) + 1
                self.log(kind, peer=str(peer), error=str(e))
                # a failed token check never says which half was wrong; a refused status says what to do
                secret = auth_fail and not isinstance(e, StatusNeedsToken)
                await write_frame(writer, Error(code=e.code, message="unknown client or bad token" if secret
                                                else str(e)[:4000]), timeout=1.0)
                return
            if client is None:
                return
            self.log("connected", client=client, peer=str(peer))
            while True:
                try:
                    msg, size = await read_frame_sized(reader, max_size=s.max_frame, timeout=s.io_timeout_s,
                                                       idle_timeout=idle)
                except ProtocolError as e:
                    if e.code in ("connection_closed", "truncated_frame", "timeout"):
                        return
                    errors += 1
                    self.stats["malformed"] += 1
                    self.log("malformed", client=client, code=e.code, error=str(e))
                    fatal = isinstance(e, FrameTooLarge) or errors >= s.max_errors
                    # an oversize body was never read: the stream is out of sync, so that one is fatal
                    await write_frame(writer, Error.from_exception(e, fatal=fatal), timeout=s.io_timeout_s)
                    if fatal:
                        return
                    continue
                t_msg = time.perf_counter()
                try:
                    reply = await self._reply(client, msg, size)
                except _Refuse as e:
                    self.stats["refused"] += 1
                    errors += e.code == "unexpected"
                    self.log("refused", client=client, code=e.code, error=str(e))
                    reply = Error(code=e.code, message=str(e)[:4000], fatal=False)
                if reply is None:
                    return
                if isinstance(reply, Ack) and not reply.accepted:
                    self.stats["refused"] += 1
                    self.log("refused", client=client, code="refused", error=reply.reason)
                if isinstance(reply, bytes):  # a pre-encoded frame
                    await write_sliced(writer, reply, s.io_timeout_s)
                else:
                    await write_frame(writer, reply, timeout=s.io_timeout_s)
                if isinstance(reply, Ack) and reply.accepted:  # the guide's share of the ack latency
                    self.timings["ack"].append(time.perf_counter() - t_msg)
                if errors >= s.max_errors:
                    return
        except ProtocolError as e:  # handshake framing problems, write timeouts
            self.stats["malformed"] += e.code not in ("connection_closed", "truncated_frame", "timeout")
            self.log("dropped", client=client, peer=str(peer), code=e.code, error=str(e))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if client is not None:
                fut = self.waiting.get(client)
                if fut is not None and not fut.done():
                    del self.waiting[client]
                self.log("disconnected", client=client)
            self._conns.discard(task)
            writer.close()
