"""What the guide's merge costs per round as the fleet grows: subspace rounds merged in c-space vs the d-space
replay of every client (the previous rule), on SmolLM2-135M's adapter size (d = 460,800, LoRA r8 q/v).

    python bench/merge_scale.py --clients 100,1000,10000 --json docs/bench/merge_scale.json

Uploads are synthetic (seeded (seed, g) records: 5 local steps × q = 2, as guide.toml's defaults); the d-space
rule is timed on the first ``--dspace-max`` clients and reported per client, since it is linear in clients.
Ratios are within one run (shared, noisy machines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.aggregate import RoundPlan, Upload, aggregate, client_delta  # noqa: E402
from protocol.zo import Group, Guide, Schedule, StepRecord, orthonormal_basis  # noqa: E402


def uploads(n: int, steps: int, q: int, rng: np.random.Generator) -> list[Upload]:
    out = []
    for i in range(n):
        recs = [StepRecord(groups=[Group(seeds=rng.integers(0, 2**63, q, dtype=np.uint64),
                                         grads=rng.standard_normal(q).astype(np.float32))]) for _ in range(steps)]
        out.append(Upload(client=f"c{i:06d}", round_id=0, basis_id="b", steps=recs, examples=40))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="100,1000,10000")
    ap.add_argument("--d", type=int, default=460_800)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--q", type=int, default=2)
    ap.add_argument("--dspace-max", type=int, default=20, help="clients timed with the d-space rule")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    basis = orthonormal_basis(list(rng.standard_normal((a.k, a.d)).astype(np.float32)))
    guide = Guide(basis=basis, alpha=1.0, grad=None, kind="subspace")
    plan = RoundPlan(round_id=0, basis_id="b", theta=np.zeros(a.d, np.float32), guide=guide,
                     schedule=Schedule(lr=0.05, eps=0.1), lam=0.0, local_steps=a.steps)
    sizes = [int(x) for x in a.clients.split(",") if x]
    ups = uploads(max(sizes), a.steps, a.q, rng)
    t = time.perf_counter()
    for up in ups[: a.dspace_max]:
        client_delta(plan, up)
    dspace_per_client = (time.perf_counter() - t) / min(a.dspace_max, len(ups))
    rows = []
    for n in sizes:
        t = time.perf_counter()
        aggregate(plan, ups[:n])
        s = time.perf_counter() - t
        rows.append({"clients": n, "cspace_merge_s": s, "dspace_merge_s_estimated": dspace_per_client * n,
                     "speedup": dspace_per_client * n / s})
        print(f"{n:>7} clients: c-space merge {s:8.3f} s; d-space replay of every client ≈ "
              f"{dspace_per_client * n:8.1f} s ({dspace_per_client * n / s:.0f}×)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "dspace_per_client_s": dspace_per_client,
                                            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
