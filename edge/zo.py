"""The zeroth-order estimator: two-point SPSA (MeZO) from seeded directions, optionally guided, optionally
split over two layer blocks (FedSPZO). It only MEASURES: it returns a ``StepRecord`` of ``(seed, g)``; θ is
updated by ``protocol.zo.apply_step`` alone, so the cloud's replay is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protocol.constants import LAMBDA_ONLINE, SPLIT_P1, SPLIT_P2
from protocol.zo import Group, Guide, Lambda, StepRecord, check_lambda, direction, online_lambda

LossFn = Callable[[np.ndarray], float]  # θ (d,) float32 -> scalar loss on the current mini-batch


@dataclass(frozen=True)
class ZOConfig:
    """q: perturbations per step (plain schedule). split: θ index where block 2 starts (None: no split);
    p1/p2: block-1 perturbations and block-2 perturbations per block-1 one. lam: a fixed λ or LAMBDA_ONLINE
    (protocol.zo.Lambda)."""

    q: int = 1
    split: int | None = None
    p1: int = SPLIT_P1
    p2: int = SPLIT_P2
    lam: Lambda = 0.0

    def __post_init__(self) -> None:
        if self.q < 1 or self.p1 < 1 or self.p2 < 1:
            raise ValueError(f"q, p1, p2 must be >= 1, got {self.q}, {self.p1}, {self.p2}")
        check_lambda(self.lam)


@dataclass
class StepInfo:
    """What a step measured: the mean loss over its passes, whether it was rejected, and why."""

    loss: float
    rejected: bool = False
    reason: str = ""
    losses: list[float] = field(default_factory=list)


def pool_seeds(base: int, idx: np.ndarray) -> np.ndarray:
    """The seeds at positions ``idx`` of the pool of ``base`` (uint64 in [0, 2^63)): a pure function of
    (base, index), so every client of a round (base = its ``first_step``) draws from the same pool (FedKSeed)."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    table = {j: np.random.SeedSequence([int(base), j, 0x9001]).generate_state(1, np.uint64)[0] >> np.uint64(1)
             for j in set(idx.tolist())}
    return np.array([table[j] for j in idx.tolist()], np.uint64)


def step_seeds(seed: int, step: int, n: int, pool: int = 0, pool_base: int = 0) -> np.ndarray:
    """n perturbation seeds of step ``step``: a pure function of (run seed, step), so resume is exact.

    ``pool`` K > 0: the seeds are n draws (with replacement) from the round's pool of K shared seeds
    (:func:`pool_seeds` of ``pool_base``), so the guide's merge generates at most K directions per span."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 0x5A0])))
    if pool > 0:
        return pool_seeds(pool_base, rng.integers(0, pool, size=n))
    return rng.integers(0, 2**63, size=n, dtype=np.uint64)


def _spans(d: int, cfg: ZOConfig) -> list[tuple[int, int, int]]:
    """(start, stop, n perturbations) per group."""
    if cfg.split is None or not 0 < cfg.split < d:
        return [(0, d, cfg.q)]
    return [(0, cfg.split, cfg.p1), (cfg.split, d, cfg.p1 * cfg.p2)]


HeadFn = Callable[[np.ndarray], object]  # θ[:split] -> the head's output (captured states, or θ[:split] itself)
TailFn = Callable[[object, np.ndarray], float]  # (head output, θ[split:]) -> loss


def zo_measure(
    loss_fn: LossFn,
    theta: np.ndarray,
    eps: float,
    seeds: np.ndarray,
    cfg: ZOConfig,
    guide: Guide | None = None,
    head_tail: tuple[HeadFn, TailFn] | None = None,
) -> tuple[StepRecord, StepInfo]:
    """Two forward passes per seed at θ ± εz; returns the StepRecord (θ itself is left unchanged).

    With a split (``cfg.split``) the step is FedSPZO's, measured so that block-2 passes can reuse block 1's
    output (:func:`_measure_split`); ``head_tail`` supplies that reuse, else every pass is ``loss_fn`` of θ.
    A non-finite loss rejects the step: the record then has no groups (a no-op for apply_step).
    """
    d = theta.shape[0]
    spans = _spans(d, cfg)
    need = sum(n for _, _, n in spans)
    if len(seeds) < need:
        raise ValueError(f"need {need} seeds, got {len(seeds)}")
    dots: list[float] = []
    if len(spans) == 1:
        groups, losses, bad = _measure_plain(loss_fn, theta, eps, seeds[: cfg.q], guide, dots)
    else:
        if head_tail is None:

            def head(t1: np.ndarray) -> np.ndarray:
                return t1.copy()

            def tail(t1: np.ndarray, t2: np.ndarray) -> float:
                return loss_fn(np.concatenate([t1, t2]))

            head_tail = (head, tail)
        groups, losses, bad = _measure_split(*head_tail, theta, eps, seeds, cfg, guide, dots)
    if bad:
        return StepRecord.rejected(), StepInfo(float("nan"), True, bad, losses)
    lam = cfg.lam
    if lam == LAMBDA_ONLINE:
        if guide is None or guide.grad is None:
            lam = 0.0
        else:
            g_all = np.concatenate([g.grads for g in groups])
            lam = online_lambda(g_all, np.array(dots), d, guide.gain)
    lam = float(lam)
    if lam and (guide is None or guide.grad is None):
        raise ValueError("λ > 0 needs a guide with a cloud gradient")
    return StepRecord(groups=groups, lam=lam), StepInfo(float(np.mean(losses)), losses=losses)


def _nonfinite(lp: float, lm: float) -> str:
    return "" if math.isfinite(lp) and math.isfinite(lm) else f"non-finite loss (L+={lp}, L-={lm})"


def _measure_plain(loss_fn, theta, eps, seeds, guide, dots) -> tuple[list[Group], list[float], str]:
    """q two-point estimates along seeded directions of the whole of θ."""
    d = theta.shape[0]
    work = theta.copy()  # (d,) the perturbed θ
    grads = np.empty(len(seeds), np.float32)
    losses: list[float] = []
    e = np.float32(eps)
    for i, seed in enumerate(seeds):
        z = direction(int(seed), d, guide)  # (d,)
        work[:] = theta + e * z
        lp = loss_fn(work)
        work[:] = theta - e * z
        lm = loss_fn(work)
        losses += [lp, lm]
        if bad := _nonfinite(lp, lm):
            return [], losses, bad
        grads[i] = (lp - lm) / (2.0 * eps)
        if guide is not None and guide.grad is not None:
            dots.append(float(guide.grad @ z))
    return [Group(np.asarray(seeds), grads, 0, -1)], losses, ""


def _measure_split(head: HeadFn, tail: TailFn, theta, eps, seeds, cfg: ZOConfig, guide, dots):
    """FedSPZO's step, defined so block-2 passes reuse block 1's output (DESIGN.md, "Split perturbation").

    θ = (θ1, θ2) = (θ[:split], θ[split:]). Seeds: the first p1 for block 1, the next p1·p2 for block 2. For each
    block-1 direction z1_i:
      h± = head(θ1 ± εz1_i)                                    2 head passes
      g1_i = (tail(h+, θ2) − tail(h−, θ2)) / 2ε                2 tail passes
      for j < p2, on side σ_j = + (j even) / − (j odd):
        g2_ij = (tail(h_σ, θ2 + εz2_ij) − tail(h_σ, θ2 − εz2_ij)) / 2ε     2 tail passes
    So a block-2 estimate is the two-point SPSA of ∇₂L at (θ1 + σ_j εz1_i, θ2): its offset from ∇₂L(θ) is
    σ_j ε H₂₁ z1_i, zero in expectation over z1 (and alternating σ cancels it pairwise); its bias is O(ε²), as
    SPSA's own. Without reuse, ``head`` returns θ1 and ``tail`` is a full forward: the same numbers up to the
    runtime's floating-point, at 2·p1·(1 + p2) full passes instead of 2·p1 head + 2·p1·(1 + p2) tail passes.
    The record is two groups, replayed by ``protocol.zo.apply_step`` like any split step.
    """
    d = theta.shape[0]
    split, p1, p2 = cfg.split, cfg.p1, cfg.p2
    t1, t2 = theta[:split], theta[split:]
    g1 = guide.restrict(0, split) if guide is not None else None
    g2 = guide.restrict(split, d) if guide is not None else None
    e = np.float32(eps)
    grads1 = np.empty(p1, np.float32)
    grads2 = np.empty(p1 * p2, np.float32)
    seeds1, seeds2 = seeds[:p1], seeds[p1 : p1 + p1 * p2]
    losses: list[float] = []
    dots1: list[float] = []
    dots2: list[float] = []
    for i in range(p1):
        z1 = direction(int(seeds1[i]), split, g1)  # (split,)
        h = {+1: head(t1 + e * z1), -1: head(t1 - e * z1)}
        lp, lm = tail(h[+1], t2), tail(h[-1], t2)
        losses += [lp, lm]
        if bad := _nonfinite(lp, lm):
            return [], losses, bad
        grads1[i] = (lp - lm) / (2.0 * eps)
        if g1 is not None and g1.grad is not None:
            dots1.append(float(g1.grad @ z1))
        for j in range(p2):
            side = +1 if j % 2 == 0 else -1
            z2 = direction(int(seeds2[i * p2 + j]), d - split, g2)  # (d - split,)
            lp, lm = tail(h[side], t2 + e * z2), tail(h[side], t2 - e * z2)
            losses += [lp, lm]
            if bad := _nonfinite(lp, lm):
                return [], losses, bad
            grads2[i * p2 + j] = (lp - lm) / (2.0 * eps)
            if g2 is not None and g2.grad is not None:
                dots2.append(float(g2.grad @ z2))
    dots += dots1 + dots2  # the order of the groups' grads
    groups = [Group(np.asarray(seeds1), grads1, 0, split), Group(np.asarray(seeds2), grads2, split, -1)]
    return groups, losses, ""
