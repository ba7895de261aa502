"""The cloud's public-data backprop past one process: data parallel over ``torch.distributed`` ranks.

Each rank holds the same model and θ and takes a contiguous share of the mini-batch; its gradient of the mean
loss over its share, scaled by share/batch, is summed over ranks with one ``all_reduce`` (what DDP's bucketed
all-reduce does for this single flat LoRA parameter), so every rank gets the gradient of the mean loss over the
whole batch: the single-process gradient within float tolerance. gloo on CPU, NCCL on GPU; launch with torchrun:

    torchrun --nproc-per-node 2 -m cloud.distributed --model HF_DIR --out grad.npz   # a check: prints both

The guide daemon under torchrun (``torchrun --nproc-per-node N -m app guide serve --config guide.toml``, see
``cloud.cli``) runs in lockstep: rank 0 is the whole daemon (TCP, SQLite, the CloudLead and its RNG) and its
scorer is a :class:`LeaderScorer`, which before each gradient broadcasts one small command (θ, the mini-batch's
texts and labels) on a gloo control group; ranks > 0 only :func:`follow`: build the same model, receive each
command, compute their share, join the ``all_reduce``; a STOP command (:func:`stop_followers`, sent when the
daemon ends, however it ends) lets them exit. Mini-batches are drawn on rank 0 only, so the guidance is the
single-process guidance within float tolerance. The control group waits up to :data:`CONTROL_TIMEOUT` for the
next command (a guide may sit idle between rounds for days).

A guide no launcher started (the Flower ServerApp, which Flower's SuperLink spawns; or the daemon without
torchrun) gets the same lockstep from ``[cloud] ranks = N`` in guide.toml: :class:`LocalRanks` starts N − 1
follower processes on this host (multiprocessing, spawn) and the calling process is rank 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Sequence
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(days=365)  # how long a follower waits for rank 0's next command
_STOP, _GRAD = "stop", "grad"
_control = None  # the gloo group the commands go over (new_group: every rank creates it, in the same order)
_lock = threading.Lock()  # one command + its gradient at a time on rank 0 (the lead runs on an executor thread)
_stopped = False


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several ranks (RANK, WORLD_SIZE > 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, **group) -> tuple[int, int]:
    """(rank, world) after ``init_process_group`` (``group``: its init_method, rank, world_size; none: torchrun's
    environment). gloo on CPU, NCCL on CUDA; with NCCL each rank uses the GPU numbered by its LOCAL_RANK."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, **group)
    return dist.get_rank(), dist.get_world_size()


def start(**group) -> tuple[int, int]:
    """:func:`init` plus the control group of the lockstep guide; every rank calls it once, first."""
    global _control, _stopped
    rank, world = init(**group)
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _stopped = False
    return rank, world


def _broadcast(cmd: tuple | None) -> tuple:
    box = [cmd]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


class DataParallelScorer:
    """A :class:`cloud.model.TorchScorer` whose ``gradient`` is data parallel over the process group; the rest
    (loss values, margins) is the wrapped scorer's, on the full batch."""

    def __init__(self, scorer) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: launch with torchrun, call cloud.distributed.init()")
        self.scorer = scorer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.backend = str(dist.get_backend())

    def __getattr__(self, name: str):
        return getattr(self.scorer, name)

    def gradient(self, theta: np.ndarray, texts: Sequence[str], labels: Sequence[int]) -> tuple[np.ndarray, float]:
        """(∇_θ mean loss over the whole batch (d,) float32, that loss), every rank computing its share."""
        n = len(texts)
        share = np.array_split(np.arange(n), self.world)[self.rank]
        if share.size:
            g, loss = self.scorer.gradient(theta, [texts[i] for i in share], [labels[i] for i in share])
        else:  # more ranks than examples: this rank adds nothing
            g, loss = np.zeros(np.asarray(theta).shape, np.float32), 0.0
        w = share.size / n
        buf = torch.from_numpy(np.concatenate([g.astype(np.float64) * w, [loss * w]]))
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            buf = buf.cuda()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out = buf.cpu().numpy()
        return out[:-1].astype(np.float32), float(out[-1])


class LeaderScorer(DataParallelScorer):
    """Rank 0's scorer in the lockstep guide: each ``gradient`` first tells the followers (θ, texts, labels),
    then runs data parallel with them. Needs :func:`start`."""

    def __init__(self, scorer) -> None:
        if _control is None:
            raise RuntimeError("cloud.distributed.start() was not called")
        super().__init__(scorer)
        if self.rank != 0:
            raise RuntimeError(f"LeaderScorer is rank 0's; this is rank {self.rank}")

    def gradient(self, theta: np.ndarray, texts: Sequence[str], labels: Sequence[int]) -> tuple[np.ndarray, float]:
        th = np.array(theta, np.float32, copy=True)
        texts, labels = [str(t) for t in texts], [int(y) for y in labels]
        with _lock:
            if _stopped:
                raise RuntimeError("the data-parallel followers were stopped")
            _broadcast((_GRAD, th, texts, labels))
            return super().gradient(th, texts, labels)


def stop_followers() -> None:
    """Rank 0: send STOP (once; later gradients raise). Followers that are already gone are not waited for."""
    global _stopped
    with _lock:
        if _stopped or _control is None:
            return
        _stopped = True
        try:
            _broadcast((_STOP,))
        except Exception:  # noqa: BLE001 - a follower died first: torchrun ends the job anyway
            pass


def follow(scorer, ignore: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Ranks > 0: compute a share of each gradient rank 0 announces until it sends STOP; returns how many.
    ``scorer`` None (this rank could not build the model): wait for STOP, fail on a gradient. The ``ignore``d
    signals (torchrun forwards SIGTERM / SIGINT to every rank) do not end it: rank 0 stops the daemon cleanly and
    then sends STOP."""
    if _control is None:
        raise RuntimeError("cloud.distributed.start() was not called")
    for sig in ignore:
        signal.signal(sig, signal.SIG_IGN)
    dp = DataParallelScorer(scorer) if scorer is not None else None
    n = 0
    while True:
        cmd = _broadcast(None)
        if cmd[0] == _STOP:
            return n
        if dp is None:
            raise RuntimeError(f"rank {dist.get_rank()} has no model: cannot compute its share of a gradient")
        dp.gradient(*cmd[1:])
        n += 1


def shutdown() -> None:
    """Destroy the process group (every rank, at the end)."""
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_follower(rank: int, world: int, port: int, parent: int, model_kwargs: dict, seed: int) -> None:
    """A :class:`LocalRanks` child: join the group, build the model, follow rank 0; exit when the parent dies."""
    import time

    def watchdog() -> None:  # a parent killed -9 never sends STOP
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()
    os.environ["LOCAL_RANK"] = str(rank)
    start(init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from cloud.model import build_scorer

        torch.manual_seed(seed)
        scorer = build_scorer(**model_kwargs)[1]
        follow(scorer, ignore=(signal.SIGINT,))  # SIGINT reaches the whole terminal group; rank 0 handles it
    finally:
        shutdown()


class LocalRanks:
    """Ranks 1..world−1 as child processes of this one, which becomes rank 0 of a new process group (loopback
    TCP rendezvous); each child builds the model from ``model_kwargs`` (cloud.model.build_scorer's) after
    ``torch.manual_seed(seed)``, then follow (:func:`follow`). :meth:`close` sends STOP and reaps them (also on
    interpreter exit: the children are daemonic; and a child whose parent died exits by itself)."""

    def __init__(self, world: int, model_kwargs: dict, seed: int) -> None:
        import multiprocessing as mp

        if world < 2:
            raise ValueError(f"LocalRanks needs world >= 2, got {world}")
        if dist.is_initialized():
            raise RuntimeError("a process group already exists (torchrun?): local ranks would be a second one")
        port, ctx = _free_port(), mp.get_context("spawn")
        self.procs = [ctx.Process(target=_local_follower, args=(r, world, port, os.getpid(), model_kwargs, seed),
                                  name=f"edgezo-rank-{r}", daemon=True) for r in range(1, world)]
        for p in self.procs:
            p.start()
        try:
            start(init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world)
        except BaseException:
            self._reap(0.0)
            raise
        self.world = world

    def _reap(self, timeout: float) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(5.0)

    def close(self) -> None:
        """STOP the followers, leave the group, wait for them (killed after 60 s)."""
        stop_followers()
        shutdown()
        self._reap(60.0)


class WithRanks:
    """A guidance source whose :meth:`close` also closes its :class:`LocalRanks` (the daemon and the Flower
    ServerApp close their source when they end); everything else is the source's."""

    def __init__(self, source, ranks: LocalRanks) -> None:
        self.source, self.ranks = source, ranks

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def close(self) -> None:
        try:
            self.source.close()
        finally:
            self.ranks.close()


def main(argv: list[str] | None = None) -> int:
    """torchrun check: the data-parallel gradient on rank 0 vs the single-process one, written to --out."""
    from cloud.model import ClassificationTask, LoRAModel, TorchScorer, load_base, spec_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF folder (or GGUF) of the base model")
    ap.add_argument("--out", required=True, help="npz with the distributed and the single-process gradient")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    rank, world = init()
    torch.manual_seed(0)
    model, tok = load_base(a.model)
    spec = spec_for(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"), layers=(), train="AB")
    lora = LoRAModel(model=model, spec=spec, init_seed=0)
    scorer = TorchScorer(lora=lora, tokenizer=tok, task=ClassificationTask())
    rng = np.random.default_rng(0)
    theta = (lora.get_theta() + 0.01 * rng.standard_normal(spec.d)).astype(np.float32)  # B ≠ 0: A has gradient
    words = ["a fine film", "dull and long", "moving, funny and warm", "a boring mess of a plot", "superb",
             "tedious", "clever", "I hated every minute of it"]
    texts = [words[i % len(words)] + f" #{i}" for i in range(a.batch)]
    labels = [i % 2 for i in range(a.batch)]
    g_dp, loss_dp = DataParallelScorer(scorer).gradient(theta, texts, labels)
    if rank == 0:
        g_one, loss_one = scorer.gradient(theta, texts, labels)
        np.savez(a.out, dp=g_dp, single=g_one, loss_dp=loss_dp, loss_single=loss_one, world=world)
        rel = float(np.linalg.norm(g_dp - g_one) / np.linalg.norm(g_one))
        print(f"world {world}: relative difference {rel:.2e}, loss {loss_dp:.6f} vs {loss_one:.6f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
