"""Does edgezo's cloud term (λ = 1: θ ← θ − η·g_B, no ZO) move θ the way AdamW does on the same public batches?

    python bench/cloud_term.py --steps 8 --json runs/bench/cloud_term.json

Torch only (the cloud's fp32 copy of SmolLM2), the convergence study's data (bench/convergence.py): the same
public mini-batches in the same order for every rule, Rotten Tomatoes validation accuracy and positive rate
after every step. Rules:
  adamw         AdamW lr 1e-3 (β 0.9/0.999), the cloud-only arm's optimizer
  edgezo_cloud  the study's edgezo cloud term: g_B = mean of the last k = 4 Adam-preconditioned public
                gradients, each rescaled to its raw norm (cloud.guidance); lr 1 decaying linearly over 12 rounds
  rmsprop_mean  g_B without the rescaling (pure g/√v̂, mean of the last 4), lr 1e-3 constant
If the three track each other, a gap between edgezo and the cloud-only arm is about how many cloud steps each
gets, not about how the guidance is built.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

# bench/ holds scripts named like our packages (convert.py): keep it off sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

Rule = Callable[[np.ndarray, np.ndarray, int, dict], np.ndarray]  # (θ, g, step t ≥ 1, state) -> new θ


def _study():
    """bench/convergence.py as a module: its data slices and model source, so both scripts see the same data."""
    spec = importlib.util.spec_from_file_location("bench_convergence", Path(__file__).with_name("convergence.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_convergence"] = mod
    spec.loader.exec_module(mod)
    return mod


def adamw(theta: np.ndarray, g: np.ndarray, t: int, st: dict) -> np.ndarray:
    """One AdamW step (weight decay 0, as in the study), lr 1e-3."""
    st["m"] = st.get("m", 0.0) * 0.9 + 0.1 * g
    st["v"] = st.get("v", 0.0) * 0.999 + 0.001 * g * g
    return theta - 1e-3 * (st["m"] / (1 - 0.9**t)) / (np.sqrt(st["v"] / (1 - 0.999**t)) + 1e-8)


def guidance_rule(*, rescale: bool, lr: float, decay_rounds: float, k: int = 4) -> Rule:
    """θ ← θ − lr_t·g_B with g_B built as cloud.guidance builds it (rescale=True) or without the norm rescale."""
    from cloud.guidance import AdamPreconditioner

    def rule(theta: np.ndarray, g: np.ndarray, t: int, st: dict) -> np.ndarray:
        if "pre" not in st:
            st["pre"], st["hist"] = AdamPreconditioner(), collections.deque(maxlen=k)
        pre = st["pre"]
        if rescale:
            st["hist"].append(pre(g))
        else:
            pre(g)  # updates v̂ only
            st["hist"].append((g / (np.sqrt(pre.v / (1 - pre.beta2**pre.t)) + 1e-8)).astype(np.float32))
        g_b = np.mean(np.stack(st["hist"]), axis=0)  # (d,)
        return (theta - lr * (1 - (t - 1) / decay_rounds) * g_b).astype(np.float32)

    return rule


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="public mini-batches (steps) per rule")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="runs/bench/cloud_term.json")
    args = ap.parse_args()
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")

    import torch

    from cloud.model import ClassificationTask, LoRAModel, TorchScorer, accuracy, load_base, spec_for

    torch.set_num_threads(args.threads)
    conv = _study()
    cfg = conv.StudyConfig()
    data = conv.study_data(cfg)
    model, tok = load_base(conv.gguf_fp32_source(""))
    spec = spec_for(model, rank=cfg.rank, alpha=2.0 * cfg.rank, targets=("q_proj", "v_proj"), layers=(), train="AB")
    lora = LoRAModel(model=model, spec=spec, init_seed=0)
    scorer = TorchScorer(lora=lora, tokenizer=tok, task=ClassificationTask())
    theta0 = lora.get_theta().copy()
    batches = data["public"].batches(cfg.batch)
    val = data["val"]

    def val_point(theta: np.ndarray) -> list[float]:
        lora.set_theta(theta)
        m = scorer.margins(val.texts, 32)
        return [round(accuracy(m, val.labels), 3), round(float(np.mean(m > 0)), 2)]

    rules: dict[str, Rule] = {
        "adamw": adamw,
        "edgezo_cloud": guidance_rule(rescale=True, lr=1.0, decay_rounds=12),
        "rmsprop_mean": guidance_rule(rescale=False, lr=1e-3, decay_rounds=float("inf")),
    }
    res: dict[str, dict] = {}
    for name, rule in rules.items():
        rng = np.random.default_rng(0)  # the same batch order for every rule
        theta, state = theta0.copy(), {}
        points, losses = [val_point(theta)], []
        for t in range(1, args.steps + 1):
            g, loss = scorer.gradient(theta, *batches[int(rng.integers(len(batches)))])
            theta = rule(theta, g, t, state)
            points.append(val_point(theta))
            losses.append(round(loss, 4))
            print(f"{name} step {t}: public loss {loss:.4f}, val acc {points[-1][0]:.3f}, "
                  f"positive rate {points[-1][1]:.2f}", flush=True)
        res[name] = {"val_acc_positive_rate": points, "public_loss": losses}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "val_n": len(val), "rules": res}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
