"""The guide daemon's downlink: what a client is sent when it asks for a round or prefetches guidance.

A mixin of :class:`cloud.daemon.GuideServer` (it uses the server's plan, config, store, log and byte counters).
Each RoundStart variant is encoded once per round: θ dense or as the moves since the θ the client holds
(:mod:`cloud.theta_wire`), and the guidance in full or named by id for clients that prefetched it. Torch-free.
"""

from __future__ import annotations

import asyncio

import numpy as np

from cloud.aggregate import RoundPlan
from cloud.engine import compress_guidance, round_start
from cloud.guidance import Guidance
from cloud.theta_wire import WireStart, choose_theta, field_bytes, wire_start
from protocol.messages import (
    Bye,
    GuidanceNext,
    GuidanceRequest,
    Message,
    ReplayRound,
    RoundRequest,
    Status,
    encode,
)
from protocol.messages import Guidance as WireGuidance


class DownlinkMixin:
    """RoundStart / GuidanceNext frames and the long poll of clients waiting for a round."""

    async def _wire_for(self, round_id: int, g: Guidance) -> WireGuidance:
        """Round ``round_id``'s guidance compressed once ([wire]): the same bits go to prefetching clients and into
        RoundStart, so a prefetched guide_id matches the round's. The compression (k × d values; a py-spy trace
        showed it holding the event loop ~0.15 s per round at k = 4 on SmolLM2) runs on a worker thread, so
        connections are served meanwhile; concurrent callers share it."""
        if round_id not in self._wire_cache:
            codec = self.cfg.wire.codec()
            self._wire_cache[round_id] = asyncio.get_running_loop().run_in_executor(
                None, lambda: compress_guidance(g.guide, codec)[0])
            for old in [r for r in self._wire_cache if r < round_id - 1]:
                del self._wire_cache[old]
        return await asyncio.shield(self._wire_cache[round_id])  # one waiter cancelled must not cancel the rest

    async def _wire_start(self, plan: RoundPlan) -> WireStart:
        """Round ``plan.round_id``'s θ as the edges get it (cloud.theta_wire.wire_start), from the previous round's
        plan and c-space move (in memory, or read back from the state dir after a restart)."""
        rid = plan.round_id
        last = self._last
        if last is None or last[0].round_id != rid - 1:
            last = await self._db(self._load_last, rid - 1)
        prev, move = last if last is not None else (None, None)
        codec = self.cfg.wire.theta_codec()
        # a seeded stream per round: a stochastic-rounding codec stays reproducible (the default one is not)
        rng = np.random.default_rng([self.cfg.rounds.sample_seed, rid, 7])
        return await asyncio.get_running_loop().run_in_executor(None, lambda: wire_start(
            plan.theta, prev_round=rid - 1, prev_theta=None if prev is None else prev.theta,
            prev_guide=None if prev is None else prev.guide, prev_guide_id="" if prev is None else prev.basis_id,
            prev_move=move, codec=codec, rng=rng))

    def _load_last(self, rid: int) -> tuple[RoundPlan, np.ndarray | None] | None:
        """Round ``rid``'s plan and its merge's c-space move from the state dir (None: no such round)."""
        if rid < 0 or self.store.load_wire(rid) is None:
            return None
        return self.store.load_plan(rid), self.store.load_move(rid + 1)

    def _history_of(self, rid: int) -> tuple[str, ReplayRound | None] | None:
        """(θ digest, move) of round ``rid`` (cached; read from its plan file once)."""
        if rid not in self._history:
            self._history[rid] = self.store.load_wire(rid)
            for old in [r for r in self._history if r < self.round_id - 64]:
                del self._history[old]
        return self._history[rid]

    def _round_wire_guidance(self) -> WireGuidance | None:
        p = self.plan
        if self._wire_guidance is None and p.guide is not None:  # resumed round: the decoded guide exactly (fp32)
            self._wire_guidance = WireGuidance.from_guide(p.guide, "fp32", "fp32")
        return self._wire_guidance

    def _round_msg(self, by_ref: bool = False, req: RoundRequest | None = None) -> bytes:
        """The round's RoundStart as an encoded frame, built once per round and variant (θ and Q are big).
        ``by_ref``: the guidance named by id only, for clients that hold it (prefetched). ``req``: what the client
        holds (θ of its last round, guidance ids): θ goes as the moves since then when it can rebuild θ exactly
        from them and they are smaller, else dense."""
        p = self.plan
        base, moves = -1, None
        if req is not None:
            base, moves = choose_theta(round_id=p.round_id, theta=p.theta, base_round=req.last_round,
                                       base_digest=req.theta_digest, held=set(req.guide_ids), history=self._history_of)
        key = (by_ref, base)
        if key not in self._round_frames:
            wire_g = self._round_wire_guidance()
            msg = round_start(p, spec=self.spec, train=self.cfg.train.at_round(p.round_id), guidance=wire_g,
                              deadline=self.deadline, by_ref=by_ref, theta=moves, base_round=base)
            self._round_frames[key] = encode(msg)
            g_bytes = 0 if wire_g is None or by_ref else wire_g.basis.nbytes + (wire_g.grad.nbytes if wire_g.grad else 0)
            t_bytes = field_bytes(msg.theta)
            self.log("round_frame", round=p.round_id, bytes=len(self._round_frames[key]), by_ref=by_ref,
                     guidance_bytes=g_bytes, theta_form="dense" if moves is None else "replay", base_round=base,
                     theta_bytes=t_bytes)
        self.bytes["theta_dense" if base < 0 else "theta_replay"] += 1
        return self._round_frames[key]

    def _wait_msg(self) -> Status:
        return Status(round_id=self.round_id, phase="wait", d=self.spec.d, extra={"retry_s": 0.0})

    async def _on_guidance_request(self, msg: GuidanceRequest) -> GuidanceNext | bytes:
        """Round ``msg.round_id``'s guidance as soon as it is built (long poll), for clients to prefetch while
        they train; ``ready=False`` when it is not built within the poll window or is not the next round's."""
        rid = msg.round_id
        if not self.cfg.train.at_round(rid).guided:
            return GuidanceNext(round_id=rid, ready=True, guidance=None)
        if self.plan is not None and rid == self.plan.round_id:
            wire = self._round_wire_guidance()
        elif rid == self._next_round and self._next is not None:
            try:
                g = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._next)),
                                           self.cfg.server.long_poll_s)
            except asyncio.TimeoutError:
                return GuidanceNext(round_id=rid, ready=False)
            wire = await self._wire_for(rid, g)
        else:
            return GuidanceNext(round_id=rid, ready=False)
        key = (rid, wire.guide_id)
        if key not in self._prefetch_frames:  # encoded once per round: every client gets the same bytes
            self._prefetch_frames = {key: encode(GuidanceNext(round_id=rid, ready=True, guidance=wire))}
        frame = self._prefetch_frames[key]
        self.bytes["prefetches"] += 1
        self.bytes["down"] += len(frame)
        return frame

    async def _on_round_request(self, client: str, msg: RoundRequest | None = None) -> Message | bytes:
        """RoundStart when ``client`` is selected in the open round; else long-poll for the next one.
        Clients that list the round's guide_id get the RoundStart without the guidance arrays."""
        held = set(msg.guide_ids) if msg is not None else set()
        if self.finished:
            return Bye(reason="done")
        if self.plan is not None and not self.closing and client in self.selected and client not in self.uploaded:
            return self._send_round(held, msg)
        old = self.waiting.pop(client, None)
        if old is not None and not old.done():
            old.set_result("wait")
        fut = asyncio.get_running_loop().create_future()
        self.waiting[client] = fut
        self._waiting_changed.set()
        try:
            res = await asyncio.wait_for(asyncio.shield(fut), self.cfg.server.long_poll_s)
        except asyncio.TimeoutError:
            res = "wait"
        finally:
            if self.waiting.get(client) is fut:
                del self.waiting[client]
        if res == "round":
            return self._send_round(held, msg)
        return Bye(reason="done") if res == "done" else self._wait_msg()

    def _send_round(self, held: set[str] = frozenset(), req: RoundRequest | None = None) -> bytes:
        wire_g = self._round_wire_guidance() if self.plan is not None else None
        frame = self._round_msg(by_ref=wire_g is not None and wire_g.guide_id in held, req=req)
        self.bytes["down"] += len(frame)
        self.bytes["round_starts"] += 1
        return frame
