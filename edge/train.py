"""The edge training loop (nanoGPT-style): measure a ZO step, apply it with protocol.zo.apply_step, repeat.

``Trainer`` owns θ, the momentum buffer and the step counter; ``run_local_steps`` is the unit a federated
client calls (N local steps under one Guide, returning the StepRecords to upload). Checkpoints are atomic
(write + fsync + rename) and hold everything a resume needs; batches and seeds are pure functions of
(seed, step), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import asdict, dataclass

import numpy as np

from convert.atomic import atomic_open
from edge.adapter import make_adapter, write_adapter_gguf, write_control_gguf
from edge.data import batch_indices
from edge.runtime import Runtime
from edge.split import SplitRunner
from edge.tasks import Encoded
from edge.zo import StepInfo, ZOConfig, step_seeds, zo_measure
from protocol.constants import SPLIT_P1, SPLIT_P2
from protocol.spec import AdapterSpec
from protocol.zo import Guide, Lambda, Schedule, StepRecord, SubspaceState, apply_step

CKPT_VERSION = 1
CAPTURE_CACHE_MB = 512  # frozen bottom: captured states kept per example (SmolLM2, 45 tokens: ~0.1 MB each)


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB.

    Reads VmHWM (the high-water mark of this process image) where Linux has it: ``ru_maxrss`` is carried across
    fork + exec, so a child started by a 900 MB parent would report 900 MB however little it used itself.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, bytes on macOS


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run besides the model and data (saved in checkpoints)."""

    steps: int = 100
    batch_size: int = 16
    seed: int = 0
    lr: float = 1e-4
    eps: float = 1e-3
    momentum: float = 0.0
    warmup: int = 0
    decay: str = "constant"
    q: int = 1
    split_layer: int | None = None
    p1: int = SPLIT_P1
    p2: int = SPLIT_P2
    lam: Lambda = 0.0
    init_b_std: float = 0.0  # 0: B = 0 (PEFT init); >0 only for tests (non-zero B so A gets gradient)
    reuse: bool = True  # with split_layer: tail passes reuse captured states (False: every pass a full forward)

    def schedule(self) -> Schedule:
        return Schedule(lr=self.lr, eps=self.eps, momentum=self.momentum, warmup=self.warmup, decay=self.decay, total_steps=self.steps)


class Trainer:
    """θ, velocity and step for one adapter on one runtime; ``train_step`` does one ZO step."""

    def __init__(
        self,
        rt: Runtime,
        task,
        train_set: list[Encoded],
        spec: AdapterSpec,
        cfg: TrainConfig,
        tensors: dict[str, np.ndarray] | None = None,
    ) -> None:
        if not train_set:
            raise ValueError("empty training set")
        self.rt, self.task, self.train_set, self.spec, self.cfg = rt, task, train_set, spec, cfg
        self.schedule = cfg.schedule()
        if tensors is None:
            tensors = spec.init(cfg.seed)
            if cfg.init_b_std:
                rng = np.random.Generator(np.random.PCG64(cfg.seed + 1))
                for info in spec.tensors:
                    if info.part == "B":
                        tensors[info.gguf_name] = (cfg.init_b_std * rng.standard_normal(info.shape)).astype(np.float32)
        self.frozen = {k: v for k, v in tensors.items() if not self._trainable(k)}
        self.theta = spec.flatten(tensors)  # (d,) float32
        self.velocity = np.zeros_like(self.theta) if self.schedule.momentum else None
        self.step = 0
        self.adapter = make_adapter(rt, spec, tensors)
        self.rejected = 0
        self.subspace: SubspaceState | None = None  # c-space state of the current subspace round
        self.batch_size, self.seed_base = cfg.batch_size, 0
        self.seed_pool, self.pool_base = 0, 0  # FedKSeed pool of the current round (0: fresh seeds)
        self._splitters: dict[int, SplitRunner] = {}
        self._states: dict[tuple[int, ...], np.ndarray] = {}  # frozen-bottom: captured states per example
        self._states_bytes = 0
        self.set_shape(q=cfg.q, split_layer=cfg.split_layer, p1=cfg.p1, p2=cfg.p2)

    def set_shape(self, *, q: int, split_layer: int | None, p1: int, p2: int) -> None:
        """The step's perturbation schedule: plain (q), split at a layer (p1, p2), or frozen-bottom.

        ``split_layer`` s with adapter layers on both sides: FedSPZO's split step (edge.zo._measure_split),
        block-2 passes run only the tail when ``cfg.reuse``. Every adapter layer >= s: *frozen bottom*, the
        plain q-schedule with layers < s run once per example (captured, cached) and every ZO pass only the tail.
        """
        spec = self.spec
        if split_layer != getattr(self, "split_layer", None):
            self._states.clear()  # captures belong to one split layer
            self._states_bytes = 0
        self.split_layer = split_layer
        self.mode, self.splitter = "full", None
        split = None
        if split_layer is not None:
            if not 0 < split_layer < spec.dims.n_layers:
                raise ValueError(f"split layer must be in 1..{spec.dims.n_layers - 1}, got {split_layer}")
            split = spec.layer_offset(split_layer)
            if split == spec.d:
                raise ValueError(f"split layer {split_layer} is above every adapter layer {spec.layers}: block 2 would be empty")
            if self.cfg.reuse:
                if split_layer not in self._splitters:
                    self._splitters[split_layer] = SplitRunner(self.rt, self.adapter, split_layer, self.spec.unflatten(self.theta, self.frozen))
                self.splitter = self._splitters[split_layer]
                self.mode = "frozen" if split == 0 else "split"
            if split == 0:
                split = None  # frozen bottom: all of θ is block 2, the plain schedule runs on the tail
        self.zo_cfg = ZOConfig(q=q, split=split, p1=p1, p2=p2, lam=self.cfg.lam)

    @property
    def passes(self) -> dict[str, int]:
        """llama.cpp decodes this trainer ran, counted by the runtimes: full forwards, captures, tail passes."""
        out = {"forward": self.rt.passes["forward"], "capture": self.rt.passes["capture"], "tail": 0}
        out["tail"] = sum(sp.tail.passes["embd"] for sp in self._splitters.values())
        return out

    def _trainable(self, name: str) -> bool:
        return any(i.gguf_name == name and i.trainable for i in self.spec.tensors)

    # ---- one step -----------------------------------------------------------------------------------
    def batch(self, step: int) -> list[Encoded]:
        idx = batch_indices(len(self.train_set), self.batch_size, step, self.cfg.seed)
        return [self.train_set[i] for i in idx]

    def loss_at(self, theta: np.ndarray, batch: list[Encoded]) -> float:
        """Loss of ``batch`` with θ written in place into llama.cpp's adapter (frozen bottom: the tail's)."""
        if self.mode == "frozen":
            return self._tail_loss(self._frozen_states(batch), theta, batch)
        self.adapter.write(theta)
        return self.task.loss(batch)

    def _tail_loss(self, states: list[np.ndarray], theta_tail: np.ndarray, batch: list[Encoded]) -> float:
        self.splitter.write_tail(theta_tail)
        return self.task.loss_from(self.splitter.tail_logits(batch, states, self.task.cols), batch)

    def _frozen_states(self, batch: list[Encoded]) -> list[np.ndarray]:
        """States after layer s-1 per example; layers < s hold no adapter, so they are captured once and kept
        (up to CAPTURE_CACHE_MB, then the oldest are dropped and captured again when needed)."""
        missing = [e for e in batch if e.tokens not in self._states]
        if missing:
            for e, h in zip(missing, self.splitter.capture(missing), strict=True):
                self._states[e.tokens] = h
                self._states_bytes += h.nbytes
            while self._states_bytes > CAPTURE_CACHE_MB * 2**20 and len(self._states) > len(batch):
                old = next(iter(self._states))
                self._states_bytes -= self._states.pop(old).nbytes
        return [self._states[e.tokens] for e in batch]

    def _head_tail(self, batch: list[Encoded]):
        """(head, tail) for a split step with reuse: the head captures at θ1, the tail runs from the capture."""
        split, theta = self.zo_cfg.split, self.theta

        def head(t1: np.ndarray) -> list[np.ndarray]:
            self.adapter.write(np.concatenate([t1, theta[split:]]))  # block 2's values are never reached
            return self.splitter.capture(batch)

        def tail(states: list[np.ndarray], t2: np.ndarray) -> float:
            return self._tail_loss(states, t2, batch)

        return head, tail

    def train_step(self, guide: Guide | None = None, lam: Lambda | None = None) -> tuple[StepRecord, StepInfo]:
        """Measure one ZO step on this step's mini-batch, apply it (protocol.zo.apply_step), advance."""
        t = self.step
        batch = self.batch(t)
        cfg = self.zo_cfg if lam is None else ZOConfig(self.zo_cfg.q, self.zo_cfg.split, self.zo_cfg.p1, self.zo_cfg.p2, lam)
        sub = guide is not None and guide.subspace
        if sub:
            if cfg.split is not None:
                raise ValueError("a subspace round cannot use the split schedule (split_layer): use kind 'guided'")
            cfg = ZOConfig(q=cfg.q)  # λ plays no part in a subspace step
            if self.subspace is None or self.subspace.guide is not guide:
                self.subspace = SubspaceState(self.theta, guide)
        n_seeds = cfg.q if cfg.split is None else cfg.p1 * (1 + cfg.p2)
        seeds = step_seeds(self.seed_base or self.cfg.seed, t, n_seeds, self.seed_pool, self.pool_base)
        head_tail = self._head_tail(batch) if self.mode == "split" and cfg.split is not None else None
        record, info = zo_measure(lambda th: self.loss_at(th, batch), self.theta, self.schedule.eps_at(t), seeds, cfg,
                                  guide, head_tail)
        self.rejected += info.rejected
        if sub:
            # ε·U·u moves θ along the subspace: L± measured at θ ± ε U u = θ_t + U(c ± ε u).
            self.subspace.apply(record, t, self.schedule)
            self.theta[...] = self.subspace.theta()
        else:
            apply_step(self.theta, self.velocity, record, t, self.schedule, guide)
        self.adapter.write(self.theta)
        self.step += 1
        return record, info

    def set_theta(self, theta: np.ndarray, step: int | None = None) -> None:
        """Adopt θ from the cloud (start of a federated round): momentum and c-space state restart at zero,
        as in replay."""
        theta = np.asarray(theta, np.float32)
        if theta.shape != self.theta.shape:
            raise ValueError(f"θ has shape {theta.shape}, adapter expects {self.theta.shape}")
        self.theta[...] = theta
        if self.velocity is not None:
            self.velocity[...] = 0.0
        self.subspace = None
        if step is not None:
            self.step = int(step)
        self.adapter.write(self.theta)

    def set_seed(self, seed: int) -> None:
        """The run seed (batches and perturbation seeds derive from it): a federated device takes one of its own."""
        from dataclasses import replace

        self.cfg = replace(self.cfg, seed=int(seed))

    def begin_round(self, theta: np.ndarray, schedule: Schedule, first_step: int, hyper: dict | None = None) -> None:
        """Start a federated round: θ_t, the round's schedule and its global step index (what replay uses).

        ``hyper`` (the round's ``Hyper``): q, batch, seed_base, seed_pool and the split (split_layer < 0: none;
        p1, p2) replace this trainer's own settings for the round; a key left out keeps the trainer's value. The
        round's seed pool (if any) is drawn from ``first_step``, shared by every client of the round.
        """
        if hyper:
            split = hyper.get("split_layer", self.cfg.split_layer)
            split = None if split is None or split < 0 else int(split)
            self.set_shape(q=int(hyper.get("q") or self.zo_cfg.q), split_layer=split,
                           p1=int(hyper.get("p1") or self.cfg.p1), p2=int(hyper.get("p2") or self.cfg.p2))
            self.batch_size = int(hyper.get("batch") or self.batch_size)
            self.seed_base = int(hyper.get("seed_base") or 0)
            self.seed_pool = int(hyper.get("seed_pool") or 0)
        self.pool_base = int(first_step)
        self.schedule = schedule
        self.velocity = np.zeros_like(self.theta) if schedule.momentum else None
        self.set_theta(theta, first_step)

    # ---- evaluation / output ------------------------------------------------------------------------
    def evaluate(self, data: list[Encoded], batch_size: int | None = None) -> dict:
        bs = batch_size or self.cfg.batch_size
        self.adapter.write(self.theta)
        return self.task.evaluate([data[i : i + bs] for i in range(0, len(data), bs)])

    def tensors(self) -> dict[str, np.ndarray]:
        return self.spec.unflatten(self.theta, self.frozen)

    def save_adapter(self, path: str | os.PathLike) -> None:
        write = write_control_gguf if self.spec.kind == "control" else write_adapter_gguf
        write(path, self.spec, self.tensors(), self.rt.arch)

    def save_checkpoint(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Atomic checkpoint (convert.atomic): θ, velocity, frozen tensors, step, config, spec (npz)."""
        meta = {
            "version": CKPT_VERSION,
            "step": self.step,
            "rejected": self.rejected,
            "config": asdict(self.cfg),
            "spec": self.spec.to_dict(),
            "extra": extra or {},
        }
        arrays = {"theta": self.theta, "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
        if self.velocity is not None:
            arrays["velocity"] = self.velocity
        for k, v in self.frozen.items():
            arrays["frozen/" + k] = v
        with atomic_open(path) as f:
            np.savez(f, **arrays)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore θ, velocity, frozen tensors and step; refuses a checkpoint of another run shape."""
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("version") != CKPT_VERSION:
                raise ValueError(f"checkpoint {path} has version {meta.get('version')}, expected {CKPT_VERSION}")
            if AdapterSpec.from_dict(meta["spec"]) != self.spec:
                raise ValueError(f"checkpoint {path} is for another adapter spec: {meta['spec']}")
            theta = z["theta"]
            if theta.shape != self.theta.shape:
                raise ValueError(f"checkpoint θ has shape {theta.shape}, expected {self.theta.shape}")
            self.theta[...] = theta
            if self.velocity is not None:
                self.velocity[...] = z["velocity"] if "velocity" in z else 0.0
            for k in list(self.frozen):
                self.frozen[k] = z["frozen/" + k].copy()
        self.step = int(meta["step"])
        self.rejected = int(meta.get("rejected", 0))
        self.adapter.write_tensors(self.frozen)
        self.adapter.write(self.theta)
        return meta

    def close(self) -> None:
        for sp in self._splitters.values():
            sp.close()
        self._splitters.clear()
        self.adapter.close()


def run_local_steps(trainer: Trainer, n_steps: int, guide: Guide | None = None, lam: Lambda | None = None) -> list[StepRecord]:
    """N local steps under one guide (federated round): the StepRecords to upload, θ updated in ``trainer``.

    The cloud replays them with ``protocol.zo.replay(θ_start, records, schedule, guide, first_step)``,
    where first_step is ``trainer.step`` before the call.
    """
    return [trainer.train_step(guide, lam)[0] for _ in range(n_steps)]


def train_loop(
    trainer: Trainer,
    out: str | os.PathLike,
    eval_set: list[Encoded] | None = None,
    eval_every: int = 0,
    ckpt_path: str | os.PathLike | None = None,
    ckpt_every: int = 0,
    progress: bool = True,
    log: list[dict] | None = None,
) -> list[dict]:
    """Train to ``trainer.cfg.steps`` (from ``trainer.step``), with periodic eval and checkpoints; write ``out``."""
    from tqdm import tqdm

    history = log if log is not None else []
    total = trainer.cfg.steps
    bar = tqdm(total=total, initial=trainer.step, disable=not progress, dynamic_ncols=True, unit="step")
    ema = None
    t0 = time.perf_counter()
    start = trainer.step
    while trainer.step < total:
        _, info = trainer.train_step()
        if not info.rejected:
            ema = info.loss if ema is None else 0.9 * ema + 0.1 * info.loss
        done = trainer.step - start
        entry = {"step": trainer.step, "loss": info.loss, "rejected": info.rejected, "rss_mb": round(peak_rss_mb(), 1)}
        if info.rejected:
            entry["reason"] = info.reason
            bar.write(f"step {trainer.step}: rejected ({info.reason})")
        if eval_set and eval_every and (trainer.step % eval_every == 0 or trainer.step == total):
            entry["eval"] = trainer.evaluate(eval_set)
            bar.write(f"step {trainer.step}: eval {json.dumps(entry['eval'])}")
        history.append(entry)
        bar.set_postfix(loss=f"{ema:.4f}" if ema is not None else "nan", sps=f"{done / (time.perf_counter() - t0):.2f}", rss=f"{peak_rss_mb():.0f}M")
        bar.update(1)
        if ckpt_path and ckpt_every and (trainer.step % ckpt_every == 0 or trainer.step == total):
            trainer.save_checkpoint(ckpt_path)
    bar.close()
    trainer.save_adapter(out)
    return history
