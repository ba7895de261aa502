"""Edges built in process (the demo, the study): a llama.cpp Trainer per data slice, and θ's label margins.

The network client (edge.client) is what a device runs; these builders put edge trainers next to a guide in one
process, which only the application (and the benches) do.
"""

from __future__ import annotations

import os

import numpy as np

from edge.round_trainer import client_seed


def llama_trainer(*, gguf: str | os.PathLike, spec, texts: list[str], labels: list[int], name: str, batch: int,
                  q: int, lr: float, eps: float, threads: int, init_seed: int,
                  label_words: tuple[str, str] = ("negative", "positive"), split_layer: int | None = None):
    """(Trainer, Runtime) for a binary classification slice on a GGUF through llama.cpp (edge.train);
    ``split_layer``: the FedSPZO split / frozen bottom (edge/split.py)."""
    from edge.data import Row
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import ClassificationTask
    from edge.train import TrainConfig, Trainer

    rt = Runtime(gguf, RuntimeConfig(n_ctx=2048, n_seq_max=max(batch, 32), n_threads=threads))
    task = ClassificationTask(rt, {"neg": label_words[0], "pos": label_words[1]})
    enc = [task.encode(Row(t, "pos" if y else "neg")) for t, y in zip(texts, labels, strict=True)]
    cfg = TrainConfig(batch_size=batch, seed=client_seed(name) % (2**31), q=q, lr=lr, eps=eps, split_layer=split_layer)
    return Trainer(rt, task, enc, spec, cfg, tensors=spec.init(init_seed)), rt


def llama_margins(trainer, theta: np.ndarray, texts: list[str], batch: int) -> np.ndarray:
    """logit(positive) − logit(negative) per text with θ written into the trainer's llama.cpp adapter."""
    from edge.data import Row

    trainer.set_theta(theta)
    enc = [trainer.task.encode(Row(t, "neg")) for t in texts]
    out = [trainer.task.scores(enc[i : i + batch]) for i in range(0, len(enc), batch)]
    s = np.concatenate(out)
    return s[:, 1] - s[:, 0]
