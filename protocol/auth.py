"""Challenge-response authentication (HMAC-SHA256 over a server nonce) and optional TLS contexts.

The server sends a fresh 32-byte nonce; the client answers ``HMAC-SHA256(token, AUTH_DOMAIN ‖ nonce ‖
client_id)`` and echoes the nonce. Binding client_id into the MAC stops an answer for one identity being
presented as another; the domain tag stops the MAC being reused for any other purpose. The server's
:class:`NonceRegistry` lets each nonce be used once: a replayed answer gets :class:`ReplayedNonce`, a wrong
token or unknown client :class:`AuthError`. Tokens are compared with ``hmac.compare_digest``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from protocol.constants import AUTH_DOMAIN, DEFAULT_TIMEOUT, NONCE_SIZE, SUPPORTED_VERSIONS
from protocol.errors import AuthError, ProtocolError, ReplayedNonce, SchemaError, VersionMismatch
from protocol.framing import read_frame, write_frame
from protocol.messages import Auth, Challenge, Error, Hello, Message, Welcome


def new_nonce() -> bytes:
    """32 bytes from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def new_token() -> str:
    """A fresh per-client token (64 hex chars, 256 bits) for the server's token file and the client."""
    return secrets.token_hex(32)


def _token_bytes(token: bytes | str) -> bytes:
    return token.encode() if isinstance(token, str) else bytes(token)


def compute_mac(token: bytes | str, nonce: bytes, client_id: str) -> bytes:
    """HMAC-SHA256(token, AUTH_DOMAIN ‖ nonce ‖ client_id): the client's answer to a challenge."""
    return hmac.new(_token_bytes(token), AUTH_DOMAIN + nonce + client_id.encode(), hashlib.sha256).digest()


def verify_mac(token: bytes | str, nonce: bytes, client_id: str, mac: bytes) -> None:
    """Raise AuthError unless ``mac`` answers ``nonce`` for ``client_id`` under ``token`` (constant time)."""
    if not hmac.compare_digest(compute_mac(token, nonce, client_id), mac):
        raise AuthError(f"authentication failed for client {client_id!r}: wrong token (MAC mismatch)")


class TokenStore:
    """Per-client tokens on the server: client_id → token."""

    def __init__(self, tokens: Mapping[str, bytes | str]) -> None:
        self._tokens = {str(k): _token_bytes(v) for k, v in tokens.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> TokenStore:
        """Read ``client_id token`` lines (whitespace separated; ``#`` comments and blank lines ignored)."""
        tokens: dict[str, str] = {}
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{i}: expected 'client_id token'")
            tokens[parts[0]] = parts[1]
        return cls(tokens)

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._tokens

    def get(self, client_id: str) -> bytes | None:
        """The client's token, or None if unknown."""
        return self._tokens.get(client_id)


@dataclass
class NonceRegistry:
    """Server-side nonces: each issued nonce may be consumed once, within ``ttl`` seconds.

    Used nonces are remembered (the most recent ``max_used``) so a replay is told apart from garbage;
    outstanding ones are capped at ``max_pending`` (oldest dropped) so unauthenticated peers cannot grow it.
    """

    ttl: float = 60.0
    max_pending: int = 100_000
    max_used: int = 1_000_000
    clock: Callable[[], float] = time.monotonic
    _pending: OrderedDict[bytes, float] = field(default_factory=OrderedDict, init=False, repr=False)
    _used: OrderedDict[bytes, None] = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.ttl <= 0 or self.max_pending < 1 or self.max_used < 1:
            raise ValueError("NonceRegistry needs ttl > 0, max_pending >= 1, max_used >= 1")

    def issue(self) -> bytes:
        """A fresh nonce, registered as outstanding."""
        now = self.clock()
        while self._pending and (next(iter(self._pending.values())) < now or len(self._pending) >= self.max_pending):
            self._pending.popitem(last=False)  # insertion order = expiry order
        nonce = new_nonce()
        self._pending[nonce] = now + self.ttl
        return nonce

    def was_used(self, nonce: bytes) -> bool:
        return nonce in self._used

    def _mark_used(self, nonce: bytes) -> None:
        self._used[nonce] = None
        while len(self._used) > self.max_used:
            self._used.popitem(last=False)

    def consume(self, nonce: bytes) -> None:
        """Use ``nonce`` once. ReplayedNonce if already used; AuthError if never issued or expired."""
        if nonce in self._used:
            raise ReplayedNonce("nonce was already used: replayed authentication refused")
        expiry = self._pending.pop(nonce, None)
        if expiry is None:
            raise AuthError("nonce was never issued by this server (or was dropped)")
        self._mark_used(nonce)
        if expiry < self.clock():
            raise AuthError("nonce expired before it was answered")


class Authenticator:
    """The server side of the handshake: issue challenges, verify answers."""

    def __init__(self, tokens: TokenStore | Mapping[str, bytes | str], registry: NonceRegistry | None = None,
                 server_id: str = "") -> None:
        self.tokens = tokens if isinstance(tokens, TokenStore) else TokenStore(tokens)
        self.registry = registry or NonceRegistry()
        self.server_id = server_id
        self._dummy = secrets.token_bytes(32)

    def challenge(self) -> Challenge:
        """A Challenge carrying a freshly issued nonce."""
        return Challenge(nonce=self.registry.issue(), server_id=self.server_id)

    def verify(self, auth: Auth, issued: bytes) -> str:
        """Check ``auth`` against the nonce issued on this connection; returns the client id.

        Order matters: the nonce is consumed before the MAC is checked, so each nonce allows one attempt.
        """
        if not hmac.compare_digest(auth.nonce, issued):
            if self.registry.was_used(auth.nonce):
                raise ReplayedNonce("answer carries a nonce already used: replayed authentication refused")
            raise AuthError("answer carries a nonce that was not issued on this connection")
        self.registry.consume(issued)
        token = self.tokens.get(auth.client_id)
        # Unknown clients still cost one HMAC, so timing does not reveal which client ids exist.
        verify_mac(token if token is not None else self._dummy, issued, auth.client_id, auth.mac)
        if token is None:  # pragma: no cover - the dummy token never matches
            raise AuthError(f"unknown client {auth.client_id!r}")
        return auth.client_id


def answer(challenge: Challenge, client_id: str, token: bytes | str) -> Auth:
    """The client's Auth for ``challenge``."""
    return Auth(client_id=client_id, nonce=challenge.nonce, mac=compute_mac(token, challenge.nonce, client_id))


async def _expect(reader: asyncio.StreamReader, cls: type, timeout: float | None) -> Message:
    msg = await read_frame(reader, timeout=timeout)
    if isinstance(msg, Error):
        raise msg.exception()
    if not isinstance(msg, cls):
        raise SchemaError(f"expected {cls.__name__} during the handshake, got {type(msg).__name__}")
    return msg


def negotiate_version(hello: Hello) -> int:
    """The highest protocol version both sides speak; VersionMismatch when there is none."""
    common = set(hello.versions) & set(SUPPORTED_VERSIONS)
    if not common:
        raise VersionMismatch(f"client speaks protocol versions {sorted(hello.versions)}, this guide speaks "
                              f"{list(SUPPORTED_VERSIONS)}: upgrade the older side")
    return max(common)


async def server_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, auth: Authenticator,
                           *, timeout: float | None = DEFAULT_TIMEOUT, session_id: str = "") -> Hello:
    """Hello → Challenge → Auth → Welcome. Returns the client's Hello (its ``client_id`` is authenticated).

    On any ProtocolError an Error frame with its code is sent (best effort) and the error is re-raised.
    """
    try:
        hello = await _expect(reader, Hello, timeout)
        version = negotiate_version(hello)
        ch = auth.challenge()
        await write_frame(writer, ch, timeout=timeout)
        a = await _expect(reader, Auth, timeout)
        if a.client_id != hello.client_id:
            raise AuthError(f"Auth is for {a.client_id!r} but Hello said {hello.client_id!r}")
        auth.verify(a, ch.nonce)
        await write_frame(writer, Welcome(client_id=a.client_id, session_id=session_id, server_time=time.time(),
                                          version=version), timeout=timeout)
        return hello
    except ProtocolError as e:
        try:
            await write_frame(writer, Error.from_exception(e), timeout=1.0)
        except (ProtocolError, OSError, ConnectionError):
            pass
        raise


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client_id: str,
                           token: bytes | str, *, timeout: float | None = DEFAULT_TIMEOUT,
                           software: str = "") -> Welcome:
    """The client side: returns the server's Welcome; raises the ProtocolError the server reported."""
    await write_frame(writer, Hello(client_id=client_id, software=software), timeout=timeout)
    ch = await _expect(reader, Challenge, timeout)
    await write_frame(writer, answer(ch, client_id, token), timeout=timeout)
    return await _expect(reader, Welcome, timeout)


# ---- TLS ----------------------------------------------------------------------------------------------
def server_ssl_context(certfile: str | Path, keyfile: str | Path, *, client_ca: str | Path | None = None
                       ) -> ssl.SSLContext:
    """Server TLS context (TLS ≥ 1.2). ``client_ca``: also require client certificates signed by it (mTLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(certfile), str(keyfile))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
    return ctx


def client_ssl_context(cafile: str | Path | None = None, *, certfile: str | Path | None = None,
                       keyfile: str | Path | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    """Client TLS context verifying the server against ``cafile`` (system CAs if None); optional client cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if cafile is None else str(cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if certfile is not None:
        ctx.load_cert_chain(str(certfile), None if keyfile is None else str(keyfile))
    return ctx
