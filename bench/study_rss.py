"""Peak RSS of an edge running subspace ZO vs torch LoRA backprop on the same model, each in a fresh process.

Used by ``bench/convergence.py --rss`` (the round-v2 study's memory target: edge ≤ 12% of backprop); the result is
``OUT/rss.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

RSS_EDGE = """
import json, sys, numpy as np
sys.path.insert(0, {root!r})
from bench.convergence import StudyConfig, study_data
from edge.data import Row
from edge.runtime import Runtime, RuntimeConfig
from edge.tasks import ClassificationTask
from edge.train import TrainConfig, Trainer, peak_rss_mb
from protocol.spec import AdapterSpec
from protocol.zo import Guide, Schedule
cfg = StudyConfig(); d = study_data(cfg)["pooled"]
# as `edgezo train` builds it: one runtime, the spec from its dims, the private rows encoded once
rt = Runtime({gguf!r}, RuntimeConfig(n_ctx=256, n_seq_max=32, n_threads=2))
spec = AdapterSpec("lora", rt.dims(), rank=8, alpha=16.0, targets=("q_proj", "v_proj"), train="AB")
task = ClassificationTask(rt, {{"neg": "negative", "pos": "positive"}})
enc = [task.encode(Row(t, "pos" if y else "neg")) for t, y in zip(d.texts, d.labels)]
rt.fit_context([len(e.tokens) for e in enc], 16)  # as `edgezo train` sizes its KV cache (--n-ctx 0)
tr = Trainer(rt, task, enc, spec, TrainConfig(batch_size=16, seed=1, q=1, lr=0.05, eps=0.1))
tr.task.loss(tr.batch(0)); infer = peak_rss_mb()
U = np.load({basis!r})  # as an edge holds it after decoding the round's guidance: (d, 16) float32
tr.begin_round(tr.theta.copy(), Schedule(lr=0.05, eps=0.1), 0)
g = Guide(U, 1.0, None, "subspace")
for _ in range(10): tr.train_step(g)
print(json.dumps({{"infer_peak_rss_mb": infer, "train_peak_rss_mb": peak_rss_mb(), "torch": "torch" in sys.modules}}))
"""

RSS_TORCH = """
import json, sys, numpy as np, torch
sys.path.insert(0, {root!r})
from bench.convergence import StudyConfig, cloud_scorer, study_data
from edge.train import peak_rss_mb
cfg = StudyConfig(); d = study_data(cfg)["pooled"]
spec, theta, scorer = cloud_scorer(cfg, 0)
opt = torch.optim.AdamW([scorer.lora.theta], lr=1e-3)
for i in range(3):
    opt.zero_grad(); scorer.loss(d.texts[16 * i:16 * i + 16], d.labels[16 * i:16 * i + 16]).backward(); opt.step()
print(json.dumps({{"backprop_peak_rss_mb": peak_rss_mb()}}))
"""


def edge_dims(gguf: str):
    """The model's dimensions as the edge runtime reads them from the GGUF."""
    from edge.runtime import Runtime, RuntimeConfig

    rt = Runtime(gguf, RuntimeConfig(n_ctx=256, n_seq_max=2))
    try:
        return rt.dims()
    finally:
        rt.close()


def measure_rss(gguf: str, out: Path) -> dict:
    """Peak RSS of an edge running subspace ZO and of torch LoRA backprop, each in a fresh process."""
    from protocol.spec import AdapterSpec
    from protocol.zo import orthonormal_basis

    root = str(Path(__file__).resolve().parents[1])
    spec_d = AdapterSpec("lora", edge_dims(gguf), rank=8, alpha=16.0, targets=("q_proj", "v_proj"), train="AB").d
    basis = out / "rss-basis.npy"  # built here, so the QR's float64 temporaries are not charged to the edge
    np.save(basis, orthonormal_basis(list(np.random.default_rng(0).standard_normal((16, spec_d)))))
    res = {}
    for code in (RSS_EDGE, RSS_TORCH):
        p = subprocess.run([sys.executable, "-c", code.format(root=root, gguf=gguf, basis=str(basis))],
                           capture_output=True, text=True, check=True)
        res.update(json.loads(p.stdout.strip().splitlines()[-1]))
    res["edge_over_backprop"] = res["train_peak_rss_mb"] / res["backprop_peak_rss_mb"]
    return res


