"""edgezo's round engine as a Flower strategy, and the ``ServerApp`` that ``flwr run`` starts (``edgezo[flower]``).

Flower's deployment runtime (SuperLink, SuperNodes, TLS, node authentication, ``flwr run``) carries the messages;
what a round *is* stays edgezo's: :class:`EdgezoStrategy` plans each round with :func:`cloud.engine.plan_round`
(guidance compressed once, the plan keeps the decoded guide), sends :func:`cloud.engine.round_start` as an encoded
frame inside a Flower ConfigRecord (:mod:`protocol.flower`: msgpack bytes, no pickle), checks each reply with
:func:`cloud.engine.accept_update` and merges with :func:`cloud.engine.merge` — the functions the TCP daemon calls,
so θ_{t+1} is the exact replay of the (seed, g) records it received. Plans, uploads and every θ_t go to the
same :class:`cloud.store.Store` the daemon writes, so ``merge(store.load_plan(t), store.uploads(t))`` recomputes
``store.load_theta(t + 1)`` after a Flower run as after a daemon run.

Who a client is, is Flower's to establish (SuperNode authentication): an upload is kept only from the node its
round was sent to, under the name ``node-<node id>``, and only if the Update names that node.

Run config (``app/flower/pyproject.toml`` ``[tool.flwr.app.config]``, or ``flwr run ... --run-config 'k=v'``):
``guide-config`` (guide.toml path; "" for the defaults), ``dims`` (a model-free guide: static guidance on
"n_layers,hidden,intermediate,heads,kv_heads"), ``state-dir`` and ``log-file`` (override ``[server]``),
``rounds`` (> 0 overrides ``[rounds] rounds``), ``join-timeout-s`` (how long to wait for ``[rounds] min_clients``
SuperNodes), ``poll-s`` (how often replies are pulled from the SuperLink). Paths should be absolute: the ServerApp
runs in a process the SuperLink starts, in the SuperLink's working directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from cloud.aggregate import RoundPlan, Upload, UploadRefused
from cloud.config import GuideConfig
from cloud.engine import accept_update, compress_guidance, merge, plan_round, round_start
from cloud.guide_log import JsonLog
from cloud.store import Store
from protocol.constants import DEFAULT_LIMITS
from protocol.errors import ProtocolError
from protocol.flower import FRAME, METRICS, RECORD, client_name, frame_entry, message_from_entry
from protocol.messages import Update
from protocol.spec import AdapterSpec

DEFAULT_POLL_S = 0.2  # Flower's own send_and_receive pulls every 3 s; a round's replies are waited for more often


class EdgezoStrategy(Strategy):
    """A Flower strategy whose rounds are edgezo's (see the module docstring).

    θ is the strategy's own float32 array; the ``arrays`` Flower passes to :meth:`configure_train` are ignored and
    the ArrayRecord :meth:`aggregate_train` returns is a copy of θ_{t+1} for Flower's ``Result``. ``run`` is the round
    loop ``main`` uses; Flower's ``Strategy.start`` works too (it pulls replies every 3 s).
    """

    def __init__(self, *, config: GuideConfig, spec: AdapterSpec, theta0: np.ndarray, guidance: Any, store: Store,
                 log: Callable[..., None], join_timeout_s: float = 120.0, poll_s: float = DEFAULT_POLL_S) -> None:
        if np.asarray(theta0).shape != (spec.d,):
            raise ValueError(f"θ0 has shape {np.asarray(theta0).shape}, spec has d={spec.d}")
        self.cfg, self.spec, self.guidance, self.store, self.log = config, spec, guidance, store, log
        self.theta = np.array(theta0, np.float32, copy=True)
        self.join_timeout_s, self.poll_s = float(join_timeout_s), float(poll_s)
        self.limits = dataclasses.replace(DEFAULT_LIMITS, max_frame=config.server.max_frame)
        self.plan: RoundPlan | None = None
        self.selected: dict[int, str] = {}  # node id → client name, of the open round
        self.history: list[dict] = []  # per round: timings, bytes, uploads (what round_closed logs)
        self._open: dict[str, Any] = {}

    # ---- Flower's Strategy interface -------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Round ``server_round - 1``: guidance at θ_t, the plan (stored before anyone hears of it), the sample of
        connected nodes, and one Flower message per selected node carrying the encoded RoundStart."""
        rid = server_round - 1
        rc, tc = self.cfg.rounds, self.cfg.train.at_round(rid)
        t0 = time.time()
        nodes = self._wait_for_nodes(grid)
        g = self.guidance.submit(self.theta, rid).result() if tc.guided else None
        # Compress once; the plan keeps the DECODED guide, so the edges and the replay use the same bits.
        wire_g = compress_guidance(g.guide, self.cfg.wire.codec())[0] if tc.guided else None
        guide = wire_g.to_guide() if wire_g is not None else None
        plan = plan_round(round_id=rid, theta=self.theta, guidance=g, guide=guide,
                          basis_id=wire_g.guide_id if wire_g is not None else "", train=tc, total_rounds=rc.rounds)
        rng = np.random.default_rng([rc.sample_seed, rid])  # the daemon's sampling rule, over the sorted node ids
        chosen = sorted(nodes[i] for i in rng.choice(len(nodes), size=min(rc.max_clients, len(nodes)), replace=False))
        deadline = time.time() + rc.deadline_s
        self.selected = {n: client_name(n) for n in chosen}
        self.store.open_round(plan, selected=sorted(self.selected.values()), deadline=deadline)
        self.plan = plan
        entry = frame_entry(round_start(plan, spec=self.spec, train=tc, guidance=wire_g, deadline=deadline),
                            limits=self.limits)
        down = len(entry[FRAME])
        self._open = {"t0": t0, "sent": time.time(), "down_bytes": down * len(chosen)}
        self.log("round_open", round=rid, selected=sorted(self.selected.values()), nodes=len(nodes),
                 basis=plan.basis_id, kind=tc.kind if tc.guided else "none", round_start_bytes=down,
                 cloud_step_norm=float(np.linalg.norm(plan.theta - self.theta)), transport="flower",
                 **({"cloud": g.info} if g is not None and g.info else {}))
        # ttl = the deadline: a message no node picked up in time expires at the SuperLink instead of running late
        return [Message(RecordDict({RECORD: ConfigRecord(dict(entry))}), dst_node_id=n,
                        message_type=MessageType.TRAIN, group_id=str(rid), ttl=rc.deadline_s) for n in chosen]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each selected node's first valid Update, store the accepted ones, merge: θ_{t+1}."""
        plan = self.plan
        if plan is None or plan.round_id != server_round - 1:
            raise RuntimeError(f"round {server_round - 1} was not configured by this strategy")
        received = time.time()
        cap = self.cfg.rounds.max_examples or plan.local_steps * self.cfg.train.batch
        uploads: dict[str, Upload] = {}
        refused, up_bytes, client_s = 0, 0, []
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            client = self.selected.get(node)
            try:
                if client is None:
                    raise UploadRefused(f"node {node} is not in round {plan.round_id}")
                if client in uploads:
                    raise UploadRefused(f"{client} already uploaded for round {plan.round_id}")
                if reply.has_error():
                    raise UploadRefused(f"the ClientApp failed: {reply.error.reason}")
                entry = reply.content.config_records.get(RECORD)
                msg = message_from_entry(entry, Update, limits=self.limits)
                if msg.client_id != client:
                    raise UploadRefused(f"update names client {msg.client_id!r}, it came from {client!r}")
                up = accept_update(plan, client, msg, d=self.spec.d, example_cap=cap)
            except (UploadRefused, ProtocolError) as e:
                refused += 1
                self.log("upload_refused", round=plan.round_id, node=node, reason=str(e)[:500])
                continue
            uploads[client] = up
            up_bytes += len(entry[FRAME])
            m = reply.content.metric_records.get(METRICS)  # the device's own timings: logged, never trusted
            if m is not None:
                client_s.append({k: round(float(m[k]), 3) for k in ("load_s", "train_s") if k in m})
            self.log("upload", round=plan.round_id, client=client, steps=len(up.steps), examples=up.examples,
                     loss_after=up.loss_after, bytes=len(entry[FRAME]))
        accepted = [uploads[c] for c in sorted(uploads)]
        self.store.commit_uploads(accepted)  # the records are durable before θ_{t+1} is
        t_merge = time.perf_counter()
        theta_next = merge(plan, accepted)
        merge_s = time.perf_counter() - t_merge
        losses = [u.loss_after for u in accepted if math.isfinite(u.loss_after)]
        client_loss = float(np.mean(losses)) if losses else None
        self.store.close_round(plan.round_id, theta_next, n_uploads=len(accepted), public_loss=None,
                               client_loss=client_loss, down_bytes=self._open["down_bytes"], up_bytes=up_bytes)
        done = time.time()
        rec = {"round": plan.round_id, "selected": len(self.selected), "uploads": len(accepted), "refused": refused,
               "round_s": round(done - self._open["t0"], 3), "exchange_s": round(received - self._open["sent"], 3),
               "merge_s": round(merge_s, 4), "client_s": client_s,
               "down_bytes": self._open["down_bytes"], "up_bytes": up_bytes}
        self.history.append(rec)
        self.log("round_closed", **rec, client_loss=client_loss, transport="flower",
                 delta_norm=float(np.linalg.norm(theta_next - plan.theta)))
        self.theta, self.plan, self.selected = theta_next, None, {}
        metrics = {"uploads": len(accepted), "refused": refused, "round_s": rec["round_s"]}
        if client_loss is not None:
            metrics["client_loss"] = client_loss
        return ArrayRecord([theta_next.copy()]), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation round: the cloud evaluates on its public data, each device on its own."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None

    def summary(self) -> None:
        """Log the round settings (Flower calls this when a run starts)."""
        rc, tc = self.cfg.rounds, self.cfg.train
        self.log("strategy", name="edgezo", d=self.spec.d, kind=tc.kind if tc.guided else "none", k=tc.k,
                 local_steps=tc.local_steps, q=tc.q, batch=tc.batch, rounds=rc.rounds, min_clients=rc.min_clients,
                 max_clients=rc.max_clients, deadline_s=rc.deadline_s)

    # ---- the round loop ---------------------------------------------------------------------------
    def run(self, grid: Grid, rounds: int) -> np.ndarray:
        """``rounds`` rounds: configure, exchange (replies pulled every ``poll_s`` until all arrive or the deadline),
        aggregate. Returns θ after the last merge."""
        self.summary()
        for server_round in range(1, rounds + 1):
            msgs = list(self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))
            replies = exchange(grid, msgs, timeout=self.cfg.rounds.deadline_s, poll_s=self.poll_s)
            self.aggregate_train(server_round, replies)
        return self.theta

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected node ids once ``[rounds] min_clients`` are there (and, after ``join_window_s``, any more up
        to ``max_clients``); RuntimeError after ``join_timeout_s`` without enough of them."""
        rc = self.cfg.rounds
        end = time.monotonic() + self.join_timeout_s
        nodes = sorted(int(n) for n in grid.get_node_ids())
        while len(nodes) < rc.min_clients:
            if time.monotonic() > end:
                raise RuntimeError(f"{len(nodes)} SuperNodes connected after {self.join_timeout_s:.0f} s, "
                                   f"[rounds] min_clients is {rc.min_clients}")
            time.sleep(self.poll_s)
            nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) < rc.max_clients and rc.join_window_s > 0:
            time.sleep(rc.join_window_s)
            nodes = sorted(int(n) for n in grid.get_node_ids())
        return nodes


def exchange(grid: Grid, messages: list[Message], *, timeout: float, poll_s: float) -> list[Message]:
    """Push ``messages`` and pull their replies until all have come or ``timeout`` seconds passed (the round's
    deadline: the missing uploads are merged without, as the daemon does at its deadline)."""
    ids = {i for i in grid.push_messages(messages) if i}
    end = time.monotonic() + timeout
    out: list[Message] = []
    while ids:
        got = list(grid.pull_messages(ids))
        out += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        if not ids or time.monotonic() >= end:
            break
        time.sleep(poll_s)
    return out


def guide_config(run_config: Mapping[str, Any]) -> GuideConfig:
    """The guide.toml a run names (``guide-config``), with the run config's overrides applied."""
    path = str(run_config.get("guide-config", "") or "") or None
    cfg = GuideConfig.load(path)
    rounds = int(run_config.get("rounds", 0) or 0)
    return cfg.override(server={"state_dir": str(run_config.get("state-dir", "") or "") or None,
                                "log_file": str(run_config.get("log-file", "") or "") or None},
                        rounds={"rounds": rounds if rounds > 0 else None})


def serve(grid: Grid, run_config: Mapping[str, Any]) -> np.ndarray:
    """Build the guide a run config describes (cloud.cli.build_source: the same spec, θ_0 and guidance as
    ``edgezo guide serve``), run its rounds over ``grid``, and return the final θ."""
    from cloud.cli import build_source

    cfg = guide_config(run_config)
    if cfg.rounds.rounds <= 0:
        raise ValueError("a Flower run needs a round count: [rounds] rounds or --run-config 'rounds=N'")
    if cfg.wire.theta != "fp32":  # accepted settings must act: the Flower path has no held-θ moves or deltas yet
        raise ValueError(f"[wire] theta = {cfg.wire.theta!r} is not supported on the Flower path (θ goes dense "
                         "fp32 there); use it with `edgezo guide serve`, or set theta = \"fp32\"")
    log = JsonLog(cfg.server.log_file)
    store = Store(root=cfg.server.state_dir)
    guidance = None
    try:
        if store.last_round_id() >= 0:  # a Flower run starts at round 0; the daemon's resume is not offered here
            raise ValueError(f"state dir {cfg.server.state_dir} already holds rounds: give a fresh state-dir")
        spec, theta0, guidance, events = build_source(cfg, dims=str(run_config.get("dims", "") or "") or None)
        for event, fields in events:
            log(event, **fields)
        store.set_meta("spec", json.dumps(spec.to_dict(), sort_keys=True))
        store.save_theta(0, theta0)
        strategy = EdgezoStrategy(config=cfg, spec=spec, theta0=theta0, guidance=guidance, store=store, log=log,
                                  join_timeout_s=float(run_config.get("join-timeout-s", 120.0)),
                                  poll_s=float(run_config.get("poll-s", DEFAULT_POLL_S)))
        theta = strategy.run(grid, cfg.rounds.rounds)
        log("finished", rounds=cfg.rounds.rounds, transport="flower")
        return theta
    finally:
        if guidance is not None:
            guidance.close()
        store.close()
        log.close()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: the rounds of the guide the run config describes."""
    serve(grid, dict(context.run_config))
