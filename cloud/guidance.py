"""Guidance: task-loss gradients on public mini-batches → Q = orth(last k gradients), g_B = their mean.

:class:`GuidanceBuilder` computes round t+1's guidance in a background executor while round t runs
(DESIGN.md, "Federated round" step 1). Gradients come from any callable ``grad_fn(theta, batch_index)``
returning ``(grad (d,), loss)``, e.g. :meth:`cloud.model.TorchScorer.gradient` on a public slice.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from protocol.zo import Guide, orthonormal_basis

GradFn = Callable[[np.ndarray, int], tuple[np.ndarray, float]]


@dataclass(frozen=True)
class GuidanceConfig:
    """k: basis size (last k gradients); batches: public mini-batches per round; mix_alpha: the Guided-ES mix
    (the guide's α, [train] mix_alpha)."""

    k: int = 4
    batches: int = 2
    mix_alpha: float = 0.5
    # "adam": precondition each public gradient by Adam's running second moment (diagonal), rescaled to the raw
    # gradient's norm, before it enters Q and g_B. Raw gradients of a LoRA are dominated by a few coordinates;
    # SGD along them barely fixes the label bias that AdamW fixes in 5 steps (docs/RESULTS.md). The edge and
    # the replay are unchanged: guidance is whatever vectors the cloud sends.
    precondition: str = "none"
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.precondition not in ("none", "adam"):
            raise ValueError(f"precondition must be 'none' or 'adam', got {self.precondition!r}")
        if not 0.0 < self.beta2 < 1.0:
            raise ValueError(f"beta2 must be in (0, 1), got {self.beta2}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.batches < 1:
            raise ValueError(f"batches must be >= 1, got {self.batches}")
        if not 0.0 < self.mix_alpha <= 1.0:
            raise ValueError(f"mix_alpha must be in (0, 1], got {self.mix_alpha}")


@dataclass(frozen=True)
class Guidance:
    """One round's guidance plus the public loss measured while building it.

    ``theta``: where the round starts when the cloud leads (round v2): θ_t after the cloud's own AdamW steps on
    public data this round; None means the round starts from θ_t itself. ``info``: what the cloud did (for the
    round log: steps taken, public loss before/after, subspace composition).
    """

    guide: Guide
    public_loss: float
    theta_round: int  # the round whose θ the gradients were taken at
    theta: np.ndarray | None = None
    info: dict = field(default_factory=dict)


class AdamPreconditioner:
    """Diagonal Adam preconditioner over the public gradients seen so far (bias-corrected second moment).

    ``__call__(g)`` updates v with g, then returns g / (sqrt(v̂) + eps) rescaled to ‖g‖, so the guidance keeps
    gradient units (λ stays meaningful next to the ZO estimate) while its direction is Adam's.
    """

    def __init__(self, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.beta2, self.eps, self.t = beta2, eps, 0
        self.v: np.ndarray | None = None

    def __call__(self, g: np.ndarray) -> np.ndarray:
        g64 = np.asarray(g, np.float64)
        self.v = (1.0 - self.beta2) * g64 * g64 + (self.beta2 * self.v if self.v is not None else 0.0)
        self.t += 1
        p = g64 / (np.sqrt(self.v / (1.0 - self.beta2**self.t)) + self.eps)  # (d,)
        norm_p = float(np.linalg.norm(p))
        return (p * (float(np.linalg.norm(g64)) / norm_p) if norm_p > 0 else p).astype(np.float32)


def build_guide(grads: list[np.ndarray], alpha: float) -> Guide:
    """Guide from recent gradients: Q = orth(grads), g_B = mean(grads) (pure)."""
    if not grads:
        raise ValueError("need at least one gradient")
    g_b = np.mean(np.stack(grads).astype(np.float64), axis=0).astype(np.float32)
    if not np.any(grads[-1]) and not np.any(g_b):
        basis = np.zeros((g_b.size, 1), np.float32)
        basis[0, 0] = 1.0
    else:
        basis = orthonormal_basis(grads)
    return Guide(basis=basis, alpha=alpha, grad=g_b)


class GuidanceBuilder:
    """Keeps the last k public gradients; builds guidance now or in the background.

    Thread-safety: one build runs at a time (a single worker); ``grad_fn`` is only ever called from it.
    """

    def __init__(self, *, grad_fn: GradFn, config: GuidanceConfig, rng: np.random.Generator,
                 n_batches: int) -> None:
        if n_batches < 1:
            raise ValueError("need at least one public mini-batch")
        self.grad_fn, self.config, self.rng, self.n_batches = grad_fn, config, rng, n_batches
        self.history: collections.deque[np.ndarray] = collections.deque(maxlen=config.k)
        self.precond = AdamPreconditioner(config.beta2) if config.precondition == "adam" else None
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="guidance")
        self._lock = threading.Lock()

    def build(self, theta: np.ndarray, round_id: int) -> Guidance:
        """Gradients at θ on ``config.batches`` public mini-batches; Q from the last k gradients."""
        with self._lock:
            losses = []
            for _ in range(self.config.batches):
                b = int(self.rng.integers(self.n_batches))
                g, loss = self.grad_fn(np.array(theta, np.float32, copy=True), b)
                if not np.isfinite(g).all():
                    raise FloatingPointError("non-finite cloud gradient")
                g = np.asarray(g, np.float32)
                self.history.append(self.precond(g) if self.precond is not None else g)
                losses.append(loss)
            guide = build_guide(list(self.history), self.config.mix_alpha)
            return Guidance(guide=guide, public_loss=float(np.mean(losses)), theta_round=round_id)

    def submit(self, theta: np.ndarray, round_id: int) -> cf.Future[Guidance]:
        """Build in the background (pipelining: round t+1's guidance while round t runs)."""
        return self._pool.submit(self.build, np.array(theta, np.float32, copy=True), round_id)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
