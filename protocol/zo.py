"""Directions from seeds and the zeroth-order update: one implementation for edge and cloud.

The edge applies :func:`apply_step` after measuring its ``(seed, g)`` records; the cloud calls the very
same function in :func:`replay` to reconstruct the edge's θ. Same code, same float32 operations, same
order: replay is exact by construction (DESIGN.md, "Directions from seeds", "Zeroth-order step").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from protocol.constants import LAMBDA_ONLINE

GUIDE_KINDS = ("guided", "subspace")
# Adam in c-space (round v2): k numbers of first and second moment, restarted every round on both sides.
SUBSPACE_BETAS = (0.9, 0.999)
SUBSPACE_ADAM_EPS = 1e-8

# λ, the rectification weight on g_B, as guide.toml ([train] lam), the edge (ZOConfig) and RoundStart.lam carry
# it: a fixed weight in [0, 1], or LAMBDA_ONLINE, where every step estimates its own λ* (:func:`online_lambda`) and
# records it in its StepRecord (whose lam is always the float used). A stored round plan keeps λ as one float,
# −1 for LAMBDA_ONLINE (cloud.aggregate.lam_to_plan / lam_from_plan, the only two conversions).
Lambda = float | Literal["online"]


def check_lambda(lam: object) -> Lambda:
    """``lam`` as a :data:`Lambda`, or ValueError saying what λ may be."""
    if isinstance(lam, str):
        if lam != LAMBDA_ONLINE:
            raise ValueError(f"lam must be a number in [0, 1] or {LAMBDA_ONLINE!r}, got {lam!r}")
        return LAMBDA_ONLINE
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam


@dataclass(frozen=True)
class Guide:
    """Cloud guidance for one round: orthonormal basis Q (d, k), mixing α, optional cloud gradient g_B (d,).

    ``kind`` "guided": Guided-ES directions over all of θ, rectified with g_B (DESIGN.md, first round design).
    ``kind`` "subspace" (round v2): the edge searches only θ = θ_t + Q·c, c ∈ R^k; α and g_B are unused.
    """

    basis: np.ndarray  # (d, k) float32, orthonormal columns
    alpha: float = 0.5
    grad: np.ndarray | None = None  # (d,) float32: g_B, used for rectification
    kind: str = "guided"

    def __post_init__(self) -> None:
        q = np.ascontiguousarray(self.basis, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] < 1 or q.shape[0] < q.shape[1]:
            raise ValueError(f"guide basis must be (d, k) with d >= k >= 1, got {q.shape}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"guide alpha must be in (0, 1], got {self.alpha}")
        if self.kind not in GUIDE_KINDS:
            raise ValueError(f"guide kind must be one of {GUIDE_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "basis", q)
        if self.grad is not None:
            g = np.ascontiguousarray(self.grad, dtype=np.float32)
            if g.shape != (q.shape[0],):
                raise ValueError(f"guide grad has shape {g.shape}, expected ({q.shape[0]},)")
            object.__setattr__(self, "grad", g)

    @property
    def d(self) -> int:
        return int(self.basis.shape[0])

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def gain(self) -> float:
        """How much E[g z] amplifies the subspace part of ∇L: α + (1 − α)·d/k."""
        return self.alpha + (1.0 - self.alpha) * self.d / self.k

    @property
    def subspace(self) -> bool:
        return self.kind == "subspace"

    def restrict(self, start: int, stop: int) -> Guide:
        """The guide for the coordinates [start, stop): the basis rows re-orthonormalised (split schedule)."""
        if self.subspace:
            raise ValueError("a subspace guide cannot be split over layer blocks (use kind 'guided' with a split)")
        q, _ = np.linalg.qr(self.basis[start:stop].astype(np.float64))
        grad = None if self.grad is None else self.grad[start:stop]
        return Guide(q.astype(np.float32), self.alpha, grad)


def orthonormal_basis(vectors: Sequence[np.ndarray], tol: float = 1e-8) -> np.ndarray:
    """Q (d, k') with orthonormal columns spanning ``vectors`` (near-dependent ones dropped)."""
    m = np.stack([np.asarray(v, np.float64) for v in vectors], axis=1)  # (d, n)
    q, r = np.linalg.qr(m)
    keep = np.abs(np.diag(r)) > tol * max(1.0, float(np.abs(r).max(initial=0.0)))
    if not keep.any():
        raise ValueError("cannot build a guide basis from all-zero vectors")
    return np.ascontiguousarray(q[:, keep], dtype=np.float32)


def direction(seed: int, d: int, guide: Guide | None = None) -> np.ndarray:
    """The perturbation z ∈ R^d for ``seed``: N(0, I) or guided, E‖z‖² = d. Deterministic across machines.

    Guided (Guided ES): z = sqrt(α)·z_d + sqrt((1−α)·d/k)·Q·z_k, with z_d then z_k drawn from one stream.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    if guide is not None and guide.subspace:
        if guide.d != d:
            raise ValueError(f"guide is for d={guide.d}, direction asked for d={d}")
        return guide.basis @ subspace_direction(seed, guide.k)  # (d,) = U (d, k) · u (k,)
    z = rng.standard_normal(d, dtype=np.float32)  # (d,)
    if guide is None or guide.alpha >= 1.0:
        return z
    if guide.d != d:
        raise ValueError(f"guide is for d={guide.d}, direction asked for d={d}")
    zk = rng.standard_normal(guide.k, dtype=np.float32)  # (k,)
    z *= np.float32(math.sqrt(guide.alpha))
    z += np.float32(math.sqrt((1.0 - guide.alpha) * d / guide.k)) * (guide.basis @ zk)
    return z


def subspace_direction(seed: int, k: int) -> np.ndarray:
    """u ~ N(0, I_k) for ``seed``: the c-space perturbation of a subspace step (the edge perturbs θ by ε·U·u)."""
    return np.random.Generator(np.random.PCG64(seed)).standard_normal(k, dtype=np.float32)  # (k,)


def to_gradient_units(v: np.ndarray, guide: Guide | None) -> np.ndarray:
    """Divide mean(g·z) by the guide's gain α + (1−α)·d/k (in place, returns v).

    E[g z] = α∇L + (1−α)(d/k)·QQᵀ∇L: after the division the subspace part is an unbiased gradient
    estimate with only k-dimensional noise, and the d-dimensional noise off the subspace shrinks by α/gain.
    The full inverse covariance would instead amplify that off-subspace noise by 1/α and, at d ≈ 5·10⁵, drown
    the cloud gradient it is mixed with (λ would lose its meaning). α = 1 (plain MeZO) is the identity.
    """
    if guide is None or guide.alpha >= 1.0:
        return v
    v *= np.float32(1.0 / guide.gain)
    return v


_U64, _F32 = np.dtype(np.uint64), np.dtype(np.float32)


@dataclass
class Group:
    """The perturbations of one step on one coordinate span [start, stop) of θ: seeds and projected grads."""

    seeds: np.ndarray  # (n,) uint64
    grads: np.ndarray  # (n,) float32, g_i = (L+ − L−) / (2ε)
    start: int = 0
    stop: int = -1  # -1: up to d

    def __post_init__(self) -> None:
        # the fast path (1-d arrays of the right dtype already, as decoded) skips two conversions: a guide builds
        # ~10 Groups per upload and 1,000s of uploads at once
        s, g = self.seeds, self.grads
        if not (type(s) is np.ndarray and s.dtype == _U64 and s.ndim == 1):
            self.seeds = np.asarray(s, dtype=np.uint64).reshape(-1)
        if not (type(g) is np.ndarray and g.dtype == _F32 and g.ndim == 1):
            self.grads = np.asarray(g, dtype=np.float32).reshape(-1)
        if self.seeds.shape != self.grads.shape:
            raise ValueError(f"{self.seeds.size} seeds but {self.grads.size} grads")

    @classmethod
    def checked(cls, seeds: np.ndarray, grads: np.ndarray, start: int, stop: int) -> Group:
        """A Group from arrays the caller has already checked (1-d, uint64 and float32, equal length), without
        ``__post_init__``: the wire decoder checks a whole upload's arrays at once, then slices them per group."""
        g = cls.__new__(cls)
        g.seeds, g.grads, g.start, g.stop = seeds, grads, start, stop
        return g


@dataclass
class StepRecord:
    """Everything needed to replay one local step: its perturbation groups and the λ it used."""

    groups: list[Group] = field(default_factory=list)
    lam: float = 0.0  # rectification weight on g_B (0: none)

    @property
    def n_perturbations(self) -> int:
        return sum(g.seeds.size for g in self.groups)

    @classmethod
    def rejected(cls) -> StepRecord:
        """What an edge records for a step it rejected (a non-finite loss): no perturbation, no λ; a no-op that
        both sides replay, whatever λ the round fixed."""
        return cls(groups=[], lam=0.0)

    @property
    def is_rejected(self) -> bool:
        return self.n_perturbations == 0 and self.lam == 0.0


@dataclass(frozen=True)
class Schedule:
    """Learning-rate and ε schedules as pure functions of the step: both sides compute them."""

    lr: float = 1e-4
    eps: float = 1e-3
    momentum: float = 0.0
    warmup: int = 0
    decay: str = "constant"  # constant | cosine | linear
    total_steps: int = 0  # for cosine/linear decay
    min_ratio: float = 0.1
    eps_decay: float = 0.0  # ε_t = ε / (1 + eps_decay·t)

    def __post_init__(self) -> None:
        if self.lr < 0 or self.eps <= 0:
            raise ValueError(f"need lr >= 0 and eps > 0, got lr={self.lr}, eps={self.eps}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.decay not in ("constant", "cosine", "linear"):
            raise ValueError(f"unknown decay {self.decay!r}")

    def lr_at(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant" or self.total_steps <= self.warmup:
            return self.lr
        t = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        if self.decay == "cosine":
            f = 0.5 * (1.0 + math.cos(math.pi * t))
        else:
            f = 1.0 - t
        return self.lr * (self.min_ratio + (1.0 - self.min_ratio) * f)

    def eps_at(self, step: int) -> float:
        return self.eps / (1.0 + self.eps_decay * step)


def zo_gradient(step: StepRecord, d: int, guide: Guide | None) -> np.ndarray:
    """ĝ_ZO in gradient units: per group, mean_i g_i z_i / gain on the group's span; zero elsewhere."""
    out = np.zeros(d, np.float32)
    for grp in step.groups:
        stop = d if grp.stop < 0 else grp.stop
        n = stop - grp.start
        if grp.seeds.size == 0:
            continue
        sub = None if guide is None else (guide if (grp.start, stop) == (0, d) else guide.restrict(grp.start, stop))
        acc = np.zeros(n, np.float32)
        for seed, g in zip(grp.seeds.tolist(), grp.grads.tolist(), strict=True):
            acc += np.float32(g) * direction(int(seed), n, sub)
        acc *= np.float32(1.0 / grp.seeds.size)
        out[grp.start : stop] += to_gradient_units(acc, sub)
    return out


def update_direction(step: StepRecord, d: int, guide: Guide | None) -> np.ndarray:
    """u = λ·g_B + (1−λ)·ĝ_ZO (CooperLLM rectification; λ = 0 is plain ZO)."""
    u = zo_gradient(step, d, guide)
    if step.lam:
        if guide is None or guide.grad is None:
            raise ValueError("step has λ > 0 but the guide carries no cloud gradient")
        u *= np.float32(1.0 - step.lam)
        u += np.float32(step.lam) * guide.grad
    return u


def apply_step(
    theta: np.ndarray,
    velocity: np.ndarray | None,
    step: StepRecord,
    t: int,
    schedule: Schedule,
    guide: Guide | None,
) -> None:
    """θ ← θ − η_t·v, v ← μ·v + u (in place). ``velocity`` may be None when momentum is 0.

    Full-space steps only: a subspace round keeps its state in :class:`SubspaceState`.
    """
    if guide is not None and guide.subspace:
        raise ValueError("apply_step is for full-space guidance; a subspace round steps a SubspaceState")
    u = update_direction(step, theta.shape[0], guide)
    if not np.isfinite(u).all():
        raise FloatingPointError(f"non-finite update at step {t}")
    if schedule.momentum:
        if velocity is None:
            raise ValueError("momentum > 0 needs a velocity buffer")
        velocity *= np.float32(schedule.momentum)
        velocity += u
        u = velocity
    theta -= np.float32(schedule.lr_at(t)) * u


def subspace_theta(theta0: np.ndarray, basis: np.ndarray, c: np.ndarray) -> np.ndarray:
    """θ = θ_t + U·c, in float64 column by column, then float32.

    Written as a fixed sequence of element-wise operations (no BLAS reduction), so the edge and the cloud's
    replay produce the same bits whatever library or thread count either side runs.
    """
    out = np.asarray(theta0, np.float64).copy()  # (d,)
    for j in range(basis.shape[1]):
        if c[j]:
            out += float(c[j]) * basis[:, j].astype(np.float64)
    return out.astype(np.float32)


@dataclass
class SubspaceState:
    """One round of edge ZO in a cloud-built subspace: θ = θ_t + U·c with Adam over c ∈ R^k.

    The state (c, Adam's m and v, the step count) is k + k + k + 1 numbers; it starts at zero each round on
    the edge and in the cloud's replay alike. Step: ĝ_c = mean_i g_i u_i (the projected gradient in c-space,
    unbiased for Uᵀ∇L as E[u uᵀ] = I), then Adam with lr_t from the round's Schedule.
    """

    theta0: np.ndarray  # (d,) float32, θ the round started from
    guide: Guide
    c: np.ndarray = field(default=None)  # type: ignore[assignment]  # (k,) float64
    m: np.ndarray = field(default=None)  # type: ignore[assignment]
    v: np.ndarray = field(default=None)  # type: ignore[assignment]
    n: int = 0

    def __post_init__(self) -> None:
        if not self.guide.subspace:
            raise ValueError("SubspaceState needs a guide of kind 'subspace'")
        self.theta0 = np.array(self.theta0, np.float32, copy=True)
        k = self.guide.k
        self.c = np.zeros(k) if self.c is None else np.asarray(self.c, np.float64)
        self.m = np.zeros(k) if self.m is None else np.asarray(self.m, np.float64)
        self.v = np.zeros(k) if self.v is None else np.asarray(self.v, np.float64)

    def c_gradient(self, step: StepRecord) -> np.ndarray:
        """ĝ_c = mean_i g_i·u_i over the step's perturbations (k,)."""
        g = np.zeros(self.guide.k, np.float64)
        n = 0
        for grp in step.groups:
            if grp.start != 0 or grp.stop not in (-1, self.guide.d):
                raise ValueError("a subspace step has one group over all of θ")
            for seed, gi in zip(grp.seeds.tolist(), grp.grads.tolist(), strict=True):
                g += float(gi) * subspace_direction(int(seed), self.guide.k).astype(np.float64)
                n += 1
        return g / n if n else g

    def apply(self, step: StepRecord, t: int, schedule: Schedule) -> None:
        """One Adam step on c from the step's (seed, g) records; a rejected (empty) step is a no-op."""
        if step.lam:
            raise ValueError("a subspace step takes no rectification (λ must be 0)")
        if step.n_perturbations == 0:
            return
        g = self.c_gradient(step)
        if not np.isfinite(g).all():
            raise FloatingPointError(f"non-finite subspace gradient at step {t}")
        b1, b2 = SUBSPACE_BETAS
        self.n += 1
        self.m = b1 * self.m + (1.0 - b1) * g
        self.v = b2 * self.v + (1.0 - b2) * g * g
        m_hat = self.m / (1.0 - b1**self.n)
        v_hat = self.v / (1.0 - b2**self.n)
        self.c = self.c - schedule.lr_at(t) * m_hat / (np.sqrt(v_hat) + SUBSPACE_ADAM_EPS)

    def theta(self) -> np.ndarray:
        """θ_t + U·c (float32), bit-identical on edge and cloud (:func:`subspace_theta`)."""
        return subspace_theta(self.theta0, self.guide.basis, self.c)


def online_lambda(grads: np.ndarray, cloud_dots: np.ndarray, d: int, gain: float = 1.0) -> float:
    """λ* = dσ² / (dσ² + ‖b‖² + τ²) estimated from one step's records (DESIGN.md, rectification).

    ``cloud_dots[i]`` = ⟨g_B, z_i⟩. Both terms are put in the units of ĝ = mean(g z)/gain:
    dσ² ≈ d·mean(g²)/(q·gain²) is the ZO estimate's total variance (‖z‖² ≈ d); ‖b‖² + τ² ≈
    mean((g_i − ⟨g_B, z_i⟩)²)/gain, the cloud gradient's error seen through the same directions
    (E⟨v, z⟩² = vᵀCv ≈ gain·‖Qᵀv‖² when v lies mostly in the guided subspace). gain = 1 is DESIGN.md's formula.
    """
    g = np.asarray(grads, np.float64)
    c = np.asarray(cloud_dots, np.float64)
    if g.size == 0:
        return 0.0
    zo_var = d * float(np.mean(g * g)) / (g.size * gain * gain)
    bias = float(np.mean((g - c) ** 2)) / gain
    if zo_var + bias <= 0.0 or not math.isfinite(zo_var + bias):
        return 0.0
    return zo_var / (zo_var + bias)


def replay(
    theta0: np.ndarray,
    steps: Iterable[StepRecord],
    schedule: Schedule,
    guide: Guide | None,
    first_step: int = 0,
) -> np.ndarray:
    """Reconstruct the θ an edge reached from its records (momentum / c-space Adam start at zero each round)."""
    if guide is not None and guide.subspace:
        state = SubspaceState(theta0, guide)
        for i, st in enumerate(steps):
            state.apply(st, first_step + i, schedule)
        return state.theta()
    theta = np.array(theta0, dtype=np.float32, copy=True)
    vel = np.zeros_like(theta) if schedule.momentum else None
    for i, st in enumerate(steps):
        apply_step(theta, vel, st, first_step + i, schedule, guide)
    return theta
