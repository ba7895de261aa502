"""Directions from seeds and the zeroth-order update: one implementation for edge and cloud.

The edge applies :func:`apply_step` after measuring its ``(seed, g)`` records; the cloud calls the very
same function in :func:`replay` to reconstruct the edge's θ. Same code, same float32 operations, same
order: replay is exact by construction (DESIGN.md, "Directions from seeds", "Zeroth-order step").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Guide:
    """Cloud guidance for one round: orthonormal basis Q (d, k), mixing α, optional cloud gradient g_B (d,)."""

    basis: np.ndarray  # (d, k) float32, orthonormal columns
    alpha: float = 0.5
    grad: np.ndarray | None = None  # (d,) float32: g_B, used for rectification

    def __post_init__(self) -> None:
        q = np.ascontiguousarray(self.basis, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] < 1 or q.shape[0] < q.shape[1]:
            raise ValueError(f"guide basis must be (d, k) with d >= k >= 1, got {q.shape}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"guide alpha must be in (0, 1], got {self.alpha}")
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

    def restrict(self, start: int, stop: int) -> Guide:
        """The guide for the coordinates [start, stop): the basis rows re-orthonormalised (split schedule)."""
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
    z = rng.standard_normal(d, dtype=np.float32)  # (d,)
    if guide is None or guide.alpha >= 1.0:
        return z
    if guide.d != d:
        raise ValueError(f"guide is for d={guide.d}, direction asked for d={d}")
    zk = rng.standard_normal(guide.k, dtype=np.float32)  # (k,)
    z *= np.float32(math.sqrt(guide.alpha))
    z += np.float32(math.sqrt((1.0 - guide.alpha) * d / guide.k)) * (guide.basis @ zk)
    return z


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


@dataclass
class Group:
    """The perturbations of one step on one coordinate span [start, stop) of θ: seeds and projected grads."""

    seeds: np.ndarray  # (n,) uint64
    grads: np.ndarray  # (n,) float32, g_i = (L+ − L−) / (2ε)
    start: int = 0
    stop: int = -1  # -1: up to d

    def __post_init__(self) -> None:
        self.seeds = np.asarray(self.seeds, dtype=np.uint64).reshape(-1)
        self.grads = np.asarray(self.grads, dtype=np.float32).reshape(-1)
        if self.seeds.shape != self.grads.shape:
            raise ValueError(f"{self.seeds.size} seeds but {self.grads.size} grads")


@dataclass
class StepRecord:
    """Everything needed to replay one local step: its perturbation groups and the λ it used."""

    groups: list[Group] = field(default_factory=list)
    lam: float = 0.0  # rectification weight on g_B (0: none)

    @property
    def n_perturbations(self) -> int:
        return sum(g.seeds.size for g in self.groups)


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
    """θ ← θ − η_t·v, v ← μ·v + u (in place). ``velocity`` may be None when momentum is 0."""
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
    """Reconstruct the θ an edge reached from its records (momentum starts at zero each round)."""
    theta = np.array(theta0, dtype=np.float32, copy=True)
    vel = np.zeros_like(theta) if schedule.momentum else None
    for i, st in enumerate(steps):
        apply_step(theta, vel, st, first_step + i, schedule, guide)
    return theta
