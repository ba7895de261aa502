"""The zeroth-order estimator: two-point SPSA (MeZO) from seeded directions, optionally guided, optionally
split over two layer blocks (FedSPZO). It only MEASURES: it returns a ``StepRecord`` of ``(seed, g)``; θ is
updated by ``protocol.zo.apply_step`` alone, so the cloud's replay is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protocol.zo import Group, Guide, StepRecord, direction, online_lambda

LossFn = Callable[[np.ndarray], float]  # θ (d,) float32 -> scalar loss on the current mini-batch


@dataclass(frozen=True)
class ZOConfig:
    """q: perturbations per step (plain schedule). split: θ index where block 2 starts (None: no split);
    p1/p2: block-1 perturbations and block-2 perturbations per block-1 one. lam: fixed λ or "online"."""

    q: int = 1
    split: int | None = None
    p1: int = 1
    p2: int = 2
    lam: float | str = 0.0

    def __post_init__(self) -> None:
        if self.q < 1 or self.p1 < 1 or self.p2 < 1:
            raise ValueError(f"q, p1, p2 must be >= 1, got {self.q}, {self.p1}, {self.p2}")
        if isinstance(self.lam, str):
            if self.lam != "online":
                raise ValueError(f"lam must be a number in [0, 1] or 'online', got {self.lam!r}")
        elif not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")


@dataclass
class StepInfo:
    """What a step measured: the mean loss over its passes, whether it was rejected, and why."""

    loss: float
    rejected: bool = False
    reason: str = ""
    losses: list[float] = field(default_factory=list)


def step_seeds(seed: int, step: int, n: int) -> np.ndarray:
    """n perturbation seeds of step ``step``: a pure function of (run seed, step), so resume is exact."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, 0x5A0])))
    return rng.integers(0, 2**63, size=n, dtype=np.uint64)


def _spans(d: int, cfg: ZOConfig) -> list[tuple[int, int, int]]:
    """(start, stop, n perturbations) per group."""
    if cfg.split is None or not 0 < cfg.split < d:
        return [(0, d, cfg.q)]
    return [(0, cfg.split, cfg.p1), (cfg.split, d, cfg.p1 * cfg.p2)]


def zo_measure(
    loss_fn: LossFn,
    theta: np.ndarray,
    eps: float,
    seeds: np.ndarray,
    cfg: ZOConfig,
    guide: Guide | None = None,
) -> tuple[StepRecord, StepInfo]:
    """Two forward passes per seed at θ ± εz; returns the StepRecord (θ itself is left unchanged).

    A non-finite loss rejects the step: the record then has no groups (a no-op for apply_step).
    """
    d = theta.shape[0]
    spans = _spans(d, cfg)
    need = sum(n for _, _, n in spans)
    if len(seeds) < need:
        raise ValueError(f"need {need} seeds, got {len(seeds)}")
    work = theta.copy()  # (d,) the perturbed θ
    groups: list[Group] = []
    losses: list[float] = []
    dots: list[float] = []
    k = 0
    for start, stop, n in spans:
        sub = None
        if guide is not None:
            sub = guide if (start, stop) == (0, d) else guide.restrict(start, stop)
        grads = np.empty(n, np.float32)
        for i in range(n):
            seed = int(seeds[k + i])
            z = direction(seed, stop - start, sub)  # (stop-start,)
            work[start:stop] = theta[start:stop] + np.float32(eps) * z
            lp = loss_fn(work)
            work[start:stop] = theta[start:stop] - np.float32(eps) * z
            lm = loss_fn(work)
            work[start:stop] = theta[start:stop]
            losses += [lp, lm]
            if not (math.isfinite(lp) and math.isfinite(lm)):
                return StepRecord(groups=[], lam=0.0), StepInfo(float("nan"), True, f"non-finite loss (L+={lp}, L-={lm})", losses)
            grads[i] = (lp - lm) / (2.0 * eps)
            if sub is not None and sub.grad is not None:
                dots.append(float(sub.grad @ z))
        groups.append(Group(seeds[k : k + n], grads, start, stop if stop != d else -1))
        k += n
    lam = cfg.lam
    if lam == "online":
        if guide is None or guide.grad is None:
            lam = 0.0
        else:
            g_all = np.concatenate([g.grads for g in groups])
            lam = online_lambda(g_all, np.array(dots), d, guide.gain)
    lam = float(lam)
    if lam and (guide is None or guide.grad is None):
        raise ValueError("λ > 0 needs a guide with a cloud gradient")
    return StepRecord(groups=groups, lam=lam), StepInfo(float(np.mean(losses)), losses=losses)
