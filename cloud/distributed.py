"""The cloud's public-data backprop past one process: data parallel over ``torch.distributed`` ranks.

Each rank holds the same model and θ and takes a contiguous share of the mini-batch; its gradient of the mean
loss over its share, scaled by share/batch, is summed over ranks with one ``all_reduce`` (what DDP's bucketed
all-reduce does for this single flat LoRA parameter), so every rank gets the gradient of the mean loss over the
whole batch: the single-process gradient within float tolerance. gloo on CPU, NCCL on GPU; launch with torchrun:

    torchrun --nproc-per-node 2 -m cloud.distributed --model HF_DIR --out grad.npz   # a check: prints both
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def init(backend: str | None = None) -> tuple[int, int]:
    """(rank, world) after ``init_process_group`` from torchrun's environment (gloo on CPU, NCCL on CUDA)."""
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return dist.get_rank(), dist.get_world_size()


class DataParallelScorer:
    """A :class:`cloud.model.TorchScorer` whose ``gradient`` is data parallel over the process group; the rest
    (loss values, margins) is the wrapped scorer's, on the full batch."""

    def __init__(self, scorer) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: launch with torchrun, call cloud.distributed.init()")
        self.scorer = scorer
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

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
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out = buf.numpy()
        return out[:-1].astype(np.float32), float(out[-1])


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
