"""Which quantization type gives the fastest edge forward? One batch of 16 Rotten Tomatoes snippets, SmolLM2-135M.

    python bench/forward_speed.py --quants q8_0,q4_0,iq4_nl,q4_k_m,q4_1 --cache runs/conv --json out.json

Each type is converted once from the packaged Q4_1 (GGUF → HF fp32 → type, cached in ``--cache``) and timed in
its own child process, in turns (round-robin, ``--rounds`` times) so that load changes on a shared machine hit
every type alike. Reported: median forward seconds per type and the ratio to the first type of ``--quants``
(the baseline of the same run). The forward is the edge's loss evaluation: one multi-sequence decode, logits
only at the 16 target positions, LoRA r8 on q/v loaded (as during training).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/ holds scripts named like our packages (convert.py): keep it off sys.path, load siblings by path
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, _HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def child(a) -> dict:
    """Time ``a.reps`` forwards of the batch on ``a.model`` (after one warm-up)."""
    from edge.adapter import LoraAdapter
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import ClassificationTask
    from edge.train import peak_rss_mb
    from protocol.spec import AdapterSpec

    rows = _sibling("edge_step").examples(a.batch)
    rt = Runtime(a.model, RuntimeConfig(n_ctx=2048, n_seq_max=a.batch, n_threads=a.threads))
    task = ClassificationTask(rt, {"fresh": "positive", "rotten": "negative"})
    batch = [task.encode(r) for r in rows]
    spec = AdapterSpec("lora", rt.dims(), rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    adapter = LoraAdapter(rt, spec, spec.init(0))
    task.loss(batch)  # warm-up: graph allocation, page-in of the mmap
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        task.loss(batch)
        times.append(time.perf_counter() - t)
    adapter.close()
    rt.close()
    return {"forward_s": times, "peak_rss_mb": peak_rss_mb(), "file_mb": Path(a.model).stat().st_size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quants", default="q8_0,q4_0,iq4_nl,q4_k_m,q4_1", help="first one is the baseline")
    ap.add_argument("--cache", default="runs/conv", help="where converted models are kept")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="forwards per child")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin passes over the types")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    edge_gguf = _sibling("convergence").edge_gguf
    quants = [q.strip() for q in a.quants.split(",") if q.strip()]
    Path(a.cache).mkdir(parents=True, exist_ok=True)
    models = {q: edge_gguf(q, Path(a.cache)) for q in quants}
    res: dict[str, dict] = {q: {"forward_s": [], "peak_rss_mb": 0.0} for q in quants}
    for r in range(a.rounds):
        for q in quants:
            cmd = [sys.executable, __file__, "--child", "--model", models[q], "--batch", str(a.batch),
                   "--reps", str(a.reps), "--threads", str(a.threads)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
            c = json.loads(out.strip().splitlines()[-1])
            res[q]["forward_s"] += c["forward_s"]
            res[q]["peak_rss_mb"] = max(res[q]["peak_rss_mb"], c["peak_rss_mb"])
            res[q]["file_mb"] = round(c["file_mb"], 1)
            print(f"round {r + 1}/{a.rounds} {q}: {statistics.median(c['forward_s']):.3f} s", flush=True)
    from edge.bench import forward_table  # the same table `edgezo bench forward` prints

    forward_table(res, quants)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "baseline": quants[0], "types": res}, indent=1))


if __name__ == "__main__":
    main()
