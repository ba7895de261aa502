"""The round engine: the planning of a round and the merge that makes θ_{t+1}, as pure functions.

The guide daemon (:mod:`cloud.daemon`), ``edgezo demo`` and the convergence study (``bench/convergence.py``)
all run their rounds through these two functions; they differ only in transport (TCP + SQLite, or in-process).

Round v2 (DESIGN.md, "Federated round"):

1. The cloud leads: before the round it may take AdamW steps on public data from θ_t; the round then starts
   from θ'_t = θ_t + cloud_weight·(θ_cloud − θ_t) (``guidance.theta`` is θ_cloud; cloud_weight is 1 here, the
   cloud's steps are taken or not, and ``round_steps = 0`` gives θ'_t = θ_t).
2. The cloud sends θ'_t and its guidance (a subspace basis U, or Guided-ES Q / g_B).
3. Each selected edge runs τ local ZO steps from θ'_t and uploads (seed, g) records.
4. Merge: θ_{t+1} = θ'_t + edge_weight · Σ_i w_i Δ_i, with Δ_i the exact replay of client i's records
   (:func:`cloud.aggregate.client_delta`) and w_i ∝ example counts, summing to 1.

Both weights are in the stored round plan, so any θ_{t+1} can be recomputed from the plan and the uploads.
This module is torch-free and I/O-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cloud.aggregate import (
    RoundPlan,
    Upload,
    UploadRefused,
    aggregate,
    aggregate_move,
    lam_from_plan,
    lam_to_plan,
    validate_upload,
)
from cloud.config import TrainConfig, WireConfig
from cloud.guidance import Guidance
from protocol import codecs
from protocol.errors import SchemaError
from protocol.messages import Guidance as WireGuidance
from protocol.messages import Hyper, RoundStart, ThetaReplay, Update, theta_digest
from protocol.spec import AdapterSpec
from protocol.zo import Guide, Schedule


def compress_guidance(guide: Guide, codec=None) -> tuple[WireGuidance, Guide]:
    """(wire form, decoded guide): edges and the replay both use the decoded bits, so replay stays exact.
    ``codec``: (basis, gradient) codecs, guide.toml ``[wire]`` (cloud.config.WireConfig.codec); None: its default."""
    wire = WireGuidance.from_guide(guide, *(WireConfig().codec() if codec is None else codec))
    return wire, wire.to_guide()


def round_schedule(train: TrainConfig, total_rounds: int) -> Schedule:
    """The lr/ε schedule every round of a run shares (t = round · τ + local step)."""
    return Schedule(lr=train.lr, eps=train.eps, momentum=train.momentum, decay=train.decay,
                    total_steps=max(0, total_rounds) * train.local_steps)


def plan_round(*, round_id: int, theta: np.ndarray, guidance: Guidance | None, guide: Guide | None,
               basis_id: str, train: TrainConfig, total_rounds: int) -> RoundPlan:
    """The frozen inputs of one round: where it starts, the decoded guide the edges use, the schedule, λ.

    ``theta`` is θ_t; ``guidance.theta`` (when the cloud leads) is where the round starts instead. ``guide`` is
    the guidance exactly as the edges will decode it (compressed once by the caller), or None for plain MeZO.
    """
    start = theta if guidance is None or guidance.theta is None else guidance.theta
    if guide is not None and guide.subspace:
        lam = 0.0  # a subspace step has no rectification term
    elif guide is not None and guide.grad is not None:
        lam = lam_to_plan(train.lam)
    else:
        lam = 0.0
    return RoundPlan(round_id=round_id, basis_id=basis_id, theta=np.array(start, np.float32, copy=True),
                     guide=guide, schedule=round_schedule(train, total_rounds), lam=lam,
                     local_steps=train.local_steps, first_step=round_id * train.local_steps,
                     edge_weight=train.edge_weight)


def round_seed_pool(plan: RoundPlan, seed_pool: int) -> int:
    """The seed pool the round's edges draw from: ``seed_pool`` for a full-space round (MeZO or guided kind, whose
    merge then generates at most that many directions per span, cloud.aggregate.seed_pool_delta), 0 for a
    subspace round (merged in c-space whatever its seeds)."""
    return 0 if plan.guide is not None and plan.guide.subspace else int(seed_pool)


def round_start(plan: RoundPlan, *, spec: AdapterSpec, train: TrainConfig, guidance: WireGuidance | None,
                deadline: float, by_ref: bool = False, theta: ThetaReplay | None = None,
                base_round: int = -1) -> RoundStart:
    """The RoundStart every transport sends for ``plan``: the plan's θ (the edge must start from it bit for bit,
    checked by its digest) dense fp32, or as ``theta``, the moves from the θ of ``base_round`` the edge holds
    (cloud.theta_wire.choose_theta); the guidance as compressed once (``guidance``; ``by_ref``: named by id only,
    for a client that prefetched it), λ, the schedule and the [train] settings the edge runs."""
    return RoundStart(
        round_id=plan.round_id, spec=spec, base_round=base_round if theta is not None else -1,
        theta=codecs.encode(plan.theta, "fp32") if theta is None else theta,
        theta_digest=theta_digest(plan.theta), guidance=None if by_ref else guidance,
        guidance_id=guidance.guide_id if guidance is not None else "", lam=lam_from_plan(plan.lam),
        hyper=Hyper(schedule=plan.schedule, q=train.q, local_steps=plan.local_steps, batch_size=train.batch,
                    first_step=plan.first_step, split_layer=train.split_layer, p1=train.p1, p2=train.p2,
                    seed_pool=round_seed_pool(plan, train.seed_pool)),
        deadline=deadline)


def upload_of(plan: RoundPlan, client: str, msg: Update, *, example_cap: int) -> Upload:
    """The Upload the guide keeps for ``msg``: its example count capped by the server (``example_cap``, from
    ``[rounds] max_examples`` or local steps × batch), never the client's word alone."""
    return Upload(client=client, round_id=msg.round_id, basis_id=msg.guide_id, steps=msg.steps,
                  examples=min(int(msg.n_examples), example_cap), loss_before=msg.loss.max,
                  loss_after=msg.loss.last, meta={"first_step": msg.first_step})


def accept_update(plan: RoundPlan, client: str, msg: Update, *, d: int, example_cap: int) -> Upload:
    """``msg`` as an Upload that :func:`merge` can replay, or UploadRefused saying why not (spans outside θ, wrong
    round, basis or first step, malformed records). Every transport (TCP daemon, Flower) runs this one check;
    who ``client`` is, is the transport's to establish (an authenticated connection, a Flower node id)."""
    try:
        msg.check_spans(d)
    except SchemaError as e:
        raise UploadRefused(str(e)) from None
    up = upload_of(plan, client, msg, example_cap=example_cap)
    validate_upload(plan, up)
    if msg.first_step != plan.first_step:
        raise UploadRefused(f"upload starts at step {msg.first_step}, round starts at {plan.first_step}")
    return up


def merge(plan: RoundPlan, uploads: Sequence[Upload]) -> np.ndarray:
    """θ_{t+1} = θ'_t + edge_weight·Σ w_i Δ_i over the accepted uploads (see the module docstring)."""
    return aggregate(plan, uploads)


def merge_move(plan: RoundPlan, uploads: Sequence[Upload]) -> tuple[np.ndarray, np.ndarray | None]:
    """(:func:`merge`'s θ_{t+1}, the subspace round's c-space move or None), from one c-space merge: the move lets
    an edge holding θ'_t and U rebuild θ_{t+1} from k numbers (cloud.theta_wire)."""
    return aggregate_move(plan, uploads)


def simulate_round(plan: RoundPlan, trainers: Mapping[str, Any], *, q: int, batch: int,
                   seed_base: int = 0, seed_pool: int = 0) -> tuple[list[Upload], np.ndarray]:
    """One round in process (demo, study): every trainer runs the plan, uploads are validated, then merged.

    ``trainers`` map client names to objects with the edge client's ``train_round`` (edge.client.LocalTrainer);
    the daemon's TCP path hands the same arguments to the same method and merges with the same function.
    ``seed_pool``: FedKSeed's shared seeds for a full-space round (:func:`round_seed_pool`; 0: fresh seeds).
    """
    uploads = []
    lam = lam_from_plan(plan.lam)
    for name in sorted(trainers):
        res = trainers[name].train_round(theta=plan.theta, guide=plan.guide, schedule=plan.schedule, lam=lam,
                                         local_steps=plan.local_steps, first_step=plan.first_step,
                                         hyper={"q": q, "batch": batch, "seed_base": seed_base,
                                                "seed_pool": round_seed_pool(plan, seed_pool)})
        up = Upload(client=name, round_id=plan.round_id, basis_id=plan.basis_id, steps=res.steps,
                    examples=res.examples, loss_before=res.loss_before, loss_after=res.loss_after)
        validate_upload(plan, up)
        uploads.append(up)
    return uploads, merge(plan, uploads)
