"""Local training for one round: N ZO steps from the round's θ under its guidance, as (seed, g) records.

:class:`LocalTrainer` is what the network client (:mod:`edge.client`), the in-process simulation
(``cloud.engine.simulate_round`` via ``app``) and the Flower-style callers need from an edge; two implement it:
:class:`EdgeTrainerAdapter` (llama.cpp, :class:`edge.train.Trainer`) and :class:`FunctionTrainer` (any forward-only
loss function, for tests and tiny models). Never imports torch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge.zo import ZOConfig, step_seeds, zo_measure
from protocol.codecs import EncodedArray
from protocol.errors import ProtocolError
from protocol.messages import LossStats, RoundStart, Update, theta_digest
from protocol.zo import Guide, Lambda, Schedule, StepRecord, SubspaceState, apply_step


def client_seed(client_id: str) -> int:
    """A stable per-client seed (so clients draw different perturbations)."""
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "little") >> 1


@dataclass
class RoundResult:
    steps: list[StepRecord]
    examples: int
    loss_before: float
    loss_after: float
    theta: np.ndarray  # the θ this client reached (the guide reconstructs it from ``steps``)
    forward_passes: int = 0


class LocalTrainer(Protocol):
    """What the client needs from a trainer: N local ZO steps from θ under one round's guidance."""

    def train_round(self, *, theta: np.ndarray, guide: Guide | None, schedule: Schedule, lam: Lambda,
                    local_steps: int, first_step: int, hyper: dict) -> RoundResult: ...


class FunctionTrainer:
    """Local ZO steps on any forward-only loss ``loss_fn(theta, step) -> float`` (the mini-batch of ``step``).

    Uses the edge's estimator (:func:`edge.zo.zo_measure`) and :func:`protocol.zo.apply_step`, so the guide's
    replay is exact. ``examples_per_step`` is the batch size the loss evaluates.
    """

    def __init__(self, *, loss_fn: Callable[[np.ndarray, int], float], examples_per_step: int, seed: int,
                 q: int = 1) -> None:
        if examples_per_step < 1 or q < 1:
            raise ValueError("examples_per_step and q must be >= 1")
        self.loss_fn, self.examples_per_step, self.seed, self.q = loss_fn, examples_per_step, seed, q

    def train_round(self, *, theta: np.ndarray, guide: Guide | None, schedule: Schedule, lam: Lambda,
                    local_steps: int, first_step: int, hyper: dict) -> RoundResult:
        q = int(hyper.get("q", self.q))
        pool = int(hyper.get("seed_pool") or 0)  # FedKSeed: seeds from the round's shared pool (base: first_step)
        th = np.array(theta, np.float32, copy=True)
        vel = np.zeros_like(th) if schedule.momentum else None
        sub = SubspaceState(th, guide) if guide is not None and guide.subspace else None
        steps, losses = [], []
        for i in range(local_steps):
            t = first_step + i
            seeds = step_seeds(self.seed, t, q, pool, first_step)
            rec, info = zo_measure(lambda x, t=t: self.loss_fn(x, t), th, schedule.eps_at(t), seeds,
                                   ZOConfig(q=q, lam=0.0 if sub is not None else lam), guide)
            if sub is not None:
                sub.apply(rec, t, schedule)
                th = sub.theta()
            else:
                apply_step(th, vel, rec, t, schedule, guide)
            steps.append(rec)
            losses.append(info.loss)
        return RoundResult(steps=steps, examples=local_steps * self.examples_per_step,
                           loss_before=float(losses[0]), loss_after=float(losses[-1]), theta=th,
                           forward_passes=2 * q * local_steps)


class EdgeTrainerAdapter:
    """Drives an :class:`edge.train.Trainer` (llama.cpp) for one round: θ_t, the round's schedule and step in,
    ``run_local_steps`` out. Momentum restarts at zero each round, as the guide's replay assumes."""

    def __init__(self, *, trainer: Any) -> None:
        self.trainer = trainer

    def train_round(self, *, theta: np.ndarray, guide: Guide | None, schedule: Schedule, lam: Lambda,
                    local_steps: int, first_step: int, hyper: dict) -> RoundResult:
        tr = self.trainer
        tr.begin_round(theta, schedule, first_step, hyper)
        before = sum(tr.passes.values())
        losses: list[float] = []
        steps = []
        for _ in range(local_steps):
            rec, info = tr.train_step(guide, lam)
            steps.append(rec)
            losses.append(info.loss)
        passes = sum(tr.passes.values()) - before  # decodes llama.cpp ran (full, capture and tail passes)
        return RoundResult(steps=steps, examples=local_steps * tr.batch_size,
                           loss_before=float(losses[0]), loss_after=float(losses[-1]),
                           theta=tr.theta.copy(), forward_passes=passes)


# ---- one round from a RoundStart to an Update: what every transport (TCP client, Flower ClientApp) runs ----------
GUIDES_HELD = 2  # decoded guides a client keeps (the current round's and a prefetched next one)


def round_inputs(rs: RoundStart, guides: MutableMapping[str, Guide],
                 held: tuple[int, np.ndarray] | None = None) -> tuple[np.ndarray, Guide | None, str]:
    """(θ_t, decoded guide, guide id) of a RoundStart. θ comes dense, or as the moves since the θ of round
    ``rs.base_round``, which must be ``held`` = (round, θ) (the θ this client's last round started from), with the
    guidance the moves name in ``guides``. θ is checked against the guide's digest; guidance sent by id only must
    be in ``guides`` (prefetched); guidance sent in full is decoded once and kept there by id.
    Raises ProtocolError when the round cannot be run as sent."""
    rid = rs.round_id
    if isinstance(rs.theta, EncodedArray):
        theta = rs.theta.decode().astype(np.float32)
    else:
        if held is None or held[0] != rs.base_round or rs.base_round < 0:
            raise ProtocolError(f"round {rid} sends θ as moves from round {rs.base_round}'s, this client holds "
                                f"round {-1 if held is None else held[0]}'s")
        if not rs.theta_digest:
            raise ProtocolError(f"round {rid} sends θ as moves without the digest to check them")
        try:
            theta = rs.theta.apply(held[1], guides)  # before the new guidance may evict an old one from ``guides``
        except ValueError as e:
            raise ProtocolError(f"round {rid}: {e}") from None
    if rs.theta_digest and theta_digest(theta) != rs.theta_digest:
        raise ProtocolError(f"round {rid}: decoded θ does not match the guide's digest")
    if rs.guidance is None:
        if not rs.guidance_id:
            return theta, None, ""
        if rs.guidance_id not in guides:
            raise ProtocolError(f"round {rid} names guidance {rs.guidance_id!r} this client does not hold")
        return theta, guides[rs.guidance_id], rs.guidance_id
    gid = rs.guidance.guide_id or rs.guidance.digest()
    if gid not in guides:
        guides[gid] = rs.guidance.to_guide()  # the decoded bits: the guide's replay uses exactly these
        while len(guides) > GUIDES_HELD:
            guides.pop(next(iter(guides)))
    return theta, guides[gid], rs.guidance.guide_id


def train_round_start(trainer: LocalTrainer, rs: RoundStart, theta: np.ndarray, guide: Guide | None) -> RoundResult:
    """Run the round ``rs`` describes on ``trainer``: its schedule, λ, local steps, first step and hyper-parameters."""
    h = rs.hyper
    return trainer.train_round(theta=theta, guide=guide, schedule=h.schedule, lam=rs.lam, local_steps=h.local_steps,
                               first_step=h.first_step,
                               hyper={"q": h.q, "batch": h.batch_size, "seed_base": h.seed_base,
                                      "split_layer": h.split_layer, "p1": h.p1, "p2": h.p2,
                                      "seed_pool": h.seed_pool})


def round_update(rs: RoundStart, res: RoundResult, *, client_id: str, guide_id: str, duration_s: float) -> Update:
    """The Update a client sends for round ``rs``: its (seed, g) records, example count and loss statistics."""
    fin = [x for x in (res.loss_before, res.loss_after) if math.isfinite(x)] or [0.0]
    loss = LossStats(mean=float(np.mean(fin)), min=min(fin), max=max(fin), last=fin[-1])
    return Update(round_id=rs.round_id, client_id=client_id, steps=res.steps, first_step=rs.hyper.first_step,
                  n_examples=res.examples, loss=loss, guide_id=guide_id, theta_digest=rs.theta_digest,
                  duration_s=duration_s)
