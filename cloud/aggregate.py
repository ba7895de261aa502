"""Aggregation as pure functions (no I/O, no torch): replay each upload, weight, sum.

Each upload carries the StepRecords of one client's local steps. Replayed with :func:`protocol.zo.replay`
and the exact guide and schedule its round used, they give that client's θ — the same function the edge
ran, so Δ_i is exact. θ_{t+1} = θ_t + Σ w_i Δ_i with w_i ∝ examples. Subspace rounds merge in c-space
(:func:`subspace_move`); full-space rounds whose records share seeds (a FedKSeed pool) merge by seed
(:func:`seed_pool_delta`), one direction per distinct (seed, span) instead of one per record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from protocol.constants import LAMBDA_ONLINE
from protocol.zo import (
    Guide,
    Lambda,
    Schedule,
    StepRecord,
    SubspaceState,
    direction,
    replay,
    subspace_theta,
)

# A plan keeps λ as one float (plan-N.npz stores it in JSON): the fixed λ in [0, 1], or PLAN_LAM_ONLINE for
# LAMBDA_ONLINE (each edge step estimates and records its own λ*; protocol.zo.Lambda).
PLAN_LAM_ONLINE = -1.0


def lam_to_plan(lam: Lambda) -> float:
    """λ as a plan stores it (:data:`PLAN_LAM_ONLINE` for LAMBDA_ONLINE)."""
    return PLAN_LAM_ONLINE if lam == LAMBDA_ONLINE else float(lam)


def lam_from_plan(lam: float) -> Lambda:
    """The λ a plan's float stands for: what RoundStart.lam and the edges' train_round receive."""
    return LAMBDA_ONLINE if lam == PLAN_LAM_ONLINE else lam


@dataclass(frozen=True)
class RoundPlan:
    """What one round's clients were told: the frozen inputs of replay."""

    round_id: int
    basis_id: str  # guide_id (digest of the decoded Q, g_B, α) the round used; "" without guidance
    theta: np.ndarray  # θ_t (d,)
    guide: Guide | None
    schedule: Schedule
    lam: float  # λ of the round; PLAN_LAM_ONLINE: each step's own (lam_to_plan / lam_from_plan)
    local_steps: int
    first_step: int = 0  # global step index of this round's first local step (schedule position)
    # θ_{t+1} = θ + edge_weight·Σ w_i Δ_i (cloud.engine.merge); 1 is plain federated averaging of the edges.
    edge_weight: float = 1.0
    # What a compressed θ left out of the round's start (θ'_t − θ, [wire] theta = "adaptive"; None: θ is θ'_t
    # exactly). The merge adds it back (error feedback): the guide's θ_{t+1} keeps it, the next delta carries it.
    carry: np.ndarray | None = None


@dataclass
class Upload:
    """One client's contribution to a round."""

    client: str
    round_id: int
    basis_id: str
    steps: list[StepRecord]
    examples: int
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    meta: dict = field(default_factory=dict)


class UploadRefused(ValueError):
    """An upload that does not belong to the round it claims (wrong round, basis, or malformed)."""


def validate_upload(plan: RoundPlan, up: Upload, *, max_perturbations: int = 1 << 16) -> None:
    """Raise UploadRefused unless ``up`` can be replayed against ``plan``."""
    if up.round_id != plan.round_id:
        raise UploadRefused(f"upload for round {up.round_id}, current round is {plan.round_id}")
    if up.basis_id != plan.basis_id:
        raise UploadRefused(f"upload used basis {up.basis_id!r}, round {plan.round_id} uses {plan.basis_id!r}")
    if up.examples <= 0:
        raise UploadRefused(f"example count must be positive, got {up.examples}")
    if not 0 < len(up.steps) <= max(plan.local_steps, 1):
        raise UploadRefused(f"{len(up.steps)} steps uploaded, round allows 1..{plan.local_steps}")
    d = int(plan.theta.shape[0])
    total = 0
    for st in up.steps:
        if st.lam and (plan.guide is None or plan.guide.grad is None):
            raise UploadRefused("step uses λ > 0 but the round sent no cloud gradient")
        if not 0.0 <= st.lam <= 1.0:
            raise UploadRefused(f"λ must be in [0, 1], got {st.lam}")
        if plan.lam != PLAN_LAM_ONLINE and st.lam != plan.lam and not st.is_rejected and not (st.lam == 0.0 and (
                plan.guide is None or plan.guide.grad is None)):
            # λ is the plan's (an "online" plan lets each step report its own estimate)
            raise UploadRefused(f"step uses λ = {st.lam}, round {plan.round_id} fixed λ = {plan.lam}")
        for g in st.groups:
            stop = d if g.stop < 0 else g.stop
            if not 0 <= g.start < stop <= d:
                raise UploadRefused(f"group span [{g.start}, {g.stop}) outside θ of size {d}")
            if not np.isfinite(g.grads).all():
                raise UploadRefused("non-finite projected gradient")
            total += g.seeds.size
    if total > max_perturbations:
        raise UploadRefused(f"{total} perturbations exceed the limit {max_perturbations}")


def client_delta(plan: RoundPlan, up: Upload) -> np.ndarray:
    """Δ_i = replay(θ_t, steps) − θ_t (float64), exactly what the client's θ moved by."""
    theta_i = replay(plan.theta, up.steps, plan.schedule, plan.guide, first_step=plan.first_step)
    return theta_i.astype(np.float64) - plan.theta.astype(np.float64)  # exact: θ_t + Δ_i == θ_i


def client_c(plan: RoundPlan, up: Upload) -> np.ndarray:
    """A subspace round's client move in c-space: the (k,) float64 c its records reach (θ_i = θ_t + U·c_i)."""
    state = SubspaceState(plan.theta, plan.guide)
    for i, st in enumerate(up.steps):
        state.apply(st, plan.first_step + i, plan.schedule)
    return state.c


def weights(uploads: Sequence[Upload]) -> np.ndarray:
    """w_i ∝ examples_i, summing to 1."""
    n = np.array([u.examples for u in uploads], np.float64)
    return n / n.sum() if n.size else n


def subspace_move(plan: RoundPlan, uploads: Sequence[Upload]) -> np.ndarray | None:
    """A subspace round's merged move in c-space, edge_weight·Σ w_i c_i (k float64), or None when the round's
    guide is not a subspace. θ_{t+1} = subspace_theta(θ_t, U, move) (+ the plan's carry): the k numbers that
    let an edge holding θ_t and U rebuild θ_{t+1} bit for bit (protocol.payloads.ReplayRound, form "c")."""
    if plan.guide is None or not plan.guide.subspace:
        return None
    # Every Δ_i lies in span(U): merge in c-space, k numbers per client, and build θ once, column by column in
    # float64 as the edge builds its own θ (one client with weight 1 reaches exactly the θ it trained to).
    # 10,000 clients cost 10,000 k-dim replays, not 10,000 d-dim ones (bench/merge_scale.py).
    c = np.zeros(plan.guide.k, np.float64)
    ups = sorted(uploads, key=lambda u: u.client)
    for w, up in zip(weights(ups), ups, strict=False):
        c += w * client_c(plan, up)
    return plan.edge_weight * c


def _span(d: int, start: int, stop: int) -> tuple[int, int]:
    return start, d if stop < 0 else stop


def has_repeated_seeds(uploads: Sequence[Upload], d: int) -> bool:
    """Whether some (seed, span) appears in more than one record of the round (a FedKSeed seed pool)."""
    keys: set[tuple[int, int, int]] = set()
    n = 0
    for up in uploads:
        for st in up.steps:
            for g in st.groups:
                span = _span(d, g.start, g.stop)
                keys.update((s, *span) for s in g.seeds.tolist())
                n += g.seeds.size
    return len(keys) < n


def seed_pool_delta(plan: RoundPlan, uploads: Sequence[Upload]) -> np.ndarray:
    """Σ_i w_i Δ_i (float64, (d,)) of a full-space round, generating each (seed, span) direction once.

    Why: replay generates one d-dimensional direction per (seed, g) record (~3.5 ms at d = 460,800), so a round
    of 10,000 clients × 5 steps × q = 2 costs minutes; with FedKSeed's shared pool of K seeds (edge.zo.step_seeds)
    the records name at most K directions per span. The move is linear in the directions, so each one's scalar
    coefficient is summed over every client first (float64), then z is generated once:

      u_j = (1−λ_j)·ĝ_j + λ_j·g_B,  ĝ_j = Σ_groups (Σ_r g_r·z_r) / (n_group·gain_span)   (protocol.zo.zo_gradient)
      Δ_i = −Σ_j L_j·u_j,  L_j = Σ_{s=j}^{S−1} lr_{first_step+s}·μ^{s−j}                (v ← μv + u; θ ← θ − lr·v)

    over the S steps client i uploaded (rejected ones included: they advance the schedule and decay v). Equal to
    the per-client replay in exact arithmetic; in floating point within float32 rounding, not bit for bit.
    """
    d = int(plan.theta.shape[0])
    guide, mu = plan.guide, plan.schedule.momentum
    coef: dict[tuple[int, int], dict[int, float]] = {}  # span -> seed -> coefficient of z
    coef_grad = 0.0  # coefficient of g_B
    for w, up in zip(weights(uploads), uploads, strict=False):
        steps = len(up.steps)
        lrs = [plan.schedule.lr_at(plan.first_step + s) for s in range(steps)]
        tail = [0.0] * (steps + 1)  # tail[j] = L_j
        for j in range(steps - 1, -1, -1):
            tail[j] = lrs[j] + mu * tail[j + 1]
        for j, st in enumerate(up.steps):
            lam = float(st.lam)
            if lam and (guide is None or guide.grad is None):
                raise ValueError("step has λ > 0 but the guide carries no cloud gradient")
            scale = -float(w) * tail[j]
            if lam:
                coef_grad += scale * lam
            for g in st.groups:
                if g.seeds.size == 0:
                    continue
                per = coef.setdefault(_span(d, g.start, g.stop), {})
                c = scale * (1.0 - lam) / g.seeds.size
                for seed, gi in zip(g.seeds.tolist(), g.grads.tolist(), strict=True):
                    per[seed] = per.get(seed, 0.0) + c * gi
    out = np.zeros(d, np.float64)
    buf = np.empty(d, np.float64)
    for (start, stop), per in coef.items():
        n = stop - start
        sub = None if guide is None else (guide if (start, stop) == (0, d) else guide.restrict(start, stop))
        gain = 1.0 if sub is None or sub.alpha >= 1.0 else sub.gain  # protocol.zo.to_gradient_units
        acc, tmp = out[start:stop], buf[:n]
        for seed, c in per.items():
            if c:
                np.multiply(direction(int(seed), n, sub), c / gain, out=tmp, dtype=np.float64)
                acc += tmp
    if coef_grad:
        out += coef_grad * guide.grad.astype(np.float64)
    if not np.isfinite(out).all():
        raise FloatingPointError(f"non-finite merged update in round {plan.round_id}")
    return out


def aggregate(plan: RoundPlan, uploads: Sequence[Upload]) -> np.ndarray:
    """θ_{t+1} = θ_t + edge_weight·Σ w_i Δ_i over the accepted uploads (θ_t itself when there are none), plus the
    plan's carry when its θ was compressed.

    Uploads are combined in client-name order so the result does not depend on arrival order.
    """
    return aggregate_move(plan, uploads)[0]


def aggregate_move(plan: RoundPlan, uploads: Sequence[Upload]) -> tuple[np.ndarray, np.ndarray | None]:
    """(θ_{t+1} as :func:`aggregate` makes it, the round's c-space move :func:`subspace_move` or None), computed
    once: the guide keeps the move so that edges can rebuild θ_{t+1} from k numbers."""
    theta = np.array(plan.theta, np.float32, copy=True)
    ups = sorted(uploads, key=lambda u: u.client)
    move = subspace_move(plan, ups)
    if not ups:
        moved = theta
    elif move is not None:
        moved = subspace_theta(theta, plan.guide.basis, move)
    elif has_repeated_seeds(ups, theta.shape[0]):  # a seed pool: each direction generated once
        moved = (theta.astype(np.float64) + plan.edge_weight * seed_pool_delta(plan, ups)).astype(np.float32)
    else:
        acc = np.zeros(theta.shape, np.float64)
        for w, up in zip(weights(ups), ups, strict=False):
            acc += w * client_delta(plan, up)
        moved = (theta.astype(np.float64) + plan.edge_weight * acc).astype(np.float32)
    if plan.carry is not None:
        moved = (moved.astype(np.float64) + plan.carry.astype(np.float64)).astype(np.float32)
    return moved, move
