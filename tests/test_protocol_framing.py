"""Framing and auth over real asyncio loopback sockets: limits, timeouts, handshake errors, TLS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import struct
import subprocess
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import protocol
from protocol import auth as A
from protocol import framing
from protocol import messages as M
from protocol.errors import (
    AuthError,
    ConnectionClosed,
    FrameTimeout,
    FrameTooLarge,
    ReplayedNonce,
    TruncatedFrame,
    VersionMismatch,
)
from protocol.framing import read_frame, read_frame_sized, write_frame
from protocol.samples import sample_messages

TOKENS = {"pi-1": A.new_token(), "pi-2": A.new_token()}


def _first_round_start(msgs):
    """The first RoundStart among the samples (a large message with arrays, nested types and λ)."""
    return next(m for m in msgs if type(m).__name__ == "RoundStart")


async def _with_server(handler, client, *, ssl_server=None):
    """Run ``handler(reader, writer)`` as a loopback server and ``client(port)``; return both results."""
    results: dict = {}
    done = asyncio.Event()

    async def wrapped(reader, writer):
        try:
            results["server"] = await handler(reader, writer)
        except Exception as e:  # noqa: BLE001 - the test inspects what the server raised
            results["server"] = e
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0, ssl=ssl_server)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            results["client"] = await client(port)
        except Exception as e:  # noqa: BLE001
            results["client"] = e
        await asyncio.wait_for(done.wait(), 10)
    finally:
        server.close()
        await server.wait_closed()
    return results["server"], results["client"]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["asyncio.timeout", "3.10 timer"])
def deadlines(request, monkeypatch):
    """Frame deadlines both ways: asyncio.timeout (3.11+) and the timer that cancels the task (Python 3.10)."""
    if request.param == "3.10 timer":
        monkeypatch.setattr(framing, "deadline", lambda s: framing.nullcontext() if s is None else framing._WaitFor(s))
    return request.param


def test_frames_roundtrip_over_socket():
    msgs = sample_messages(np.random.default_rng(0))

    async def handler(reader, writer):
        got = []
        for i, _ in enumerate(msgs):
            m, n = await read_frame_sized(reader, timeout=5)
            assert n == len(protocol.encode(msgs[i]))  # the frame's size, header included
            got.append(m)
            await write_frame(writer, m)
        return got

    async def client(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        echoed = []
        for m in msgs:
            await write_frame(writer, m)
            echoed.append(await read_frame(reader, timeout=5))
        with pytest.raises(ConnectionClosed):
            await read_frame(reader, timeout=5)
        writer.close()
        return echoed

    got, echoed = run(_with_server(handler, client))
    assert [protocol.encode(m) for m in got] == [protocol.encode(m) for m in msgs]
    assert [protocol.encode(m) for m in echoed] == [protocol.encode(m) for m in msgs]


def test_oversize_declared_length_refused_without_allocating():
    """A 2 GiB length header is refused at once; the reader never buffers a body (peak alloc ≪ 1 MiB)."""

    async def handler(reader, writer):
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            await read_frame(reader, max_size=1 << 20, timeout=10)
        except FrameTooLarge as e:
            _, peak = tracemalloc.get_traced_memory()
            return e, time.monotonic() - t0, peak
        finally:
            tracemalloc.stop()

    async def client(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(struct.pack(">I", 2**31) + b"\x00" * 1000)  # the body never comes
        await writer.drain()
        await reader.read()  # until the server hangs up
        writer.close()

    (err, elapsed, peak), _ = run(_with_server(handler, client))
    assert "limit is 1048576" in str(err)
    assert elapsed < 2.0  # did not wait for the 10 s timeout
    assert peak < 1 << 20  # vs a 2 GiB declared body


def test_slow_loris_peer_times_out(deadlines):
    """A peer trickling one byte per 50 ms cannot keep a frame read going beyond ``timeout``."""

    async def handler(reader, writer):
        t0 = time.monotonic()
        try:
            await read_frame(reader, timeout=0.5)
        except FrameTimeout as e:
            return e, time.monotonic() - t0

    async def client(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        frame = protocol.encode(M.Bye(reason="x" * 200))
        try:
            for b in frame:
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, OSError):
            pass
        writer.close()

    (err, elapsed), _ = run(_with_server(handler, client))
    assert isinstance(err, FrameTimeout) and 0.4 < elapsed < 2.0


def test_idle_timeout_and_truncation(deadlines):
    async def idle_handler(reader, writer):
        try:
            await read_frame(reader, timeout=5, idle_timeout=0.2)
        except FrameTimeout as e:
            return e

    async def silent_client(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.read()
        writer.close()

    err, _ = run(_with_server(idle_handler, silent_client))
    assert isinstance(err, FrameTimeout) and "no frame started" in str(err)

    async def trunc_handler(reader, writer):
        try:
            await read_frame(reader, timeout=5)
        except TruncatedFrame as e:
            return e

    async def half_client(port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        f = protocol.encode(M.Bye(reason="bye now"))
        writer.write(f[: len(f) // 2])
        await writer.drain()
        writer.close()

    err, _ = run(_with_server(trunc_handler, half_client))
    assert type(err) is TruncatedFrame


# ---- auth ---------------------------------------------------------------------------------------------
def _auth_server(authenticator):
    async def handler(reader, writer):
        hello = await A.server_handshake(reader, writer, authenticator, timeout=5)
        msg = await read_frame(reader, timeout=5)
        await write_frame(writer, M.Ack(round_id=0, accepted=True, reason=f"hi {hello.client_id}"))
        return msg

    return handler


def test_handshake_ok_then_messages():
    authn = A.Authenticator(TOKENS)

    async def client(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        welcome = await A.client_handshake(reader, writer, "pi-1", TOKENS["pi-1"], timeout=5)
        await write_frame(writer, M.StatusRequest())
        ack = await read_frame(reader, timeout=5)
        writer.close()
        return welcome, ack

    server_msg, (welcome, ack) = run(_with_server(_auth_server(authn), client))
    assert isinstance(server_msg, M.StatusRequest)
    assert welcome.client_id == "pi-1" and ack.reason == "hi pi-1"


@pytest.mark.parametrize("client_id,token", [("pi-1", "wrong"), ("pi-1", TOKENS["pi-2"]), ("nobody", "x")])
def test_wrong_token_or_unknown_client(client_id, token):
    authn = A.Authenticator(TOKENS)

    async def client(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await A.client_handshake(reader, writer, client_id, token, timeout=5)
        finally:
            writer.close()

    server_err, client_err = run(_with_server(_auth_server(authn), client))
    assert type(server_err) is AuthError and "MAC" in str(server_err)
    assert type(client_err) is AuthError  # the server's Error frame maps back to the class


def test_replayed_nonce():
    """An eavesdropper replaying a captured Auth on a new connection gets ReplayedNonce."""
    authn = A.Authenticator(TOKENS)
    captured: dict = {}

    async def honest(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await write_frame(writer, M.Hello(client_id="pi-1"))
        ch = await read_frame(reader, timeout=5)
        captured["auth"] = A.answer(ch, "pi-1", TOKENS["pi-1"])
        await write_frame(writer, captured["auth"])
        welcome = await read_frame(reader, timeout=5)
        await write_frame(writer, M.Bye())
        await read_frame(reader, timeout=5)
        writer.close()
        return welcome

    _, welcome = run(_with_server(_auth_server(authn), honest))
    assert isinstance(welcome, M.Welcome)

    async def attacker(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await write_frame(writer, M.Hello(client_id="pi-1"))
        await read_frame(reader, timeout=5)  # a fresh challenge the attacker cannot answer
        await write_frame(writer, captured["auth"])
        try:
            return await read_frame(reader, timeout=5)
        finally:
            writer.close()

    server_err, reply = run(_with_server(_auth_server(authn), attacker))
    assert type(server_err) is ReplayedNonce
    assert isinstance(reply, M.Error) and reply.code == "replayed_nonce"


def test_version_mismatch_in_hello():
    async def client(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await write_frame(writer, M.Hello(client_id="pi-1", versions=[7]))
        try:
            return await read_frame(reader, timeout=5)
        finally:
            writer.close()

    server_err, reply = run(_with_server(_auth_server(A.Authenticator(TOKENS)), client))
    assert type(server_err) is VersionMismatch and reply.code == "version_mismatch"


def test_nonce_registry():
    now = [0.0]
    reg = A.NonceRegistry(ttl=10, max_pending=3, clock=lambda: now[0])
    n1 = reg.issue()
    reg.consume(n1)
    with pytest.raises(ReplayedNonce):
        reg.consume(n1)
    with pytest.raises(AuthError, match="never issued"):
        reg.consume(b"\x00" * 32)
    n2 = reg.issue()
    now[0] = 11.0
    with pytest.raises(AuthError, match="expired"):
        reg.consume(n2)
    with pytest.raises(ReplayedNonce):  # even an expired attempt burns the nonce
        reg.consume(n2)
    olds = [reg.issue() for _ in range(5)]  # pending capped at 3: the oldest are dropped
    with pytest.raises(AuthError, match="never issued"):
        reg.consume(olds[0])
    reg.consume(olds[-1])


def test_mac_helpers():
    nonce = A.new_nonce()
    mac = A.compute_mac("tok", nonce, "pi-1")
    A.verify_mac("tok", nonce, "pi-1", mac)
    with pytest.raises(AuthError):
        A.verify_mac("tok", nonce, "pi-2", mac)  # MAC binds the client id
    with pytest.raises(AuthError):
        A.verify_mac("tok2", nonce, "pi-1", mac)


def test_token_file(tmp_path: Path):
    p = tmp_path / "tokens"
    p.write_text("# clients\npi-1 abc\n\npi-2  def  # kitchen\n")
    store = A.TokenStore.from_file(p)
    assert store.get("pi-1") == b"abc" and store.get("pi-2") == b"def" and "pi-3" not in store
    p.write_text("broken line here\n")
    with pytest.raises(ValueError):
        A.TokenStore.from_file(p)


# ---- TLS ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def self_signed(tmp_path_factory) -> tuple[Path, Path]:
    """A throwaway self-signed cert for localhost. The venv has no `cryptography`, so the openssl CLI makes it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_handshake_and_frames(self_signed):
    cert, key = self_signed
    server_ctx = A.server_ssl_context(cert, key)
    authn = A.Authenticator(TOKENS)

    async def client(port):
        ctx = A.client_ssl_context(cert)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        assert writer.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        welcome = await A.client_handshake(reader, writer, "pi-2", TOKENS["pi-2"], timeout=5)
        await write_frame(writer, _first_round_start(sample_messages(np.random.default_rng(1))))
        ack = await read_frame(reader, timeout=5)
        writer.close()
        return welcome, ack

    server_msg, (welcome, ack) = run(_with_server(_auth_server(authn), client, ssl_server=server_ctx))
    assert isinstance(server_msg, M.RoundStart) and welcome.client_id == "pi-2" and ack.accepted


def test_tls_client_refuses_unknown_server(self_signed):
    cert, key = self_signed

    async def main():
        async def handler(reader, writer):  # never reached: the TLS handshake fails first
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=A.server_ssl_context(cert, key))
        port = server.sockets[0].getsockname()[1]
        try:
            # default context: system CAs only, so a self-signed server must be refused
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port, ssl=A.client_ssl_context(),
                                              server_hostname="localhost")
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_usage_example_server_loop_and_client():
    """The usage example of the report/docstrings, verbatim in spirit: a guide loop and an edge client."""
    from protocol import Ack, Bye, Hyper, LossStats, RoundRequest, RoundStart, Update, codecs
    from protocol.samples import random_steps, tiny_spec
    from protocol.zo import Schedule

    spec = tiny_spec()
    authn = A.Authenticator(TOKENS)

    async def serve(reader, writer):  # the cloud daemon's per-connection loop
        hello = await A.server_handshake(reader, writer, authn, timeout=5)
        while True:
            msg = await read_frame(reader, timeout=5, idle_timeout=60)
            if isinstance(msg, RoundRequest):
                theta = codecs.encode(np.zeros(spec.d, np.float32), "q8")
                await write_frame(writer, RoundStart(round_id=1, spec=spec, theta=theta, deadline=time.time() + 60,
                                                     hyper=Hyper(schedule=Schedule(), q=4, local_steps=2, batch_size=8)))
            elif isinstance(msg, Update):
                msg.check_spans(spec.d)
                await write_frame(writer, Ack(round_id=msg.round_id, accepted=True))
            elif isinstance(msg, Bye):
                return hello.client_id, msg

    async def client(port):  # the edge
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await A.client_handshake(reader, writer, "pi-1", TOKENS["pi-1"], timeout=5)
        await write_frame(writer, RoundRequest(last_round=-1))
        rs = await read_frame(reader, timeout=5)
        theta = rs.theta.decode()
        steps = random_steps(np.random.default_rng(0), rs.hyper.local_steps, rs.hyper.q, rs.spec.d)
        await write_frame(writer, Update(round_id=rs.round_id, client_id="pi-1", steps=steps, n_examples=16,
                                         loss=LossStats(mean=1.0, min=0.9, max=1.1, last=0.95)))
        ack = await read_frame(reader, timeout=5)
        await write_frame(writer, Bye())
        writer.close()
        return theta.shape, ack

    (cid, bye), (shape, ack) = run(_with_server(serve, client))
    assert cid == "pi-1" and isinstance(bye, Bye) and shape == (spec.d,) and ack.accepted
