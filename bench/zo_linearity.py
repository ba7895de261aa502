"""How rough is the edge's loss, and which ε resolves a slope? MeZO directions vs a cloud-built subspace.

The loss a llama.cpp edge measures is deterministic but not smooth: activations are re-quantized inside every
quantized matmul, so L(θ + t·z) jumps by a roughly constant amount whatever the step t. A two-point estimate
(L+ − L−)/(2ε) only carries the slope when 2ε·|∇L·z| stands above that roughness. This bench measures both on
one private mini-batch, at the cloud's θ_0 (or θ_init):

* roughness σ_L: the std of L along a fine line θ + t·z minus its best straight-line fit (``--line`` points);
* the true slope ∇L·z from the fp32 torch twin (one backward pass on the same texts);
* for MeZO (z ~ N(0, I_d)) and subspace (z = U·u, U from ``cloud.lead.CloudLead.subspace``) directions and each
  ε: the measured g, the true g, and SNR = 2ε·|∇L·z| / σ_L.

    .venv/bin/python bench/zo_linearity.py --json docs/bench/zo_linearity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="runs/v2", help="the study's OUT (edge GGUF, cloud-s0.npz for θ_0)")
    ap.add_argument("--k", type=int, default=8, help="subspace size (each column costs one cloud gradient)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dirs", type=int, default=3, help="directions of each kind")
    ap.add_argument("--line", type=int, default=9, help="points on the line used for the roughness")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="write the figures here")
    args = ap.parse_args(argv)

    from app.local import llama_trainer
    from bench.convergence import StudyConfig, cloud_scorer, data_cache
    from cloud.lead import CloudLead, LeadConfig
    from protocol.zo import direction

    cfg = StudyConfig(threads=args.threads, batch=args.batch)
    out = Path(args.study)
    gguf = str(out / f"SmolLM2-135M-Instruct.{cfg.quant.upper()}.gguf")
    data = data_cache(cfg)
    spec, theta_init, scorer = cloud_scorer(cfg, 0)
    theta, where = theta_init, "theta_init"
    if (out / "cloud-s0.npz").exists():
        with np.load(out / "cloud-s0.npz") as z:
            theta, where = z["theta"].copy(), "theta_0 (cloud-s0.npz)"
    tr, rt = llama_trainer(gguf=gguf, spec=spec, texts=data["pooled"].texts, labels=data["pooled"].labels,
                           name="lin", batch=args.batch, q=1, lr=0.0, eps=1e-3, threads=args.threads, init_seed=0)
    batch = tr.batch(0)
    idx = [tr.train_set.index(e) for e in batch]
    texts = [data["pooled"].texts[i] for i in idx]
    labels = [data["pooled"].labels[i] for i in idx]
    t0 = time.perf_counter()
    grad, _ = scorer.gradient(theta, texts, labels)  # (d,) fp32 ∇L on the same 8 texts
    lead = CloudLead(scorer=scorer, public=data["public"], config=LeadConfig(k=args.k, batch=args.batch),
                     rng=np.random.default_rng(0), progress=False)
    lead.theta_init = theta_init
    basis, info = lead.subspace(theta)
    cloud_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)

    def loss(th: np.ndarray) -> float:
        return tr.loss_at(th.astype(np.float32), batch)

    def roughness(z: np.ndarray, span: float) -> float:
        ts = np.linspace(-span, span, args.line)
        ls = np.array([loss(theta + np.float32(t) * z) for t in ts])
        fit = np.polyval(np.polyfit(ts, ls, 1), ts)
        return float(np.std(ls - fit))

    rows = []
    kinds = {"mezo": (lambda s: direction(s, spec.d), (1e-3, 1e-2, 3e-2)),
             "subspace": (lambda s: (basis @ rng.standard_normal(basis.shape[1]).astype(np.float32)), (0.05, 0.1, 0.2))}
    for kind, (make, epss) in kinds.items():
        for j in range(args.dirs):
            z = make(1000 + j).astype(np.float32)
            true_g = float(grad.astype(np.float64) @ z)
            sigma = roughness(z, max(epss))
            for eps in epss:
                g = (loss(theta + np.float32(eps) * z) - loss(theta - np.float32(eps) * z)) / (2 * eps)
                rows.append({"kind": kind, "dir": j, "eps": eps, "radius": float(eps * np.linalg.norm(z)),
                             "g": g, "true_g": true_g, "roughness": sigma,
                             "snr": 2 * eps * abs(true_g) / max(sigma, 1e-12)})
                print(f"{kind:8s} dir {j} eps {eps:<6g} radius {rows[-1]['radius']:.3f}  g {g:+.4f}  "
                      f"true {true_g:+.4f}  roughness {sigma:.4f}  SNR {rows[-1]['snr']:.2f}", flush=True)
    summary = {}
    for kind, (_, epss) in kinds.items():
        for eps in epss:
            sel = [r for r in rows if r["kind"] == kind and r["eps"] == eps]
            summary[f"{kind}@{eps:g}"] = {"median_snr": float(np.median([r["snr"] for r in sel])),
                                         "median_abs_err": float(np.median([abs(r["g"] - r["true_g"]) for r in sel])),
                                         "median_abs_true": float(np.median([abs(r["true_g"]) for r in sel]))}
    res = {"at": where, "model": Path(gguf).name, "batch": args.batch, "k": int(basis.shape[1]),
           "subspace_info": info, "cloud_s": round(cloud_s, 1), "rows": rows, "summary": summary}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    tr.close()
    rt.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
