"""What the guide's merge costs per round as the fleet grows: subspace rounds merged in c-space vs the d-space
replay of every client (the previous rule), on SmolLM2-135M's adapter size (d = 460,800, LoRA r8 q/v); and
full-space (MeZO) rounds whose seeds come from a FedKSeed pool of ``--seed-pool`` K seeds, merged by seed (at most
K directions, cloud.aggregate.seed_pool_delta) vs the per-record replay of every client (one direction per record).

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
from edge.zo import pool_seeds  # noqa: E402
from protocol.zo import Group, Guide, Schedule, StepRecord, orthonormal_basis  # noqa: E402


def uploads(n: int, steps: int, q: int, rng: np.random.Generator, pool: np.ndarray | None = None) -> list[Upload]:
    """``pool``: the round's shared seeds (FedKSeed), each record drawing one; None: fresh 64-bit seeds."""
    def seeds() -> np.ndarray:
        return rng.integers(0, 2**63, q, dtype=np.uint64) if pool is None else rng.choice(pool, q)

    out = []
    for i in range(n):
        recs = [StepRecord(groups=[Group(seeds=seeds(),
                                         grads=rng.standard_normal(q).astype(np.float32))]) for _ in range(steps)]
        out.append(Upload(client=f"c{i:06d}", round_id=0, basis_id="b", steps=recs, examples=40))
    return out


def per_client_replay_s(plan: RoundPlan, ups: list[Upload], n: int) -> float:
    """Seconds per client of the old rule, each client's records replayed to a d-dimensional Δ (timed on ``n``)."""
    t = time.perf_counter()
    for up in ups[:n]:
        client_delta(plan, up)
    return (time.perf_counter() - t) / min(n, len(ups))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="100,1000,10000")
    ap.add_argument("--d", type=int, default=460_800)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--q", type=int, default=2)
    ap.add_argument("--dspace-max", type=int, default=20, help="clients timed with the d-space rule")
    ap.add_argument("--seed-pool", type=int, default=4096,
                    help="K: a full-space (MeZO) round with seeds from a pool of K, merged by seed (0: skip)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    basis = orthonormal_basis(list(rng.standard_normal((a.k, a.d)).astype(np.float32)))
    guide = Guide(basis=basis, alpha=1.0, grad=None, kind="subspace")
    plan = RoundPlan(round_id=0, basis_id="b", theta=np.zeros(a.d, np.float32), guide=guide,
                     schedule=Schedule(lr=0.05, eps=0.1), lam=0.0, local_steps=a.steps)
    sizes = [int(x) for x in a.clients.split(",") if x]
    ups = uploads(max(sizes), a.steps, a.q, rng)
    dspace_per_client = per_client_replay_s(plan, ups, a.dspace_max)
    rows = []
    for n in sizes:
        t = time.perf_counter()
        aggregate(plan, ups[:n])
        s = time.perf_counter() - t
        rows.append({"clients": n, "cspace_merge_s": s, "dspace_merge_s_estimated": dspace_per_client * n,
                     "speedup": dspace_per_client * n / s})
        print(f"{n:>7} clients: c-space merge {s:8.3f} s; d-space replay of every client ≈ "
              f"{dspace_per_client * n:8.1f} s ({dspace_per_client * n / s:.0f}×)", flush=True)
    out = {"args": vars(a), "dspace_per_client_s": dspace_per_client, "rows": rows}
    if a.seed_pool > 0:
        out.update(pooled(a, sizes, rng))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


def pooled(a: argparse.Namespace, sizes: list[int], rng: np.random.Generator) -> dict:
    """A plain MeZO round (no guidance): per-record replay of every client (timed on ``--dspace-max`` clients,
    per client) vs the merge by seed of the same records drawn from a pool of ``--seed-pool`` seeds."""
    plan = RoundPlan(round_id=0, basis_id="", theta=np.zeros(a.d, np.float32), guide=None,
                     schedule=Schedule(lr=1e-4, eps=1e-2), lam=0.0, local_steps=a.steps)
    ups = uploads(max(sizes), a.steps, a.q, rng, pool=pool_seeds(plan.first_step, np.arange(a.seed_pool)))
    per_client = per_client_replay_s(plan, ups, a.dspace_max)
    rows = []
    for n in sizes:
        dirs = len({int(s) for up in ups[:n] for st in up.steps for g in st.groups for s in g.seeds})
        t = time.perf_counter()
        aggregate(plan, ups[:n])
        s = time.perf_counter() - t
        rows.append({"clients": n, "records": n * a.steps * a.q, "directions": dirs, "pooled_merge_s": s,
                     "per_record_merge_s_estimated": per_client * n, "speedup": per_client * n / s})
        print(f"{n:>7} clients, pool {a.seed_pool}: merge by seed {s:8.3f} s ({dirs} directions); per-record "
              f"replay ≈ {per_client * n:8.1f} s ({per_client * n / s:.1f}×)", flush=True)
    return {"pooled_per_record_per_client_s": per_client, "pooled_rows": rows}


if __name__ == "__main__":
    main()
