"""Cost of one edge ZO step vs inference, and vs torch MeZO / torch LoRA backprop, on SmolLM2 + Rotten Tomatoes.

    python bench/edge_step.py --model M.gguf --steps 300 --json out.json [--no-torch]

Each measurement runs in its own child process (so peak RSS is per workload):
  infer       llama.cpp forward of the batch (no adapter), median time, peak RSS
  zo          edgezo ZO training steps (q=1: two forwards + in-place writes + update), median step time,
              peak RSS, RSS trace
  torch_mezo  fp32 torch (weights dequantized from the GGUF by transformers), same LoRA, MeZO step
  torch_bp    same model, LoRA backprop + AdamW step
Ratios: zo_step / (2 × forward), zo peak RSS / infer peak RSS, RSS drift over the run, torch_mezo / zo.

FedSPZO activation reuse (edge/split.py), ``--split``: one child times, interleaved in the same process,
  tail        a block-2 tail pass from captured states at s = L/2 ÷ the full forward, next to the tail's FLOP share
  split       the split step (P1 = 1, P2 = 4, s = L/2) with reuse ÷ the same step with full forwards
  frozen      frozen bottom (adapter on layers >= s = 2L/3): a ZO step (q = 1) ÷ the full ZO step on the same
              layers, "cold" (each batch captured, first epoch) and "warm" (captures reused)
and two more children give peak RSS with the tail (split step) and without (plain ZO step).

    python bench/edge_step.py --split --model Q4_0.gguf --json docs/bench/edge_step_split_q4_0.json
"""

from __future__ import annotations

import argparse
import importlib.util  # noqa: E402
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# bench/ holds scripts named like our packages (e.g. convert.py): keep it off sys.path, load edge_learn by path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
_spec = importlib.util.spec_from_file_location("edge_learn", Path(__file__).resolve().parent / "edge_learn.py")
_learn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_learn)
default_model, rotten_tomatoes = _learn.default_model, _learn.rotten_tomatoes

from edge.data import shuffle_split  # noqa: E402
from edge.train import peak_rss_mb  # noqa: E402


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def examples(n: int):
    train, _ = shuffle_split(rotten_tomatoes(), seed=1234, eval_fraction=0.1, max_eval=500)
    return train[:n]


def child_infer(a) -> dict:
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import ClassificationTask

    rt = Runtime(a.model, RuntimeConfig(n_ctx=2048, n_seq_max=a.batch, n_threads=a.threads))
    task = ClassificationTask(rt, {"fresh": "positive", "rotten": "negative"})
    batch = [task.encode(r) for r in examples(a.batch)]
    task.loss(batch)
    times = []
    for _ in range(a.reps):
        t = time.perf_counter()
        task.loss(batch)
        times.append(time.perf_counter() - t)
    return {"forward_s": statistics.median(times), "forward_all_s": times, "tokens": sum(len(e.tokens) for e in batch),
            "peak_rss_mb": peak_rss_mb()}


def child_zo(a) -> dict:
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import ClassificationTask
    from edge.train import TrainConfig, Trainer
    from protocol.spec import AdapterSpec

    rt = Runtime(a.model, RuntimeConfig(n_ctx=2048, n_seq_max=a.batch, n_threads=a.threads))
    task = ClassificationTask(rt, {"fresh": "positive", "rotten": "negative"})
    batch = [task.encode(r) for r in examples(a.batch)]
    spec = AdapterSpec("lora", rt.dims(), rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    # batch_size == len(train_set): every step sees the same 16 examples (as the forward timing does)
    tr = Trainer(rt, task, batch, spec, TrainConfig(steps=a.steps, batch_size=a.batch, lr=1e-3, eps=1e-2))
    times, fwd, rss = [], [], []
    for i in range(a.steps):
        t = time.perf_counter()
        tr.train_step()
        times.append(time.perf_counter() - t)
        rss.append(current_rss_mb())
        if (i + 1) % 100 == 0:  # progress on stderr (passed through), so a long RSS run can be watched
            print(f"[zo] step {i + 1}: {statistics.median(times[-100:]):.3f} s/step, RSS {rss[-1]:.1f} MB",
                  file=sys.stderr, flush=True)
        if i % a.fwd_every == 0:  # interleaved plain forwards: same load conditions as the steps
            t = time.perf_counter()
            task.loss(batch)
            fwd.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:]), "forward_s": statistics.median(fwd), "step_all_s": times,
            "forward_all_s": fwd, "rss_trace_mb": rss, "peak_rss_mb": peak_rss_mb(), "d": spec.d}


def _torch_setup(a):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads or 2)
    p = Path(a.torch_model or a.model)
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    rows = examples(a.batch)
    prompts = [f"Review: {r.text}\nSentiment (positive or negative):" for r in rows]
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1
    cols = [tok(" positive")["input_ids"][0], tok(" negative")["input_ids"][0]]
    y = torch.tensor([0 if r.label == "fresh" else 1 for r in rows])
    # LoRA r=8 on q, v of every layer, A Kaiming-uniform, B = 0 (as the edge)
    lora = []
    for layer in model.model.layers:
        for mod in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            A = torch.empty(8, mod.in_features).uniform_(-mod.in_features**-0.5, mod.in_features**-0.5).requires_grad_()
            B = torch.zeros(mod.out_features, 8, requires_grad=True)
            mod.register_forward_hook(lambda m, i, o, A=A, B=B: o + 2.0 * (i[0] @ A.T) @ B.T)
            lora += [A, B]
    for p_ in model.parameters():
        p_.requires_grad_(False)

    def loss_fn():
        logits = model(**enc).logits[torch.arange(len(rows)), last][:, cols]
        return torch.nn.functional.cross_entropy(logits, y)

    return torch, model, lora, loss_fn, int(enc["input_ids"].numel())


def child_torch_mezo(a) -> dict:
    torch, _, lora, loss_fn, ntok = _torch_setup(a)
    eps, lr = 1e-2, 1e-3
    times = []
    with torch.inference_mode():
        for s in range(a.torch_reps + 1):
            t = time.perf_counter()
            g = torch.Generator().manual_seed(s)
            zs = [torch.randn(p.shape, generator=g) for p in lora]
            for p, z in zip(lora, zs, strict=True):
                p.add_(eps * z)
            lp = loss_fn()
            for p, z in zip(lora, zs, strict=True):
                p.sub_(2 * eps * z)
            lm = loss_fn()
            gr = float(lp - lm) / (2 * eps)
            for p, z in zip(lora, zs, strict=True):
                p.add_(eps * z - lr * gr * z)
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:]), "step_all_s": times, "padded_tokens": ntok, "peak_rss_mb": peak_rss_mb()}


def child_torch_bp(a) -> dict:
    torch, _, lora, loss_fn, ntok = _torch_setup(a)
    opt = torch.optim.AdamW(lora, lr=1e-4)
    times = []
    for _ in range(a.torch_reps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:]), "step_all_s": times, "padded_tokens": ntok, "peak_rss_mb": peak_rss_mb()}


def layer_flops(dims, n_tokens: int, ctx_len: int) -> float:
    """Forward FLOPs of one decoder layer for ``n_tokens`` tokens of sequences ``ctx_len`` long (mat-muls only)."""
    h, kv = dims.hidden, dims.n_kv_heads * (dims.head_dim or dims.hidden // dims.n_heads)
    proj = 2 * (h * h + 2 * h * kv + h * h + 3 * h * dims.intermediate)  # q, k, v, o, gate/up/down
    attn = 2 * 2 * h * ctx_len  # QKᵀ and AV per token, causal average ~ctx_len/2 each side of the factor 2
    return float(n_tokens * (proj + attn / 2))


def tail_flop_share(dims, n_vocab: int, batch, start: int) -> float:
    """FLOPs of layers start..L-1 + output head over those of the full forward (label positions only)."""
    n_tok = sum(len(e.tokens) for e in batch)
    mean_len = n_tok / len(batch)
    per_layer = layer_flops(dims, n_tok, int(mean_len))
    head = 2.0 * dims.hidden * n_vocab * len(batch)  # logits at one position per example
    return ((dims.n_layers - start) * per_layer + head) / (dims.n_layers * per_layer + head)


def _split_setup(a, *, layers=(), split_layer=None, reuse=True, q=1, n_train=None):
    from edge.runtime import Runtime, RuntimeConfig
    from edge.tasks import ClassificationTask
    from edge.train import TrainConfig, Trainer
    from protocol.spec import AdapterSpec

    rt = Runtime(a.model, RuntimeConfig(n_ctx=2048, n_seq_max=a.batch, n_threads=a.threads))
    task = ClassificationTask(rt, {"fresh": "positive", "rotten": "negative"})
    data = [task.encode(r) for r in examples(n_train or a.batch)]
    spec = AdapterSpec("lora", rt.dims(), rank=8, alpha=16.0, targets=("q_proj", "v_proj"), layers=layers)
    cfg = TrainConfig(steps=10**6, batch_size=a.batch, lr=1e-3, eps=1e-2, q=q, split_layer=split_layer,
                      p1=1, p2=4, reuse=reuse)
    return rt, task, data, Trainer(rt, task, data, spec, cfg)


def _interleave(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable, run round-robin ``reps`` times (after one warm-up each)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def child_split(a) -> dict:
    out: dict = {}
    # tail pass vs full forward, s = L/2
    rt, task, batch, tr = _split_setup(a, split_layer=None)
    L = rt.n_layer
    s = L // 2
    from edge.split import SplitRunner

    sp = SplitRunner(rt, tr.adapter, s, tr.tensors())
    states = sp.capture(batch)
    t = _interleave({"forward": lambda: task.loss(batch),
                     "tail": lambda: task.loss_from(sp.tail_logits(batch, states, task.cols), batch),
                     "capture": lambda: sp.capture(batch)}, a.reps)
    share = tail_flop_share(rt.dims(), rt.n_vocab, batch, s)
    out["tail"] = {"split_layer": s, "n_layers": L, "forward_s": t["forward"], "tail_s": t["tail"],
                   "capture_s": t["capture"], "tail_over_forward": t["tail"] / t["forward"],
                   "capture_over_forward": t["capture"] / t["forward"], "tail_flop_share": share,
                   "tail_ratio_over_flop_share": t["tail"] / t["forward"] / share}
    sp.close()
    tr.close()
    rt.close()
    # split step with reuse vs the same step with full forwards (two runtimes: one adapter per context)
    r1, _, _, reuse = _split_setup(a, split_layer=s, reuse=True)
    r2, _, _, plain = _split_setup(a, split_layer=s, reuse=False)
    t = _interleave({"reuse": reuse.train_step, "no_reuse": plain.train_step}, a.reps)
    out["split"] = {"split_layer": s, "p1": 1, "p2": 4, "step_reuse_s": t["reuse"], "step_no_reuse_s": t["no_reuse"],
                    "reuse_over_no_reuse": t["reuse"] / t["no_reuse"], "passes_reuse": reuse.passes,
                    "passes_no_reuse": plain.passes}
    for x in (reuse, plain):
        x.close()
    r1.close()
    r2.close()
    # frozen bottom at s = 2L/3 vs the full ZO step on the same adapter layers
    s3 = (2 * L) // 3
    layers = tuple(range(s3, L))
    n_train = a.batch * a.reps  # the first epoch: every batch is new, so every frozen step captures
    r1, _, _, frozen = _split_setup(a, layers=layers, split_layer=s3, n_train=n_train)
    r2, _, _, full = _split_setup(a, layers=layers, split_layer=None, n_train=n_train)
    cold = _interleave({"frozen": frozen.train_step, "full": full.train_step}, a.reps - 1)
    warm = _interleave({"frozen": frozen.train_step, "full": full.train_step}, a.reps)  # second epoch on
    out["frozen"] = {"split_layer": s3, "layers": [s3, L - 1],
                     "cold_step_s": cold["frozen"], "warm_step_s": warm["frozen"], "full_step_s": warm["full"],
                     "full_step_cold_s": cold["full"], "cold_over_full": cold["frozen"] / cold["full"],
                     "warm_over_full": warm["frozen"] / warm["full"], "passes_frozen": frozen.passes}
    for x in (frozen, full):
        x.close()
    r1.close()
    r2.close()
    return out


def child_rss_split(a) -> dict:
    """Peak RSS of split steps with reuse (base + tail model, capture context) at s = L/2."""
    rt, _, _, tr = _split_setup(a, split_layer=a.split_at or None)
    if tr.mode != "split":
        raise SystemExit("--split-at must split the adapter")
    for _ in range(a.rss_steps):
        tr.train_step()
    return {"peak_rss_mb": peak_rss_mb(), "passes": tr.passes}


def child_rss_plain(a) -> dict:
    """Peak RSS of plain ZO steps (no tail) on the same adapter."""
    rt, _, _, tr = _split_setup(a, split_layer=None)
    for _ in range(a.rss_steps):
        tr.train_step()
    return {"peak_rss_mb": peak_rss_mb(), "passes": tr.passes}


CHILDREN = {"infer": child_infer, "zo": child_zo, "torch_mezo": child_torch_mezo, "torch_bp": child_torch_bp,
            "split": child_split, "rss_split": child_rss_split, "rss_plain": child_rss_plain}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--torch-model", default=None, help="GGUF the torch baselines dequantize (default: --model)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--reps", type=int, default=10, help="forward repetitions for the inference timing")
    ap.add_argument("--torch-reps", type=int, default=5)
    ap.add_argument("--fwd-every", type=int, default=2, help="time a plain forward every N ZO steps (interleaved)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--split", action="store_true", help="time FedSPZO activation reuse (tail, split, frozen) instead")
    ap.add_argument("--split-at", type=int, default=15, help="split layer of the RSS children (default 15 = L/2)")
    ap.add_argument("--rss-steps", type=int, default=20, help="ZO steps of each RSS child")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.model = a.model or default_model()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return
    res: dict = {"args": {k: v for k, v in vars(a).items() if k != "child"}}
    if a.split:
        names = ["split", "rss_split", "rss_plain"] + ([] if a.no_torch else ["torch_mezo"])
    else:
        names = ["infer", "zo"] + ([] if a.no_torch else ["torch_mezo", "torch_bp"])
    for name in names:
        cmd = [sys.executable, __file__, "--child", name] + [x for x in sys.argv[1:] if x not in ("--no-torch", "--split")]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # the child's stderr shows progress
        if r.returncode != 0:
            res[name] = {"error": f"exit status {r.returncode} (its stderr is above)"}
            print(f"{name} failed with exit status {r.returncode}", file=sys.stderr)
            continue
        res[name] = json.loads(r.stdout.strip().splitlines()[-1])
        print(name, {k: v for k, v in res[name].items() if not k.endswith(("_all_s", "trace_mb"))}, flush=True)
    if "step_s" in res.get("zo", {}) and "forward_s" in res.get("infer", {}):
        zo, inf = res["zo"], res["infer"]
        tr = zo["rss_trace_mb"]
        i0 = min(100, len(tr) // 4)
        res["ratios"] = {
            "zo_step_over_2_forward": zo["step_s"] / (2 * zo["forward_s"]),  # interleaved, same process
            "zo_step_over_2_forward_separate_process": zo["step_s"] / (2 * inf["forward_s"]),
            "train_peak_rss_over_infer": zo["peak_rss_mb"] / inf["peak_rss_mb"],
            f"rss_drift_step{i0}_to_{len(tr)}": tr[-1] / tr[i0] - 1.0,
        }
        if "step_s" in res.get("torch_mezo", {}):
            res["ratios"]["torch_mezo_over_zo"] = res["torch_mezo"]["step_s"] / zo["step_s"]
        print(json.dumps(res["ratios"], indent=1))
    if "split" in res and "error" not in res["split"]:
        sp = res["split"]
        rows = {"tail_pass_over_forward": sp["tail"]["tail_over_forward"], "tail_flop_share": sp["tail"]["tail_flop_share"],
                "split_step_reuse_over_no_reuse": sp["split"]["reuse_over_no_reuse"],
                "frozen_step_over_full_cold": sp["frozen"]["cold_over_full"],
                "frozen_step_over_full_warm": sp["frozen"]["warm_over_full"]}
        if "peak_rss_mb" in res.get("rss_split", {}) and "peak_rss_mb" in res.get("rss_plain", {}):
            rows["peak_rss_tail_over_without"] = res["rss_split"]["peak_rss_mb"] / res["rss_plain"]["peak_rss_mb"]
        if "step_s" in res.get("torch_mezo", {}):
            tm = res["torch_mezo"]["step_s"]  # fp32 torch, 2 forwards, the same batch (not the same process)
            rows["torch_mezo_step_s"] = tm
            rows["torch_mezo_over_split_step_reuse"] = tm / sp["split"]["step_reuse_s"]
            rows["torch_mezo_over_frozen_step_warm"] = tm / sp["frozen"]["warm_step_s"]
            rows["torch_mezo_over_full_zo_step"] = tm / sp["frozen"]["full_step_s"]
        res["ratios"] = rows
        print(json.dumps(rows, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
