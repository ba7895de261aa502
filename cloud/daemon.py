"""The guide daemon: an asyncio TCP server running federated rounds (Flower-like "server" role).

Roles: the daemon owns θ_t, opens rounds, samples clients, collects uploads and closes rounds at the
deadline; *what* to aggregate is :mod:`cloud.aggregate` (pure), *where state lives* is :mod:`cloud.store`,
*what the cloud computes* is any guidance source with ``submit(theta, round_id) -> Future[Guidance]``
(:class:`cloud.guidance.GuidanceBuilder` on a torch model, or :class:`StaticGuidance` for load tests).

Conversation (:mod:`protocol` messages and framing; HMAC handshake of :mod:`protocol.auth`)::

    C: Hello                  S: Challenge
    C: Auth                   S: Welcome                    | Error(auth) + close
    C: RoundRequest           S: RoundStart | Status(phase="wait", extra.retry_s) | Bye(reason="done")
    C: Update                 S: Ack(accepted) | Error(code, fatal=False)
    C: StatusRequest          S: Status  (also before Hello when public_status; rounds/clients as JSON in extra)
    C: Bye

Downlink: θ_t exactly (the edge must start from the round's θ bit for bit, checked by digest): as the moves since
the θ the edge holds (a subspace round's c-space move: k numbers; with ``[wire] theta = "adaptive"`` a compressed
delta that *is* the round's θ), else dense fp32 (:mod:`cloud.theta_wire`). Guidance Q / U / g_B compressed once
([wire] guidance) via :meth:`protocol.Guidance.from_guide`; the round plan keeps the *decoded* guide, so replay uses
exactly what the edges used. Bytes per round each way are logged (``round_closed``), stored with the round and
shown by ``edgezo guide status``.

Durability: an upload is COMMITTED to SQLite (WAL, synchronous=FULL) before its ack is written; the round
plan (θ_t, guide, schedule) is on disk before any client hears of the round. Restart resumes the open round.
This module is torch-free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import enum
import gc
import json
import logging
import math
import signal
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from cloud.aggregate import RoundPlan, Upload
from cloud.config import GuideConfig
from cloud.connections import HANDSHAKE_MAX_FRAME, ConnectionsMixin, StatusNeedsToken, _Refuse  # noqa: E402, F401
from cloud.downlink import DownlinkMixin
from cloud.engine import merge_move, plan_round
from cloud.guidance import Guidance
from cloud.guide_log import JsonLog, _finite, _json_capped, _jsonable  # noqa: E402, F401
from cloud.store import Store
from cloud.uploads import UploadsMixin  # noqa: E402
from protocol.auth import Authenticator
from protocol.messages import Guidance as WireGuidance
from protocol.messages import (
    ReplayRound,
    Status,
    theta_digest,
)
from protocol.spec import AdapterSpec
from protocol.zo import Guide, orthonormal_basis

LAG_PROBE_S = 0.02  # the event-loop lag probe's period (GuideServer._watch_loop)
LAG_SAMPLES_MAX = 200_000  # probes kept per round (about 70 min of an open round; a long round keeps its first ones)


class GuidanceSource(Protocol):
    def submit(self, theta: np.ndarray, round_id: int) -> cf.Future[Guidance]: ...

    def close(self) -> None: ...


class StaticGuidance:
    """A fixed seeded random basis, no cloud gradient: for load tests and model-free daemons. ``mix_alpha``: the
    Guided-ES mix ([train] mix_alpha; the guide's α, 1 for a subspace)."""

    def __init__(self, *, d: int, k: int, mix_alpha: float, rng: np.random.Generator, kind: str = "guided") -> None:
        basis = orthonormal_basis(list(rng.standard_normal((k, d)).astype(np.float32)))
        self.guide = Guide(basis=basis, alpha=mix_alpha, grad=None, kind=kind)

    def submit(self, theta: np.ndarray, round_id: int) -> cf.Future[Guidance]:
        fut: cf.Future[Guidance] = cf.Future()
        fut.set_result(Guidance(guide=self.guide, public_loss=math.nan, theta_round=round_id))
        return fut

    def close(self) -> None:
        pass


class Phase(enum.Enum):
    """Where the guide's round is. Transitions only along :data:`TRANSITIONS` (``GuideServer._to`` raises
    otherwise), so an upload can never land in a round being merged and a closed round never reopens."""

    IDLE = "idle"  # no open round: the next one is being planned (guidance building, clients joining)
    OPEN = "open"  # a round is out: RoundStarts are sent, uploads are accepted and committed
    CLOSING = "closing"  # the deadline passed or everyone uploaded: no more uploads, the merge runs
    FINISHED = "finished"  # every configured round is merged: clients are told "done"


TRANSITIONS: dict[Phase, set[Phase]] = {
    Phase.IDLE: {Phase.OPEN, Phase.FINISHED},
    Phase.OPEN: {Phase.CLOSING},
    Phase.CLOSING: {Phase.IDLE},
    Phase.FINISHED: set(),
}


class RoundStateError(RuntimeError):
    """A round transition out of order (a bug, never a client's doing)."""


class StartupError(ValueError):
    """The state dir cannot be resumed (another adapter spec, a missing θ checkpoint, a damaged database): `guide
    serve` says so in one line; nothing in the state dir is changed."""


def check_split(tc, spec: AdapterSpec) -> None:
    """[train] split_layer against the adapter: in range, block 2 not empty, and no split step (adapter layers
    on both sides) under subspace guidance (the subspace step is a plain one; frozen bottom is fine)."""
    s = tc.split_layer
    if s < 0:
        return
    if s >= spec.dims.n_layers:
        raise ValueError(f"[train] split_layer {s} is out of range for a {spec.dims.n_layers}-layer model")
    off = spec.layer_offset(s)
    if off == spec.d:
        raise ValueError(f"[train] split_layer {s} is above every adapter layer {list(spec.layers)}")
    if off > 0 and tc.subspace:
        raise ValueError(f"[train] split_layer {s} splits the adapter, which kind 'subspace' cannot use: pick kind "
                         f"'guided', or a split_layer <= {min(spec.layers)} (frozen bottom)")


class GuideServer(DownlinkMixin, UploadsMixin, ConnectionsMixin):
    """One guide: rounds, clients and durable state. ``await start()``, then ``await wait_closed()``."""

    def __init__(self, *, config: GuideConfig, spec: AdapterSpec, theta0: np.ndarray, guidance: GuidanceSource,
                 log: Callable[..., None] | None = None) -> None:
        if np.asarray(theta0).shape != (spec.d,):
            raise ValueError(f"θ0 has shape {np.asarray(theta0).shape}, spec has d={spec.d}")
        check_split(config.train, spec)
        self.cfg, self.spec, self.guidance = config, spec, guidance
        self.log = log or JsonLog(config.server.log_file)
        self.theta = np.array(theta0, np.float32, copy=True)
        self.store = Store(root=config.server.state_dir)
        self._db_pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self.round_id = 0
        self.plan: RoundPlan | None = None
        self.selected: list[str] = []
        self.uploaded: set[str] = set()
        # client → its committed upload this round: a re-send is compared with it (upload_digest) only when one comes
        self._stored: dict[str, Upload] = {}
        self.deadline = 0.0
        self.phase = Phase.IDLE
        self.waiting: dict[str, asyncio.Future] = {}
        self._waiting_changed: asyncio.Event | None = None
        self._round_done: asyncio.Event | None = None
        self._next: cf.Future[Guidance] | None = None  # guidance for round_id + 1 (computed at θ_{round_id})
        self._next_round = -1  # the round self._next is for
        # round → its compressed guidance (prefetch + RoundStart), being built or built
        self._wire_cache: dict[int, asyncio.Future[WireGuidance]] = {}
        self._prefetch_frames: dict[tuple[int, str], bytes] = {}  # the latest encoded GuidanceNext
        self._pending: list[tuple[Upload, asyncio.Future]] = []
        self._wire_guidance: WireGuidance | None = None  # the open round's guidance as sent
        self._round_frames: dict[tuple[bool, int], bytes] = {}  # the open round's RoundStart: {(by_ref, base): frame}
        # round → (digest of its θ, the move that reached it from the previous round's θ): what the θ moves an edge
        # is sent are built from (cloud.theta_wire.choose_theta); read back from the plan files after a restart
        self._history: dict[int, tuple[str, ReplayRound | None] | None] = {}
        self._last: tuple[RoundPlan, np.ndarray | None] | None = None  # the last closed round's plan and c-space move
        self.authn = Authenticator(config.tokens)
        self.bytes = _new_bytes()  # the open round's
        # the open round's service times (UploadsMixin._timings_summary) and event-loop lag (_watch_loop)
        self.timings = _new_timings()
        self.last_bytes: dict[str, int] = {}  # the last closed round's byte summary
        self._t0 = time.time()
        self._inflight: dict[str, asyncio.Future] = {}
        self._flushing = False
        self._server: asyncio.base_events.Server | None = None
        self._loop_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        self._stopped: asyncio.Event | None = None
        self._conns: set[asyncio.Task] = set()
        self.stats = {"uploads": 0, "refused": 0, "auth_failed": 0, "malformed": 0, "examples_capped": 0,
                      "forged_duplicates": 0}
        # serve() sets this in the daemon's own process: collect cyclic garbage between rounds, not during them
        # (_collect_between_rounds); a server embedded in another process (tests, demo) leaves the GC alone
        self.manage_gc = False

    def _to(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RoundStateError(f"round {self.round_id}: {self.phase.value} → {phase.value} is not a transition")
        self.phase = phase

    @property
    def closing(self) -> bool:
        return self.phase is Phase.CLOSING

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._waiting_changed = asyncio.Event()
        self._round_done = asyncio.Event()
        self._stopped = asyncio.Event()
        try:
            await self._db(self._resume)
        except sqlite3.DatabaseError as e:  # a state.db damaged past its header (Store opened it)
            raise StartupError(f"state dir {self.cfg.server.state_dir} cannot be read back ({e})") from e
        s = self.cfg.server
        tls = s.ssl_context()
        if tls is None:
            self.log("warning", message="insecure = true: plaintext TCP, tokens' HMACs and θ are readable on the wire")
        self._server = await asyncio.start_server(self._handle, s.host, s.port, limit=1 << 16, ssl=tls)
        self.log("listening", host=s.host, port=self.port, round=self.round_id, d=self.spec.d, tls=tls is not None)
        if self.manage_gc:
            self._collect_between_rounds()
        self._loop_task = asyncio.create_task(self._round_loop())
        self._lag_task = asyncio.create_task(self._watch_loop())

    def _collect_between_rounds(self) -> None:
        """A full collection now, then freeze what survives. CPython's GC otherwise runs a full (generation 2) pass
        whenever enough objects were allocated; with 1,000 connections and a round's uploads alive, a one-off trace
        showed such passes of 43-104 ms in the middle of a round, every ack waiting behind them. Later passes skip
        frozen objects, so they stay short; each round close unfreezes and collects again, so nothing cyclic leaks."""
        t = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self.log("gc", ms=round((time.perf_counter() - t) * 1e3, 1), collected=found, frozen=gc.get_freeze_count())

    def _resume(self) -> None:
        """Read state back: the open round with its committed uploads, or θ of the next round."""
        spec_json = json.dumps(self.spec.to_dict(), sort_keys=True)
        stored = self.store.get_meta("spec")
        if stored is None:
            self.store.set_meta("spec", spec_json)
        elif stored != spec_json:
            raise StartupError(f"state dir {self.cfg.server.state_dir} holds another adapter spec "
                             f"({_spec_diff(json.loads(stored), self.spec.to_dict())}): use the settings it was made "
                             "with, or an empty state_dir")
        row = self.store.open_round_row()
        if row is not None:
            self._to(Phase.OPEN)  # the round a crash left open is open again, with its committed uploads
            self.plan = self.store.load_plan(row["round_id"])
            self.round_id = row["round_id"]
            self.theta = self.plan.theta.copy()
            self.selected = list(row["selected"])
            self.deadline = row["deadline"]
            stored = self.store.uploads(self.round_id)
            self.uploaded = {u.client for u in stored}
            self._stored = {u.client: u for u in stored}
            self.log("resumed", round=self.round_id, uploads=len(self.uploaded), selected=len(self.selected))
            return
        last = self.store.last_round_id()
        if last >= 0:
            self.round_id = last + 1
            th = self.store.load_theta(self.round_id)
            if th is None:
                raise StartupError(f"state dir {self.cfg.server.state_dir}: θ checkpoint for round {self.round_id} "
                                   "is missing")
            self.theta = th
            self.log("resumed", round=self.round_id, uploads=0)
        else:
            self.store.save_theta(0, self.theta)

    async def _watch_loop(self, every: float = LAG_PROBE_S) -> None:
        """While a round is open, how late a timer fires (``loop_lag_ms`` in round_closed): how long the event loop
        was busy with something else, e.g. the TLS of the RoundStarts, when a client's upload or ack was due."""
        while True:
            t = time.perf_counter()
            await asyncio.sleep(every)
            lags = self.timings["loop_lag"]
            if self.phase is Phase.OPEN and len(lags) < LAG_SAMPLES_MAX:
                lags.append(max(0.0, time.perf_counter() - t - every))

    async def _db(self, fn: Callable, *args: Any) -> Any:
        """Run a Store call on the single store thread (SQLite is used from that thread only)."""
        return await asyncio.get_running_loop().run_in_executor(self._db_pool, fn, *args)

    async def wait_closed(self) -> None:
        if self._stopped is not None:
            await self._stopped.wait()

    async def stop(self) -> None:
        """Clean shutdown: stop accepting, drop connections, flush, close the store. The open round stays open."""
        if self._stopped is None or self._stopped.is_set():
            return
        self.log("stopping", round=self.round_id)
        if self._server is not None:
            self._server.close()
        for t in (self._loop_task, self._lag_task):
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._barrier()
        self.guidance.close()
        await self._db(self.store.close)
        self._db_pool.shutdown(wait=True)
        self.log("stopped", round=self.round_id)
        self._stopped.set()

    # ---- rounds ----------------------------------------------------------------------------------
    async def _guidance_result(self, fut: cf.Future[Guidance]) -> Guidance:
        return await asyncio.wrap_future(fut)

    def _submit(self, round_id: int) -> cf.Future[Guidance] | None:
        """Ask the source for round ``round_id``'s guidance at θ, or None for a round that runs without any
        ([train] subspace_rounds passed: full-space MeZO, nothing for the cloud to build)."""
        if not self.cfg.train.at_round(round_id).guided:
            return None
        return self.guidance.submit(self.theta, round_id)

    async def _round_loop(self) -> None:
        rc = self.cfg.rounds
        try:
            cur = self._submit(self.round_id) if self.plan is None else None
            # A pipelined source builds round t+1's guidance at θ_t while round t runs; one that leads (cloud
            # steps, a subspace at θ_{t+1}) needs the merge first, so it is asked after each round closes.
            pipelined = getattr(self.guidance, "pipelined", True)
            while rc.rounds == 0 or self.round_id < rc.rounds:
                if self.plan is None:
                    if cur is None:
                        cur = self._submit(self.round_id)
                    await self._open_round(None if cur is None else await self._guidance_result(cur))
                if pipelined:
                    self._next = self._submit(self.round_id + 1)
                    self._next_round = self.round_id + 1
                await self._await_round_end()
                cur = self._next if pipelined else None
                await self._close_round(cur)
            self._to(Phase.FINISHED)
            self.log("finished", rounds=self.round_id)
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_result("done")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug or a failed guidance build: log it, stop serving cleanly
            self.log("round_loop_failed", error=f"{type(e).__name__}: {e}")
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.stop()))

    async def _open_round(self, g: Guidance | None) -> None:
        rc, tc = self.cfg.rounds, self.cfg.train.at_round(self.round_id)
        while len(self.waiting) < rc.min_clients:
            self._waiting_changed.clear()
            await self._waiting_changed.wait()
        if len(self.waiting) < rc.max_clients and rc.join_window_s > 0:
            await asyncio.sleep(rc.join_window_s)
        pool = sorted(c for c, f in self.waiting.items() if not f.done())
        if len(pool) < rc.min_clients:  # some left during the window: try again
            return await self._open_round(g)
        rng = np.random.default_rng([rc.sample_seed, self.round_id])
        n = min(rc.max_clients, len(pool))
        selected = sorted(str(c) for c in rng.choice(pool, size=n, replace=False))
        # Compress the guidance once; the plan keeps the DECODED guide: edges and replay use the same bits.
        wire_g = await self._wire_for(self.round_id, g) if tc.guided else None
        guide = wire_g.to_guide() if wire_g is not None else None
        plan = plan_round(round_id=self.round_id, theta=self.theta, guidance=g, guide=guide,
                          basis_id=wire_g.guide_id if wire_g is not None else "", train=tc,
                          total_rounds=rc.rounds or 0)
        # The θ the edges start from: θ'_t itself when an exact move or dense θ gives it, else (theta = "adaptive")
        # the previous round's θ plus a compressed delta; the carry goes into the plan for the merge to add back.
        ws = await self._wire_start(plan)
        cloud_start = plan.theta
        plan = dataclasses.replace(plan, theta=ws.theta, carry=ws.carry)
        basis_id = plan.basis_id
        deadline = time.time() + rc.deadline_s
        await self._db(lambda: self.store.open_round(plan, selected=selected, deadline=deadline, move=ws.move))
        self._history[plan.round_id] = (theta_digest(plan.theta), ws.move)
        self._to(Phase.OPEN)
        self.plan, self.selected, self.uploaded, self.deadline = plan, selected, set(), deadline
        self._stored = {}
        self._wire_guidance = wire_g
        self._round_frames = {}
        self.bytes = _new_bytes()
        self.timings = _new_timings()
        self._round_done.clear()
        self.log("round_open", round=self.round_id, selected=selected if len(selected) <= 16 else len(selected),
                 basis=basis_id, waiting=len(pool), public_loss_prev=g.public_loss if g is not None else math.nan,
                 kind=tc.kind if tc.guided else "none",
                 cloud_step_norm=float(np.linalg.norm(cloud_start - self.theta)), theta_form=ws.form,
                 **({"theta_wire_error": float(np.linalg.norm(ws.carry)) if ws.carry is not None else 0.0}
                    if ws.form == "delta" else {}),
                 **({"cloud": g.info} if g is not None and g.info else {}))
        for c in selected:
            fut = self.waiting.pop(c, None)
            if fut is not None and not fut.done():
                fut.set_result("round")  # _on_round_request sends the cached frame

    async def _await_round_end(self) -> None:
        if len(self.uploaded) < len(self.selected):
            try:
                await asyncio.wait_for(self._round_done.wait(), max(0.0, self.deadline - time.time()))
            except asyncio.TimeoutError:
                missing = sorted(set(self.selected) - self.uploaded)
                self.log("deadline", round=self.round_id, missing=missing if len(missing) <= 16 else len(missing))

    async def _barrier(self) -> None:
        """Wait until every upload handed to the store so far is committed."""
        while self._pending or self._flushing:
            await asyncio.sleep(0.005)

    async def _close_round(self, nxt: cf.Future[Guidance] | None) -> None:
        self._to(Phase.CLOSING)
        await self._barrier()
        plan = self.plan
        uploads = await self._db(self.store.uploads, plan.round_id)
        loop = asyncio.get_running_loop()
        t_merge = time.perf_counter()
        theta_next, move = await loop.run_in_executor(None, merge_move, plan, uploads)
        merge_s = time.perf_counter() - t_merge
        pub = None
        if nxt is not None:
            g_next = await self._guidance_result(nxt)  # its loss is the public loss at θ_t
            pub = g_next.public_loss if math.isfinite(g_next.public_loss) else None
        losses = [u.loss_after for u in uploads if math.isfinite(u.loss_after)]
        client_loss = float(np.mean(losses)) if losses else None
        b = self._bytes_summary()
        await self._db(lambda: self.store.close_round(plan.round_id, theta_next, n_uploads=len(uploads),
                                                      public_loss=pub, client_loss=client_loss, move=move,
                                                      down_bytes=b["down_bytes"], up_bytes=b["up_bytes"]))
        self._last = (plan, move)
        self.log("round_closed", round=plan.round_id, uploads=len(uploads), selected=len(self.selected),
                 public_loss=pub, client_loss=client_loss,
                 delta_norm=float(np.linalg.norm(theta_next - plan.theta)), merge_s=round(merge_s, 3),
                 **self._bytes_summary(), **self._timings_summary())
        self.last_bytes = self._bytes_summary()
        self.theta = theta_next
        self.round_id += 1
        self.plan, self.selected, self.uploaded = None, [], set()
        self._stored = {}  # the round's uploads are garbage now, before the collection below
        self._to(Phase.IDLE)
        if self.manage_gc:
            self._collect_between_rounds()

    def status(self) -> dict:
        """Live counters (no store access)."""
        return {
            "round": self.round_id, "open": self.plan is not None, "finished": self.finished,
            "selected": len(self.selected), "uploaded": len(self.uploaded), "waiting": len(self.waiting),
            "deadline_in_s": max(0.0, self.deadline - time.time()) if self.plan is not None else None,
            "d": self.spec.d, "stats": dict(self.stats), "bytes": self._bytes_summary(),
            "last_round_bytes": dict(self.last_bytes),
        }

    async def _status_full(self, public: bool = False) -> Status:
        """Status with the live counters, bytes each way, and the store's rounds/clients as JSON strings.
        ``public`` (asked without a token): counts only, no client ids."""
        rounds = await self._db(self.store.rounds, 20)
        clients = await self._db(self.store.clients)
        extra: dict[str, Any] = {"open": self.plan is not None, "finished": self.finished,
                                 "selected": len(self.selected), "uploaded": len(self.uploaded),
                                 "waiting": len(self.waiting), **self.stats}
        extra.update({f"round_{k}": v for k, v in self._bytes_summary().items()})
        extra.update({f"last_{k}": v for k, v in self.last_bytes.items()})
        extra["rounds_json"] = _json_capped([_finite(r) for r in rounds])
        extra["clients_json"] = "[]" if public else _json_capped(clients)
        extra["clients_total"] = len(clients)
        phase = "finished" if self.finished else ("round" if self.plan is not None else "idle")
        return Status(server_id="edgezo-guide", round_id=self.round_id, phase=phase,
                      clients_connected=len(self._conns), clients_known=len(clients),
                      updates_received=self.stats["uploads"] + self.stats["refused"],
                      updates_accepted=self.stats["uploads"], uptime_s=time.time() - self._t0,
                      deadline=self.deadline if self.plan is not None else None, d=self.spec.d,
                      guide_id=self.plan.basis_id if self.plan is not None else "", extra=extra)

def _new_timings() -> dict[str, list[float]]:
    """A round's service-time samples in seconds (UploadsMixin._timings_summary; loop lag from _watch_loop)."""
    return {"commit": [], "ack": [], "loop_lag": []}


def _spec_diff(stored: dict, now: dict, prefix: str = "") -> str:
    """What differs between two adapter-spec dicts, as 'key stored → now' items (nested keys dotted)."""
    out = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if inner := _spec_diff(a, b, f"{prefix}{key}."):
                out.append(inner)
        elif a != b:
            out.append(f"{prefix}{key} {a} → {b}")
    return ", ".join(out)


def _new_bytes() -> dict[str, int]:
    """A round's byte counters: down (RoundStarts + prefetches) and up (Updates), with message counts."""
    return {"down": 0, "up": 0, "round_starts": 0, "updates": 0, "prefetches": 0, "theta_replay": 0, "theta_dense": 0}


async def serve(server: GuideServer) -> None:
    """Run until SIGTERM/SIGINT or until all rounds are done and stop() is called."""
    loop = asyncio.get_running_loop()
    server.manage_gc = True  # this process is the daemon's own
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    await server.wait_closed()


logging.getLogger(__name__).addHandler(logging.NullHandler())
