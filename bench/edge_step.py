"""Cost of one edge ZO step vs inference, and vs torch MeZO / torch LoRA backprop, on SmolLM2 + Rotten Tomatoes.

    python bench/edge_step.py --model M.gguf --steps 300 --json out.json [--no-torch]

Each measurement runs in its own child process (so peak RSS is per workload):
  infer       llama.cpp forward of the batch (no adapter), median time, peak RSS
  zo          edgezo ZO training steps (q=1: two forwards + in-place writes + update), median step time,
              peak RSS, RSS trace
  torch_mezo  fp32 torch (weights dequantized from the GGUF by transformers), same LoRA, MeZO step
  torch_bp    same model, LoRA backprop + AdamW step
Ratios: zo_step / (2 × forward), zo peak RSS / infer peak RSS, RSS drift over the run, torch_mezo / zo.
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


CHILDREN = {"infer": child_infer, "zo": child_zo, "torch_mezo": child_torch_mezo, "torch_bp": child_torch_bp}


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
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.model = a.model or default_model()
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return
    res: dict = {"args": {k: v for k, v in vars(a).items() if k != "child"}}
    names = ["infer", "zo"] + ([] if a.no_torch else ["torch_mezo", "torch_bp"])
    for name in names:
        cmd = [sys.executable, __file__, "--child", name] + [x for x in sys.argv[1:] if x != "--no-torch"]
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
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
