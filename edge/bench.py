"""``edgezo bench forward`` and ``edgezo bench step``: the model benchmarks a user runs on their own device,
printing a table and writing JSON (``app.benches`` puts them under ``edgezo bench`` with the others).

    edgezo bench forward [--quants q8_0,q4_0,q4_1] [--model M.gguf] [--data D.csv] [--json out.json]
    edgezo bench step [--model M.gguf] [--split-layer S] [--json out.json]

``forward`` times the edge's loss evaluation (one multi-sequence decode, logits only at the label positions,
LoRA r8 on q/v attached, as during training) per quantization type. Each type is converted once from the model
(default: the packaged SmolLM2 Q4_1) and cached (edge.models.fast_model); each is timed in its own child process,
in turns, so that load changes on a shared machine hit every type alike. Figures are ratios to the first type of
the same run. No torch is needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Review-like texts for a default batch when no --data is given (the edge install ships no corpus).
SAMPLE_TEXTS = [
    "A wonderful, moving film with a cast that makes every scene count.",
    "Dull and far too long; I checked my watch more than once.",
    "The plot makes no sense, but the photography is beautiful.",
    "Quietly brilliant acting and a script that trusts its audience.",
    "A waste of two hours and a fine actor.",
    "Funny, warm and surprisingly sharp about families.",
    "It starts strong, then loses its nerve in the last act.",
    "One of the best thrillers of the year, tense from start to finish.",
]


def add_commands(bs: argparse._SubParsersAction) -> None:
    """Add ``forward`` and ``step`` to the ``edgezo bench`` sub-parsers ``bs``."""
    f = bs.add_parser("forward", help="forward time per quantization type (which type to train on)",
                      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--quants", default="q8_0,q4_0,q4_1", help="comma list; the first is the baseline")
    f.add_argument("--model", default=None, help="source GGUF (default: the packaged SmolLM2 Q4_1)")
    f.add_argument("--data", default=None, help="CSV/JSONL of texts for the batch (default: built-in samples)")
    f.add_argument("--batch", type=int, default=16)
    f.add_argument("--reps", type=int, default=3, help="forwards per child")
    f.add_argument("--rounds", type=int, default=3, help="round-robin passes over the types")
    f.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: this process's cores)")
    f.add_argument("--json", default=None, help="write the results here")
    f.set_defaults(handler=cmd_forward)
    s = bs.add_parser("step", help="one ZO training step ÷ two forwards of the same batch, and peak RSS",
                      description="Times edgezo's ZO step (q = 1: two forwards, in-place adapter writes, the update) "
                                  "against two plain forwards of the same batch, interleaved in one process; "
                                  "with --split-layer, the split step with reuse against the same step without.")
    s.add_argument("--model", default=None, help="GGUF (default: the packaged SmolLM2 converted to Q4_0, cached)")
    s.add_argument("--data", default=None, help="CSV/JSONL of texts for the batch (default: built-in samples)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--steps", type=int, default=10, help="timed steps (each followed by a timed forward)")
    s.add_argument("--split-layer", type=int, default=None, help="also time the split step at this layer")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--json", default=None)
    s.set_defaults(handler=cmd_step)


def _texts(data: str | None, n: int) -> list[str]:
    if data is None:
        return [SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)] for i in range(n)]
    from edge.data import load_rows

    rows = load_rows(data).rows
    if not rows:
        raise ValueError(f"{data} has no rows with text")
    return [rows[i % len(rows)].text for i in range(n)]


def time_forward(model: str, texts: list[str], reps: int, threads: int) -> dict:
    """Seconds of ``reps`` loss evaluations of one batch (after a warm-up), peak RSS, file size."""
    from edge.adapter import LoraAdapter
    from edge.data import Row
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import ClassificationTask
    from edge.train import peak_rss_mb
    from protocol.spec import AdapterSpec

    rt = Runtime(model, RuntimeConfig(n_ctx=4096, n_seq_max=max(len(texts), 1), n_threads=threads))
    task = ClassificationTask(rt, {"neg": "negative", "pos": "positive"})
    batch = [task.encode(Row(t, "pos")) for t in texts]
    spec = AdapterSpec("lora", rt.dims(), rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    adapter = LoraAdapter(rt, spec, spec.init(0))
    task.loss(batch)  # warm-up: graph allocation, page-in of the mapping
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        task.loss(batch)
        times.append(time.perf_counter() - t)
    out = {"forward_s": times, "peak_rss_mb": peak_rss_mb(), "file_mb": Path(model).stat().st_size / 2**20,
           "tokens": sum(len(e.tokens) for e in batch)}
    adapter.close()
    rt.close()
    return out


def forward_table(res: dict[str, dict], quants: list[str]) -> None:
    """Add median_s and ratio_to_baseline (÷ the first type) to ``res`` and print the table."""
    base = statistics.median(res[quants[0]]["forward_s"])
    print(f"{'type':8} {'forward s':>10} {'÷ ' + quants[0]:>10} {'peak MB':>8} {'file MB':>8}")
    for q in quants:
        med = statistics.median(res[q]["forward_s"])
        res[q].update(median_s=med, ratio_to_baseline=med / base)
        print(f"{q:8} {med:10.3f} {med / base:10.3f} {res[q]['peak_rss_mb']:8.0f} {res[q]['file_mb']:8.1f}")


def cmd_forward(args: argparse.Namespace) -> int:
    from convert.errors import ConvertError
    from edge.data import DataError
    from edge.models import fast_model, smollm2_path
    from edge.runtime import RuntimeErrorEZ

    quants = [q.strip().lower() for q in args.quants.split(",") if q.strip()]
    try:
        from convert.quantize import QUANT_TYPES

        bad = [q for q in quants if q not in QUANT_TYPES]
        if not quants or bad:
            raise ValueError(f"--quants: unknown types {bad or quants}; choose from {sorted(QUANT_TYPES)}")
        if args.batch < 1 or args.reps < 1 or args.rounds < 1:
            raise ValueError("--batch, --reps and --rounds must be >= 1")
        src = Path(args.model) if args.model else smollm2_path()
        texts = _texts(args.data, args.batch)
        models = {}
        for q in quants:
            same = src.name.upper().endswith(f".{q.upper()}.GGUF")
            models[q] = str(src if same else fast_model(src, q))
    except (ValueError, OSError, RuntimeErrorEZ, ConvertError, DataError) as e:
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 2
    res: dict[str, dict] = {q: {"forward_s": [], "peak_rss_mb": 0.0, "model": models[q]} for q in quants}
    job = json.dumps({"texts": texts, "reps": args.reps, "threads": args.threads})
    for r in range(args.rounds):
        for q in quants:
            p = subprocess.run([sys.executable, "-m", "edge.bench", models[q]], input=job, capture_output=True,
                               text=True)
            if p.returncode != 0:
                print(f"edgezo: error: timing {q} failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            c = json.loads(p.stdout.strip().splitlines()[-1])
            res[q]["forward_s"] += c["forward_s"]
            res[q]["peak_rss_mb"] = max(res[q]["peak_rss_mb"], c["peak_rss_mb"])
            res[q].update(file_mb=round(c["file_mb"], 1), tokens=c["tokens"])
            print(f"round {r + 1}/{args.rounds} {q}: {statistics.median(c['forward_s']):.3f} s", file=sys.stderr,
                  flush=True)
    forward_table(res, quants)
    fastest = min(quants, key=lambda q: res[q]["median_s"])
    print(f"fastest here: {fastest} (tokens per batch: {res[quants[0]]['tokens']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"baseline": quants[0], "batch": args.batch, "threads": args.threads,
                                               "fastest": fastest, "types": res}, indent=1))
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    """Interleaved medians in one process: ZO step vs 2 forwards (and the split step with/without reuse)."""
    from edge.data import Row
    from edge.models import fast_model
    from edge.runtime import Runtime, RuntimeConfig, RuntimeErrorEZ
    from edge.tasks import ClassificationTask
    from edge.train import TrainConfig, Trainer, peak_rss_mb
    from protocol.spec import AdapterSpec

    try:
        if args.batch < 1 or args.steps < 1:
            raise ValueError("--batch and --steps must be >= 1")
        model = args.model or str(fast_model())
        texts = _texts(args.data, args.batch)

        def trainer(split: int | None, reuse: bool = True) -> Trainer:
            rt = Runtime(model, RuntimeConfig(n_ctx=4096, n_seq_max=args.batch, n_threads=args.threads))
            task = ClassificationTask(rt, {"neg": "negative", "pos": "positive"})
            data = [task.encode(Row(t, "pos" if i % 2 else "neg")) for i, t in enumerate(texts)]
            spec = AdapterSpec("lora", rt.dims(), rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
            return Trainer(rt, task, data, spec, TrainConfig(batch_size=args.batch, lr=1e-3, eps=1e-2,
                                                             split_layer=split, reuse=reuse))

        runs = {"zo_step": trainer(None)}
        if args.split_layer is not None:
            runs.update(split_reuse=trainer(args.split_layer), split_no_reuse=trainer(args.split_layer, False))
    except (ValueError, OSError, RuntimeErrorEZ) as e:
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 2
    base = runs["zo_step"]
    times: dict[str, list[float]] = {k: [] for k in [*runs, "forward"]}
    for tr in runs.values():
        tr.train_step()  # warm-up
    for _ in range(args.steps):
        for name, tr in runs.items():
            t = time.perf_counter()
            tr.train_step()
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        base.task.loss(base.batch(0))
        times["forward"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"model": model, "batch": args.batch, "median_s": med, "peak_rss_mb": peak_rss_mb(),
           "zo_step_over_2_forward": med["zo_step"] / (2 * med["forward"])}
    print(f"forward {med['forward']:.3f} s   ZO step {med['zo_step']:.3f} s   step ÷ 2 forwards "
          f"{res['zo_step_over_2_forward']:.2f}   peak RSS {res['peak_rss_mb']:.0f} MB")
    if args.split_layer is not None:
        res["split_reuse_over_no_reuse"] = med["split_reuse"] / med["split_no_reuse"]
        print(f"split at {args.split_layer}: {med['split_reuse']:.3f} s with reuse, {med['split_no_reuse']:.3f} s "
              f"without: {res['split_reuse_over_no_reuse']:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":  # the child: python -m edge.bench MODEL < {"texts", "reps", "threads"}
    job = json.loads(sys.stdin.read())
    print(json.dumps(time_forward(sys.argv[1], job["texts"], job["reps"], job["threads"])))
