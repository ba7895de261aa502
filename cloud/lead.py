"""The cloud leads (round v2, DESIGN.md "Round v2"): warm start, per-round cloud steps, subspace guidance.

:class:`CloudLead` owns the torch scorer, the public data and one AdamW state that persists across rounds
(checkpointed to ``state_dir/lead.npz``). Before round 0 it fine-tunes θ on public mini-batches
(:meth:`CloudLead.warm_start`, θ_0 = what the cloud alone reaches); each round it may take a few more AdamW
steps from the merged θ_t, optionally proximal (:meth:`CloudLead.advance`), and sends an orthonormal basis
U (d, k) built from its own trajectory and from public gradients on varied mini-batches
(:meth:`CloudLead.subspace`). The edge then searches θ = θ' + U·c (``protocol.zo.Guide`` kind "subspace").

AdamW is implemented here in numpy float64 (moments and update), θ kept as float32 (the wire dtype): the same
inputs give bit-identical θ on every run, and the whole state is a few arrays, so a checkpoint restores it
exactly (a resumed warm start ends at the same θ as an uninterrupted one).

Cost (measured by bench/diagnostic.py, docs/bench/diagnostic.json "timing"; SmolLM2-135M + LoRA r8 q,v,
d = 460,800, torch fp32 on 2 CPU cores shared with other jobs): one public gradient takes 9–13 s at batch 8 and
≈ 30 s at batch 16 (texts ≤ 200 / ≤ 400 characters); the QR of a 460,800 × 8 matrix 0.3–0.5 s. One subspace
build is therefore ≈ (k − trajectory) gradients: 63–93 s at k = 8 / batch 8 (two runs), ≈ 7.5 min at k = 16 /
batch 16 on these cores, and each round_step costs one more gradient. On CPU the cloud's gradients, not the QR,
set the round's latency.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cloud.config import CloudConfig, TrainConfig
from cloud.data import Slice
from cloud.guidance import Guidance
from convert.atomic import atomic_open
from protocol.zo import Guide, orthonormal_basis

CKPT_NAME = "lead.npz"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _jsonable(o: object) -> object:
    """numpy values inside a bit generator's state (MT19937 keeps an array) as JSON lists / numbers."""
    if isinstance(o, np.ndarray | np.generic):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class GradientScorer(Protocol):
    """What :class:`CloudLead` needs of :class:`cloud.model.TorchScorer`."""

    def gradient(self, theta: np.ndarray, texts: list[str], labels: list[int]) -> tuple[np.ndarray, float]: ...


@dataclass(frozen=True)
class LeadConfig:
    """How the cloud leads.

    warm_steps: AdamW steps on public data before round 0. round_steps: AdamW steps per round from θ_t (the cloud
    keeps leading; 0 = guidance only). lr, batch: AdamW learning rate and public mini-batch size; weight_decay:
    AdamW's decoupled decay (0, as in the convergence study). prox: μ, adds μ/2·‖θ − θ_t‖² to each per-round
    step's loss (keeps the cloud near the edges' θ). k: subspace size (4..128). trajectory: how many trajectory
    directions go in U (θ_now − θ_init first, then the most recent cloud AdamW updates), the remaining k −
    trajectory columns are public gradients. ckpt_every: warm-start steps between checkpoints.
    """

    # Defaults are guide.toml's ([cloud] and [train] k), defined once in cloud.config.
    warm_steps: int = CloudConfig.warm_steps
    round_steps: int = CloudConfig.round_steps
    lr: float = CloudConfig.lr
    batch: int = CloudConfig.batch
    prox: float = CloudConfig.prox
    k: int = TrainConfig.k
    trajectory: int = CloudConfig.trajectory
    ckpt_every: int = 10
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        # the [cloud] fields are validated once, by cloud.config.CloudConfig
        CloudConfig(warm_steps=self.warm_steps, round_steps=self.round_steps, lr=self.lr, batch=self.batch,
                    prox=self.prox, trajectory=self.trajectory)
        for name in ("k", "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if not 4 <= self.k <= 128:
            raise ValueError(f"k must be in 4..128, got {self.k}")
        if not 0 <= self.trajectory <= self.k - 1:
            raise ValueError(f"trajectory must be in 0..k-1 = 0..{self.k - 1} (at least one public gradient), "
                             f"got {self.trajectory}")
        if self.ckpt_every < 1:
            raise ValueError(f"ckpt_every must be >= 1, got {self.ckpt_every}")
        if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")


class CloudLead:
    """Owns the torch scorer, the public data and the AdamW state (persisting across rounds, checkpointed).

    Not thread-safe against the caller: while a :meth:`submit` is in flight the scorer belongs to the executor.
    """

    pipelined = False  # guidance at θ_{t+1} needs the merge of round t: it cannot be built during round t

    def __init__(self, *, scorer: GradientScorer, public: Slice, config: LeadConfig, rng: np.random.Generator,
                 state_dir: Path | None = None, progress: bool = True) -> None:
        if len(public) < config.batch:
            raise ValueError(f"public data has {len(public)} examples, fewer than one batch ({config.batch})")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        self.scorer, self.public, self.config, self.rng = scorer, public, config, rng
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.progress = progress
        lora = getattr(scorer, "lora", None)
        self.theta_init: np.ndarray | None = lora.get_theta() if lora is not None else None
        self.theta: np.ndarray | None = None  # the cloud's current θ (float32)
        self.theta0: np.ndarray | None = None  # θ_0, the warm start's result
        self.m: np.ndarray | None = None  # Adam first moment (float64)
        self.v: np.ndarray | None = None  # Adam second moment (float64)
        self.t = 0  # Adam steps taken (bias correction)
        self.warm_done = 0  # warm-start steps taken
        self.history: list[dict] = []  # one {"phase", "step", "loss"} per AdamW step
        self._recent: collections.deque[np.ndarray] = collections.deque(maxlen=max(config.trajectory - 1, 0))
        self._lock = threading.Lock()
        self._pool: cf.ThreadPoolExecutor | None = None

    # ---- AdamW -----------------------------------------------------------------------------------------
    def _batch(self) -> tuple[list[str], list[int]]:
        idx = self.rng.choice(len(self.public), size=self.config.batch, replace=False)
        return [self.public.texts[int(i)] for i in idx], [self.public.labels[int(i)] for i in idx]

    def _adam_step(self, theta: np.ndarray, anchor: np.ndarray | None, phase: str) -> np.ndarray:
        """One AdamW step on a fresh public mini-batch; the proximal term μ(θ − anchor) is added to the gradient."""
        texts, labels = self._batch()
        g, loss = self.scorer.gradient(theta, texts, labels)
        g64 = np.asarray(g, np.float64)
        if anchor is not None and self.config.prox > 0.0:
            g64 = g64 + self.config.prox * (theta.astype(np.float64) - anchor.astype(np.float64))
        b1, b2 = ADAM_BETAS
        if self.m is None or self.v is None:
            self.m, self.v = np.zeros_like(g64), np.zeros_like(g64)
        self.t += 1
        self.m = b1 * self.m + (1.0 - b1) * g64
        self.v = b2 * self.v + (1.0 - b2) * g64 * g64
        mhat = self.m / (1.0 - b1**self.t)
        vhat = self.v / (1.0 - b2**self.t)
        th64 = theta.astype(np.float64)
        if self.config.weight_decay > 0.0:
            th64 = th64 * (1.0 - self.config.lr * self.config.weight_decay)
        new = (th64 - self.config.lr * mhat / (np.sqrt(vhat) + ADAM_EPS)).astype(np.float32)
        if self._recent.maxlen:
            self._recent.appendleft(new - theta)
        self.history.append({"phase": phase, "step": self.t, "loss": float(loss)})
        return new

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm import tqdm

        disable = not self.progress or not sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, disable=disable, leave=False)

    def warm_start(self, theta0: np.ndarray) -> np.ndarray:
        """θ_0: ``warm_steps`` AdamW steps on public mini-batches from ``theta0`` (resumed from a checkpoint in
        ``state_dir`` if one exists; the result is bit-identical to an uninterrupted run)."""
        th0 = np.array(theta0, np.float32, copy=True)
        if th0.ndim != 1:
            raise ValueError(f"theta0 must be a vector, got shape {th0.shape}")
        with self._lock:
            if not self._load(th0):
                self.theta_init = th0
                self.theta = th0.copy()
                self.m = self.v = None
                self.t = self.warm_done = 0
                self.history = []
                self._recent.clear()
            n = self.config.warm_steps
            if self.warm_done < n:
                with self._bar(n, self.warm_done, "cloud warm start") as bar:
                    while self.warm_done < n:
                        self.theta = self._adam_step(self.theta, None, "warm")
                        self.warm_done += 1
                        bar.update(1)
                        bar.set_postfix(loss=f"{self.history[-1]['loss']:.3f}")
                        if self.warm_done % self.config.ckpt_every == 0 or self.warm_done == n:
                            if self.warm_done == n:
                                self.theta0 = self.theta.copy()
                            self._save()
            if self.theta0 is None:
                self.theta0 = self.theta.copy()
                self._save()
            return self.theta0.copy()

    def advance(self, theta_t: np.ndarray, steps: int | None = None) -> np.ndarray:
        """``steps`` (default ``round_steps``) AdamW steps on public data from θ_t, the proximal term μ(θ − θ_t)
        added to each gradient; Adam's moments persist across calls. Returns θ' (θ_t itself when steps is 0)."""
        n = self.config.round_steps if steps is None else steps
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"steps must be an integer >= 0, got {n!r}")
        anchor = np.array(theta_t, np.float32, copy=True)
        if anchor.ndim != 1:
            raise ValueError(f"theta_t must be a vector, got shape {anchor.shape}")
        with self._lock:
            if self.theta_init is None:
                self.theta_init = anchor.copy()
            th = anchor.copy()
            with self._bar(n, 0, "cloud round steps") as bar:
                for _ in range(int(n)):
                    th = self._adam_step(th, anchor, "round")
                    bar.update(1)
            self.theta = th
            if n > 0:
                self._save()
            return th.copy()

    # ---- the subspace ----------------------------------------------------------------------------------
    def public_gradients(self, theta: np.ndarray, n: int) -> tuple[list[np.ndarray], list[float]]:
        """``n`` public gradients at θ, each on a fresh random mini-batch (drawn with ``self.rng``)."""
        th = np.asarray(theta, np.float32)
        grads, losses = [], []
        with self._bar(n, 0, "public gradients") as bar:
            for _ in range(n):
                g, loss = self.scorer.gradient(th, *self._batch())
                grads.append(np.asarray(g, np.float32))
                losses.append(float(loss))
                bar.update(1)
        return grads, losses

    def trajectory_directions(self, theta: np.ndarray) -> list[np.ndarray]:
        """Up to ``trajectory`` directions: θ − θ_init (skipped if ~0), then the most recent AdamW updates."""
        out: list[np.ndarray] = []
        if self.config.trajectory == 0:
            return out
        th = np.asarray(theta, np.float32)
        if self.theta_init is not None and self.theta_init.shape == th.shape:
            delta = th.astype(np.float64) - self.theta_init.astype(np.float64)
            if np.linalg.norm(delta) > 1e-7 * max(1.0, float(np.linalg.norm(self.theta_init))):
                out.append(delta.astype(np.float32))
        for step in self._recent:
            if len(out) >= self.config.trajectory:
                break
            if step.shape == th.shape and np.any(step):
                out.append(step)
        return out[: self.config.trajectory]

    def basis(self, trajectory: list[np.ndarray], grads: list[np.ndarray]) -> np.ndarray:
        """U (d, k') orthonormal spanning trajectory directions then gradients, in that order (each normalised
        first, so the QR's drop tolerance is relative; k' < k when some are dependent). U[:, :j] spans the
        first j vectors."""
        vecs = [v / n for v in (*trajectory, *grads) if (n := float(np.linalg.norm(v))) > 0.0]
        if not vecs:
            raise ValueError("no nonzero direction to build a subspace from")
        return orthonormal_basis(vecs)

    def subspace(self, theta: np.ndarray, n_grads: int | None = None) -> tuple[np.ndarray, dict]:
        """(U (d, k) float32 orthonormal, info): trajectory directions, then public gradients at θ on
        ``n_grads`` (default k − trajectory directions used) random public mini-batches."""
        t0 = time.perf_counter()
        traj = self.trajectory_directions(theta)
        n = self.config.k - len(traj) if n_grads is None else n_grads
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0 or len(traj) + n < 1:
            raise ValueError(f"n_grads must be an integer >= 0 (and leave at least one direction), got {n!r}")
        grads, losses = self.public_gradients(theta, int(n))
        u = self.basis(traj, grads)
        info = {
            "k": int(u.shape[1]),
            "n_trajectory": len(traj),
            "n_grads": len(grads),
            "n_dropped": len(traj) + len(grads) - int(u.shape[1]),
            "public_loss": float(np.mean(losses)) if losses else float("nan"),
            "seconds": time.perf_counter() - t0,
        }
        return u, info

    def guidance(self, theta_t: np.ndarray, round_id: int) -> Guidance:
        """Round ``round_id``'s guidance: θ' = advance(θ_t) (θ_t when round_steps is 0), U = subspace(θ')."""
        n0 = len(self.history)
        theta = self.advance(theta_t) if self.config.round_steps > 0 else np.array(theta_t, np.float32, copy=True)
        steps = self.history[n0:]
        with self._lock:
            u, sinfo = self.subspace(theta)
        info = {
            "cloud_steps": len(steps),
            "cloud_loss_first": steps[0]["loss"] if steps else None,
            "cloud_loss_last": steps[-1]["loss"] if steps else None,
            "cloud_move": float(np.linalg.norm(theta.astype(np.float64) - np.asarray(theta_t, np.float64))),
            **{f"subspace_{k}": v for k, v in sinfo.items()},
        }
        return Guidance(guide=Guide(u, 1.0, None, "subspace"), public_loss=sinfo["public_loss"],
                        theta_round=round_id, theta=theta, info=info)

    def submit(self, theta: np.ndarray, round_id: int) -> cf.Future[Guidance]:
        """:meth:`guidance` on a single-thread executor (θ copied now, so the caller may reuse its array)."""
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-lead")
        return self._pool.submit(self.guidance, np.array(theta, np.float32, copy=True), round_id)

    def close(self) -> None:
        """Shut the executor down (waits for a guidance in flight)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- checkpoint ------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return self.state_dir / CKPT_NAME if self.state_dir is not None else None

    def _save(self) -> None:
        """θ, θ_init, θ_0, Adam state, counters, rng state and history into state_dir/lead.npz, atomically."""
        p = self.checkpoint_path
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        empty = np.zeros(0, np.float64)
        arrays = {
            "theta": self.theta,
            "theta_init": self.theta_init,
            "theta0": self.theta0 if self.theta0 is not None else np.zeros(0, np.float32),
            "m": self.m if self.m is not None else empty,
            "v": self.v if self.v is not None else empty,
            "recent": np.stack(list(self._recent)) if self._recent else np.zeros((0, 0), np.float32),
            "meta": np.array(json.dumps({
                "t": self.t, "warm_done": self.warm_done, "rng": self.rng.bit_generator.state,
                "history": self.history, "config": self.config.__dict__,
            }, default=_jsonable)),
        }
        with atomic_open(p) as f:
            np.savez(f, **arrays)

    def _load(self, theta0: np.ndarray) -> bool:
        """Restore from the checkpoint if there is one (False if none). The checkpoint must have been started
        from ``theta0`` and with the same warm-start settings."""
        p = self.checkpoint_path
        if p is None or not p.exists():
            return False
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            theta_init = z["theta_init"]
            if theta_init.shape != theta0.shape or not np.array_equal(theta_init, theta0):
                raise ValueError(f"{p} was started from a different θ; remove it to start over")
            saved = meta["config"]
            for key in ("lr", "batch", "weight_decay"):
                if saved.get(key) != getattr(self.config, key):
                    raise ValueError(f"{p} was written with {key}={saved.get(key)!r}, this run has "
                                     f"{getattr(self.config, key)!r}; remove it to start over")
            self.theta_init = theta_init.astype(np.float32)
            self.theta = z["theta"].astype(np.float32)
            self.theta0 = z["theta0"].astype(np.float32) if z["theta0"].size else None
            self.m = z["m"] if z["m"].size else None
            self.v = z["v"] if z["v"].size else None
            self._recent.clear()
            for row in z["recent"][: self._recent.maxlen or 0]:
                self._recent.append(row.astype(np.float32))
        self.t, self.warm_done = int(meta["t"]), int(meta["warm_done"])
        self.history = list(meta["history"])
        self.rng.bit_generator.state = meta["rng"]
        return True
