"""The edge's federated client (Flower-like "client" role). Never imports torch.

Loop (:mod:`protocol` messages): connect + HMAC handshake (:func:`protocol.auth.client_handshake`) →
``RoundRequest`` → ``RoundStart`` of round t (fp32 θ_t, compressed guidance, schedule, λ, local steps) → run the
local ZO steps in a worker thread with the *decoded* guidance → persist the ``Update`` frame → send it → on
``Ack`` forget it → repeat. ``Status(phase="wait")`` means ask again; ``Bye(reason="done")`` ends the run.

Prefetch: while round t trains, a second connection asks for round t+1's guidance (``GuidanceRequest``, a long
poll the guide answers once it has built it); the next ``RoundRequest`` lists the guide ids held, and the guide
then sends a RoundStart that names the guidance instead of carrying Q and g_B again.

Robustness: reconnects with exponential backoff (jittered with an explicit RNG); an upload is written to
``state_dir/pending.bin`` before it is sent and removed after its ack, so a client restarted after a crash
re-sends it (the guide acks duplicates idempotently); a restarted client that was selected for the open
round gets the same assignment again and recomputes the same records (seeds are pure functions of step).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convert.atomic import atomic_write_bytes
from edge.held_theta import HeldTheta
from edge.round_trainer import (
    GUIDES_HELD,
    EdgeTrainerAdapter,
    LocalTrainer,
    RoundResult,
    client_seed,
    round_inputs,
    round_update,
    train_round_start,
)
from protocol.auth import client_handshake
from protocol.codecs import EncodedArray
from protocol.constants import DEFAULT_MAX_FRAME, MAX_GUIDE_IDS
from protocol.errors import AuthError, ProtocolError
from protocol.framing import parse_addr, read_frame, write_frame
from protocol.messages import (
    Ack,
    Bye,
    Error,
    Guidance,
    GuidanceNext,
    GuidanceRequest,
    Message,
    RoundRequest,
    RoundStart,
    Status,
    Update,
    decode,
    encode,
)
from protocol.zo import Guide


class AuthRefused(RuntimeError):
    """The guide refused this client's id/token: retrying cannot help."""


@dataclass(frozen=True)
class ClientConfig:
    """Where the guide is, who we are, where local state lives, and how hard to retry."""

    host: str
    port: int
    client_id: str
    token: str
    state_dir: str = ".edgezo-client"
    max_rounds: int = 0  # 0: until the guide says done
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    max_reconnects: int = 0  # consecutive failed attempts before giving up; 0: never give up
    io_timeout_s: float = 120.0
    max_frame_mb: float = 256.0
    prefetch: bool = True  # fetch the next round's guidance on a second connection while training
    ca: str = ""  # PEM file of the CA that signed the guide's certificate ("" : the system's CAs)
    insecure: bool = False  # plaintext TCP (a guide with insecure = true); logged as a warning

    def __post_init__(self) -> None:
        if not self.client_id or not self.token:
            raise ValueError("client_id and token are required")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if self.max_rounds < 0 or self.max_reconnects < 0 or self.io_timeout_s <= 0:
            raise ValueError("max_rounds/max_reconnects must be >= 0 and io_timeout_s > 0")
        if self.insecure and self.ca:
            raise ValueError("--insecure and --ca contradict each other: pick one")

    def ssl_context(self):
        """TLS context verifying the guide (against ``ca``, else the system CAs); None when insecure."""
        if self.insecure:
            return None
        import ssl

        from protocol.auth import client_ssl_context

        try:
            return client_ssl_context(self.ca or None)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"CA file {self.ca} cannot be loaded: {e}") from e


# ---- the client ---------------------------------------------------------------------------------
@dataclass
class ClientSummary:
    rounds: list[dict] = field(default_factory=list)
    reconnects: int = 0
    forward_passes: int = 0


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cfg: ClientConfig) -> None:
        self.r, self.w, self.cfg = reader, writer, cfg

    async def read(self, idle_timeout: float | None = None) -> Message:
        """The next message; waits up to ``idle_timeout`` for it to start (default: io_timeout_s)."""
        c = self.cfg
        return await read_frame(self.r, max_size=int(c.max_frame_mb * (1 << 20)), timeout=c.io_timeout_s,
                                idle_timeout=idle_timeout or c.io_timeout_s)

    async def request(self, msg: Message, idle_timeout: float | None = None) -> Message:
        await write_frame(self.w, msg, timeout=self.cfg.io_timeout_s)
        return await self.read(idle_timeout)

    async def send_raw(self, frame: bytes) -> Message:
        self.w.write(frame)
        await asyncio.wait_for(self.w.drain(), self.cfg.io_timeout_s)
        return await self.read()

    def close(self) -> None:
        self.w.close()


class EdgeClient:
    """Joins rounds, trains, uploads, repeats. ``await run()`` returns when the guide is done / max_rounds."""

    def __init__(self, *, config: ClientConfig, trainer: LocalTrainer, rng: np.random.Generator,
                 log: Callable[..., None] | None = None) -> None:
        self.cfg, self.trainer, self.rng = config, trainer, rng
        self.log = log or _stderr_log
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.guides: dict[str, Guide] = {}  # guide_id → decoded guide (decode each guidance once)
        self.last_round = -1
        self.summary = ClientSummary()
        self.done = False
        self.theta: np.ndarray | None = None  # θ of the last round trained (after local steps)
        # The θ the last round started from and its guidance, on disk: the guide may then send the next θ as the
        # moves since it (k numbers a subspace round) instead of dense (edge.held_theta, cloud.theta_wire).
        self.held = HeldTheta(self.state_dir)
        self.guides.update(self.held.load())
        self._wire: dict[str, Guidance] = {}  # guide_id → guidance as received (what self.held keeps on disk)
        self._prefetch_task: asyncio.Task | None = None
        self._tls: Any = False  # the TLS context, made on first connect (None: --insecure)

    # ---- persistence ------------------------------------------------------------------------------
    @property
    def _pending_path(self) -> Path:
        return self.state_dir / "pending.bin"

    def _save_pending(self, frame: bytes) -> None:
        atomic_write_bytes(self._pending_path, frame)

    def _clear_pending(self) -> None:
        self._pending_path.unlink(missing_ok=True)

    def _record(self, entry: dict) -> None:
        self.summary.rounds.append(entry)
        with open(self.state_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")

    # ---- main loop --------------------------------------------------------------------------------
    async def run(self) -> ClientSummary:
        attempt = 0
        while not self.done:
            conn = None
            try:
                conn = await self._connect()
                attempt = 0
                await self._session(conn)
            except AuthRefused:
                raise
            except ssl.SSLCertVerificationError as e:  # retrying cannot help: say what to do
                raise AuthRefused(f"the guide's TLS certificate is not trusted ({e.verify_message}); pass --ca with "
                                  "the CA file that signed it") from e
            except ssl.SSLError as e:
                raise AuthRefused(f"TLS with the guide failed ({e.reason or e}); if the guide runs with "
                                  "insecure = true, pass --insecure") from e
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ProtocolError) as e:
                attempt += 1
                self.summary.reconnects += 1
                if self.cfg.max_reconnects and attempt > self.cfg.max_reconnects:
                    raise ConnectionError(f"gave up after {attempt - 1} reconnects: {e}") from e
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2.0 ** (attempt - 1))
                delay *= 0.5 + 0.5 * float(self.rng.random())
                self.log("reconnect", client=self.cfg.client_id, attempt=attempt, delay_s=round(delay, 2),
                         error=f"{type(e).__name__}: {e}")
                await asyncio.sleep(delay)
            finally:
                if conn is not None:
                    conn.close()
        if self._prefetch_task is not None:
            self._prefetch_task.cancel()
        return self.summary

    async def _connect(self, quiet: bool = False) -> _Conn:
        c = self.cfg
        if self._tls is False:
            self._tls = c.ssl_context()
            if self._tls is None:
                self.log("warning", message="--insecure: plaintext TCP to the guide")
        r, w = await asyncio.wait_for(
            asyncio.open_connection(c.host, c.port, ssl=self._tls, server_hostname=c.host if self._tls else None),
            c.io_timeout_s)
        conn = _Conn(r, w, c)
        try:
            welcome = await client_handshake(r, w, c.client_id, c.token, timeout=c.io_timeout_s, software="edgezo")
        except AuthError as e:
            conn.close()
            raise AuthRefused(f"guide refused client {c.client_id!r}: {e}") from e
        except BaseException:
            conn.close()
            raise
        if not quiet:
            self.log("connected", client=c.client_id, session=welcome.session_id)
        return conn

    async def _session(self, conn: _Conn) -> None:
        if self._pending_path.exists():  # an upload from before a crash/disconnect: re-send it first
            reply = await conn.send_raw(self._pending_path.read_bytes())
            self.log("resent", client=self.cfg.client_id, reply=_reply_name(reply),
                     code=reply.code if isinstance(reply, Error) else None)
            self._clear_pending()
        while not self.done:
            if self.cfg.max_rounds and len(self.summary.rounds) >= self.cfg.max_rounds:
                self.done = True
                await write_frame(conn.w, Bye(), timeout=self.cfg.io_timeout_s)
                return
            await self._await_prefetch()
            held = list(self.guides)[-MAX_GUIDE_IDS:]
            msg = await conn.request(RoundRequest(last_round=self.held.round_id, theta_digest=self.held.digest,
                                                  guide_ids=held), idle_timeout=self.cfg.io_timeout_s + 60.0)
            if isinstance(msg, Bye):
                self.done = True
                return
            if isinstance(msg, Status):
                retry = msg.extra.get("retry_s", 0.0)
                await asyncio.sleep(float(retry) if isinstance(retry, (int, float)) else 0.0)
                continue
            if isinstance(msg, Error):
                raise msg.exception()
            if not isinstance(msg, RoundStart):
                raise ProtocolError(f"unexpected reply to RoundRequest: {type(msg).__name__}")
            await self._do_round(conn, msg)

    async def _prefetch(self, rid: int) -> None:
        """Round ``rid``'s guidance over a second connection, decoded into ``self.guides``. Best effort: any
        failure is logged and the next RoundStart simply carries the guidance."""
        conn = None
        try:
            conn = await self._connect(quiet=True)
            for _ in range(3):  # the guide long-polls; "not ready" means ask again
                reply = await conn.request(GuidanceRequest(round_id=rid), idle_timeout=self.cfg.io_timeout_s + 60.0)
                if not isinstance(reply, GuidanceNext):
                    raise ProtocolError(f"unexpected reply to GuidanceRequest: {type(reply).__name__}")
                if reply.ready:
                    break
            if reply.ready and reply.guidance is not None:
                g = reply.guidance
                gid = g.guide_id or g.digest()
                if gid not in self.guides:
                    self.guides[gid] = await asyncio.get_running_loop().run_in_executor(None, g.to_guide)
                    while len(self.guides) > GUIDES_HELD:
                        self.guides.pop(next(iter(self.guides)))
                self._wire = {k: v for k, v in self._wire.items() if k in self.guides} | {gid: g}
                self.log("prefetched", client=self.cfg.client_id, round=rid, guide_id=gid)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ProtocolError, AuthRefused) as e:
            self.log("prefetch_failed", client=self.cfg.client_id, round=rid, error=f"{type(e).__name__}: {e}")
        finally:
            if conn is not None:
                conn.close()

    async def _await_prefetch(self) -> None:
        """Let a running prefetch finish before asking for the next round (bounded: it is only an optimisation)."""
        task, self._prefetch_task = self._prefetch_task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(task, self.cfg.io_timeout_s)
        except asyncio.TimeoutError:
            self.log("prefetch_failed", client=self.cfg.client_id, error="timed out")

    async def _do_round(self, conn: _Conn, rs: RoundStart) -> None:
        rid = rs.round_id
        held = None if self.held.theta is None else (self.held.round_id, self.held.theta)
        try:
            theta, guide, gid = round_inputs(rs, self.guides, held)
        except ProtocolError:
            if not isinstance(rs.theta, EncodedArray):  # moves this client cannot apply: ask again holding nothing,
                self.held.forget()  # so the guide sends θ dense (never a retry loop on the same moves)
            raise
        wire = rs.guidance if rs.guidance is not None else self._wire.get(gid)
        if wire is not None:
            self._wire = {k: v for k, v in self._wire.items() if k in self.guides} | {gid: wire}
        # kept before training: a device restarted mid-round still holds this round's θ and guidance
        await asyncio.get_running_loop().run_in_executor(None, self.held.save, rid, theta, wire)
        if self.cfg.prefetch and guide is not None:
            self._prefetch_task = asyncio.ensure_future(self._prefetch(rid + 1))
        t0 = time.perf_counter()
        res: RoundResult = await asyncio.get_running_loop().run_in_executor(
            None, lambda: train_round_start(self.trainer, rs, theta, guide))
        train_s = time.perf_counter() - t0
        self.theta, self.last_round = res.theta, rid
        self.summary.forward_passes += res.forward_passes
        frame = encode(round_update(rs, res, client_id=self.cfg.client_id, guide_id=gid, duration_s=train_s))
        self._save_pending(frame)
        reply = await conn.send_raw(frame)
        self._clear_pending()
        entry = {"round": rid, "reply": _reply_name(reply), "loss_before": _num(res.loss_before),
                 "loss_after": _num(res.loss_after), "train_s": round(train_s, 3),
                 "forward_passes": res.forward_passes, "up_bytes": len(frame)}
        if isinstance(reply, Error):
            entry["error"] = reply.message
        elif isinstance(reply, Ack) and not reply.accepted:
            entry["error"] = reply.reason
        self._record(entry)
        self.log("round_done", client=self.cfg.client_id, **entry)


def _reply_name(reply: Message) -> str:
    """"ack" (accepted), "refused" (Ack not accepted), "error" or the message type."""
    if isinstance(reply, Ack):
        return "ack" if reply.accepted else "refused"
    return "error" if isinstance(reply, Error) else reply.TYPE


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _stderr_log(event: str, **fields: Any) -> None:
    import sys

    print(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}), file=sys.stderr, flush=True)


def decode_pending(frame: bytes) -> Update:
    """The Update stored in a pending file (for tools and tests)."""
    msg = decode(frame)
    if not isinstance(msg, Update):
        raise ValueError(f"pending file holds a {type(msg).__name__}, not an Update")
    return msg


__all__ = [
    "DEFAULT_MAX_FRAME", "AuthRefused", "ClientConfig", "ClientSummary", "EdgeClient",
    "LocalTrainer", "RoundResult", "add_guide_args", "parse_addr", "run_guided",
]


# ---- `edgezo train --guide ADDR`: the pieces edge/commands.py wires in ----------------------------------
def add_guide_args(p) -> None:
    """Add the federated flags to the ``train`` parser (``--guide`` switches train into client mode)."""
    p.add_argument("--guide", default=None, metavar="HOST:PORT", help="join a guide's federated rounds")
    p.add_argument("--token", default=None, help="this device's guide token (or env EDGEZO_TOKEN)")
    p.add_argument("--client-id", default=None, help="this device's id at the guide (default: hostname)")
    p.add_argument("--state-dir", default=".edgezo-client", help="pending uploads and round log")
    p.add_argument("--max-rounds", type=int, default=0, help="stop after N rounds (0: until the guide is done)")
    p.add_argument("--ca", default="", help="CA file (PEM) that signed the guide's certificate (default: system CAs)")
    p.add_argument("--insecure", action="store_true", help="plaintext TCP, for a guide with insecure = true")


def run_guided(args, trainer) -> int:
    """Client mode of ``edgezo train``: ``trainer`` is the edge's :class:`edge.train.Trainer` (llama.cpp).

    The guide decides θ, schedule, λ and local steps; the local ``--steps``/``--lr`` are ignored.
    """
    import socket
    import sys

    token = args.token or os.environ.get("EDGEZO_TOKEN")
    if not token:
        print("edgezo: error: --guide needs --token (or EDGEZO_TOKEN)", file=sys.stderr)
        return 2
    host, port = parse_addr(args.guide)
    cid = args.client_id or socket.gethostname()
    if getattr(trainer.cfg, "seed", 0) == 0:  # distinct perturbation seeds per device
        trainer.set_seed(client_seed(cid) % (2**31))
    cfg = ClientConfig(host=host, port=port, client_id=cid, token=token, state_dir=args.state_dir,
                       max_rounds=args.max_rounds, ca=args.ca, insecure=args.insecure)
    client = EdgeClient(config=cfg, trainer=EdgeTrainerAdapter(trainer=trainer),
                        rng=np.random.default_rng(client_seed(cid)))
    try:
        summary = asyncio.run(client.run())
    except AuthRefused as e:
        print(f"edgezo: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"rounds": len(summary.rounds), "reconnects": summary.reconnects,
                      "forward_passes": summary.forward_passes}))
    return 0
