"""FedKSeed-style seed pool: the edges of a full-space round draw their perturbation seeds from K seeds shared by the
round, and the guide's merge generates each (seed, span) direction once instead of once per record. Model-free: a
quadratic loss on the edge (edge.round_trainer.FunctionTrainer), synthetic split and rejected records."""

from __future__ import annotations

import numpy as np
import pytest

import cloud.aggregate as agg
from cloud.aggregate import (
    RoundPlan,
    Upload,
    aggregate,
    client_delta,
    has_repeated_seeds,
    seed_pool_delta,
    weights,
)
from cloud.config import TrainConfig
from cloud.engine import plan_round, round_start, simulate_round
from edge.round_trainer import FunctionTrainer, round_inputs, train_round_start
from edge.zo import pool_seeds, step_seeds
from protocol.messages import decode, encode
from protocol.spec import AdapterSpec, ModelDims
from protocol.zo import Group, Guide, Schedule, StepRecord, orthonormal_basis

D = 240
K = 4
SPEC = AdapterSpec(kind="lora", dims=ModelDims(2, 16, 32, 4, 2), rank=2)


def _quadratic(seed: int, d: int = D):
    target = np.random.default_rng(seed).standard_normal(d).astype(np.float32)
    return lambda th, t: float(np.mean((th - target) ** 2))


def _guided(alpha: float = 0.5, k: int = 4, seed: int = 0) -> Guide:
    rng = np.random.default_rng(seed)
    grad = (0.1 * rng.standard_normal(D)).astype(np.float32)
    return Guide(orthonormal_basis(list(rng.standard_normal((k, D)))), alpha, grad, "guided")


def _exact(plan: RoundPlan, ups: list[Upload]) -> np.ndarray:
    """Σ w_i Δ_i by the per-client replay (what the merge computed before the pool)."""
    ups = sorted(ups, key=lambda u: u.client)
    return sum(w * client_delta(plan, u) for w, u in zip(weights(ups), ups, strict=True))


def _pooled_uploads(plan: RoundPlan, n_clients: int, *, extra: bool = False) -> list[Upload]:
    """Clients that trained with a pool of K seeds; ``extra``: a split step (two spans) and a rejected step too."""
    ups = []
    for i in range(n_clients):
        tr = FunctionTrainer(loss_fn=_quadratic(i), examples_per_step=8, seed=100 + i, q=2)
        res = tr.train_round(theta=plan.theta, guide=plan.guide, schedule=plan.schedule,
                             lam=agg.lam_from_plan(plan.lam), local_steps=plan.local_steps - 2 * extra,
                             first_step=plan.first_step, hyper={"q": 2, "batch": 8, "seed_pool": K})
        steps = list(res.steps)
        if extra:
            rng = np.random.default_rng(i)
            split = D // 3
            s1 = step_seeds(7 + i, 0, 1, K, plan.first_step)
            s2 = step_seeds(7 + i, 1, 3, K, plan.first_step)
            lam = plan.lam if plan.guide is not None and plan.guide.grad is not None else 0.0
            steps.insert(1, StepRecord(groups=[Group(s1, rng.standard_normal(1), 0, split),
                                               Group(s2, rng.standard_normal(3), split, -1)], lam=lam))
            steps.insert(2 + i % 2, StepRecord.rejected())
        ups.append(Upload(client=f"c{i}", round_id=0, basis_id="", steps=steps, examples=8 * (i + 2)))
    return ups


def test_step_seeds_pool_zero_is_unchanged_and_pool_draws_shared_members():
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, 7, 0x5A0])))
    assert np.array_equal(step_seeds(5, 7, 6), rng.integers(0, 2**63, size=6, dtype=np.uint64))
    assert np.array_equal(step_seeds(5, 7, 6, 0, 99), step_seeds(5, 7, 6))
    pool = set(pool_seeds(40, np.arange(K)).tolist())
    assert len(pool) == K
    a, b = step_seeds(11, 40, 50, K, 40), step_seeds(12345, 40, 50, K, 40)  # two clients, one round
    assert a.dtype == np.uint64 and set(a.tolist()) <= pool and set(b.tolist()) <= pool
    assert not np.array_equal(a, b)  # each client draws its own indices...
    assert set(step_seeds(11, 45, 50, K, 45).tolist()).isdisjoint(pool)  # ...and each round has its own pool
    assert np.array_equal(pool_seeds(40, np.array([3, 1, 3])), pool_seeds(40, np.array([3, 1, 3])))


@pytest.mark.parametrize("case", ["mezo", "guided", "momentum", "split"])
def test_pooled_merge_equals_per_client_replay(case):
    guide = _guided() if case in ("guided", "split") else None
    sched = Schedule(lr=0.02, eps=1e-2, momentum=0.9 if case in ("momentum", "split") else 0.0,
                     decay="cosine", total_steps=40)
    theta = (0.01 * np.random.default_rng(9).standard_normal(D)).astype(np.float32)  # move ≫ θ's float32 ulp
    plan = RoundPlan(round_id=0, basis_id="", theta=theta, guide=guide, schedule=sched,
                     lam=0.3 if guide is not None else 0.0, local_steps=5, first_step=10, edge_weight=0.8)
    ups = _pooled_uploads(plan, 5, extra=case == "split")
    assert has_repeated_seeds(ups, D)
    for up in ups:
        agg.validate_upload(plan, up)
    exact, pooled = _exact(plan, ups), seed_pool_delta(plan, sorted(ups, key=lambda u: u.client))
    scale = float(np.abs(exact).max())
    assert scale > 1e-4
    assert np.allclose(pooled, exact, rtol=0, atol=1e-6 * scale), float(np.abs(pooled - exact).max()) / scale
    want = (plan.theta.astype(np.float64) + plan.edge_weight * exact).astype(np.float32)
    got = aggregate(plan, ups[::-1])  # the merge takes the by-seed path, in client order whatever the arrival
    assert np.allclose(got, want, rtol=0, atol=1e-6 * scale + 1e-6)
    assert np.array_equal(got, aggregate(plan, ups))


def test_pooled_merge_generates_at_most_k_directions_per_span(monkeypatch):
    guide = _guided()
    plan = RoundPlan(round_id=0, basis_id="", theta=np.zeros(D, np.float32), guide=guide,
                     schedule=Schedule(lr=0.02, eps=1e-2, momentum=0.9), lam=0.3, local_steps=5, first_step=3)
    ups = _pooled_uploads(plan, 6, extra=True)
    records = sum(g.seeds.size for u in ups for st in u.steps for g in st.groups)
    calls: dict[int, set[int]] = {}
    n_calls = 0
    real = agg.direction

    def counting(seed, n, g=None):
        nonlocal n_calls
        n_calls += 1
        calls.setdefault(n, set()).add(int(seed))
        return real(seed, n, g)

    monkeypatch.setattr(agg, "direction", counting)
    aggregate(plan, ups)
    assert set(calls) == {D, D // 3, D - D // 3}  # whole θ and the split's two spans
    assert all(len(s) <= K for s in calls.values()) and n_calls == sum(len(s) for s in calls.values())
    assert n_calls <= 3 * K < records


def test_fresh_seeds_keep_the_exact_per_client_path():
    plan = RoundPlan(round_id=0, basis_id="", theta=np.zeros(D, np.float32), guide=None,
                     schedule=Schedule(lr=0.02, eps=1e-2), lam=0.0, local_steps=4)
    tr = FunctionTrainer(loss_fn=_quadratic(1), examples_per_step=4, seed=3, q=2)
    res = tr.train_round(theta=plan.theta, guide=None, schedule=plan.schedule, lam=0.0, local_steps=4,
                         first_step=0, hyper={"q": 2})
    up = Upload(client="a", round_id=0, basis_id="", steps=res.steps, examples=16)
    assert not has_repeated_seeds([up], D)
    assert np.array_equal(aggregate(plan, [up]), res.theta)  # bit for bit, as before


@pytest.mark.parametrize("bad", [-1, True, 1.5, (1 << 24) + 1])
def test_train_config_refuses_a_bad_seed_pool(bad):
    with pytest.raises(ValueError, match="seed_pool"):
        TrainConfig(kind="guided", seed_pool=bad)
    assert TrainConfig(kind="guided", seed_pool=1 << 24).seed_pool == 1 << 24


def test_seed_pool_reaches_the_edge_through_round_start():
    train = TrainConfig(kind="guided", guided=False, seed_pool=K, q=2, local_steps=3, batch=4)
    theta = SPEC.flatten(SPEC.init(0))
    plan = plan_round(round_id=2, theta=theta, guidance=None, guide=None, basis_id="", train=train, total_rounds=4)
    rs = decode(encode(round_start(plan, spec=SPEC, train=train, guidance=None, deadline=0.0)))
    assert rs.hyper.seed_pool == K
    th, guide, _ = round_inputs(rs, {})
    res = train_round_start(FunctionTrainer(loss_fn=_quadratic(4, SPEC.d), examples_per_step=4, seed=77), rs, th, guide)
    pool = set(pool_seeds(plan.first_step, np.arange(K)).tolist())
    seeds = [s for st in res.steps for g in st.groups for s in g.seeds.tolist()]
    assert len(seeds) == 6 and set(seeds) <= pool
    # the in-process round does the same, and a subspace round keeps fresh seeds (it merges in c-space)
    trainers = {f"c{i}": FunctionTrainer(loss_fn=_quadratic(i, SPEC.d), examples_per_step=4, seed=i) for i in range(3)}
    ups, _ = simulate_round(plan, trainers, q=2, batch=4, seed_pool=K)
    assert {s for u in ups for st in u.steps for g in st.groups for s in g.seeds.tolist()} <= pool
    rng = np.random.default_rng(0)
    sub = Guide(orthonormal_basis(list(rng.standard_normal((4, SPEC.d)))), 1.0, None, "subspace")
    splan = plan_round(round_id=2, theta=theta, guidance=None, guide=sub, basis_id="u", train=train, total_rounds=4)
    assert round_start(splan, spec=SPEC, train=train, guidance=None, deadline=0.0).hyper.seed_pool == 0


def test_a_seed_pool_that_no_round_would_use_is_refused():
    from cloud.config import TrainConfig

    with pytest.raises(ValueError, match="seed_pool applies to full-space rounds"):
        TrainConfig(kind="subspace", seed_pool=64)
    assert TrainConfig(kind="subspace", seed_pool=64, subspace_rounds=2).at_round(2).seed_pool == 64
    assert TrainConfig(kind="guided", seed_pool=64).seed_pool == 64
