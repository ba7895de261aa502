"""Round v2: subspace guidance replayed bit for bit, one round engine for daemon / demo / study, and guide.toml
settings that reach the edge. Model-free: a quadratic loss on the edge, the real daemon on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest

from cloud.config import GuideConfig, TrainConfig
from cloud.daemon import GuideServer, StaticGuidance
from cloud.engine import compress_guidance, merge, plan_round, simulate_round
from cloud.guidance import Guidance
from cloud.store import Store
from edge.client import ClientConfig, EdgeClient
from edge.round_trainer import FunctionTrainer
from protocol.messages import Guidance as WireGuidance
from protocol.messages import LossStats, Update, decode, encode
from protocol.spec import AdapterSpec, ModelDims
from protocol.zo import Guide, Schedule, SubspaceState, orthonormal_basis, replay, subspace_theta

SPEC = AdapterSpec(kind="lora", dims=ModelDims(2, 16, 32, 4, 2), rank=2)


def _target(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SPEC.d).astype(np.float32)


def _quadratic(seed: int):
    target = _target(seed)
    return lambda th, t: float(np.mean((th - target) ** 2))


def _subspace_guide(k: int, seed: int = 0) -> Guide:
    rng = np.random.default_rng(seed)
    return Guide(orthonormal_basis(list(rng.standard_normal((k, SPEC.d)))), 1.0, None, "subspace")


def test_subspace_replay_is_bit_exact_through_the_wire():
    guide = _subspace_guide(8)
    wire, decoded = compress_guidance(guide)
    again = decode(encode(Update(round_id=0, client_id="x", steps=[], first_step=0, n_examples=1,
                                 loss=LossStats(mean=0, min=0, max=0, last=0), guide_id=wire.guide_id)))
    assert again.guide_id == wire.guide_id and decoded.kind == "subspace"
    theta0 = SPEC.flatten(SPEC.init(0))
    sched = Schedule(lr=0.05, eps=0.1)
    tr = FunctionTrainer(loss_fn=_quadratic(1), examples_per_step=4, seed=3, q=2)
    res = tr.train_round(theta=theta0, guide=decoded, schedule=sched, lam=0.0, local_steps=6, first_step=12,
                         hyper={"q": 2})
    up = decode(encode(Update(round_id=0, client_id="x", steps=res.steps, first_step=12, n_examples=24,
                              loss=LossStats(mean=0, min=0, max=0, last=0), guide_id=wire.guide_id)))
    rebuilt = replay(theta0, up.steps, sched, decoded, first_step=12)
    assert np.array_equal(rebuilt, res.theta)  # bit for bit
    # the edge moved only inside span(U), and it moved toward the target
    delta = (res.theta - theta0).astype(np.float64)
    u = decoded.basis.astype(np.float64)  # q8-decoded: nearly, not exactly, orthonormal
    c = np.linalg.lstsq(u, delta, rcond=None)[0]
    assert np.linalg.norm(delta - u @ c) < 1e-5 * np.linalg.norm(delta)
    assert res.loss_after < res.loss_before


def test_subspace_state_refuses_what_it_cannot_replay():
    guide = _subspace_guide(4)
    with pytest.raises(ValueError, match="split"):
        guide.restrict(0, 10)
    st = SubspaceState(np.zeros(SPEC.d, np.float32), guide)
    assert np.array_equal(st.theta(), subspace_theta(np.zeros(SPEC.d, np.float32), guide.basis, np.zeros(4)))
    with pytest.raises(ValueError, match="kind"):
        Guide(guide.basis, 1.0, None, "nope")
    with pytest.raises(ValueError, match="k <= 128"):
        GuideConfig.from_dict({"train": {"kind": "subspace", "k": 2}})


class _Leading(StaticGuidance):
    """Static subspace guidance whose rounds start from a moved θ (what cloud.lead does with AdamW steps)."""

    pipelined = False

    def submit(self, theta, round_id):
        fut = super().submit(theta, round_id)
        g = fut.result()
        moved = (np.asarray(theta, np.float32) + np.float32(0.01)).astype(np.float32)
        fut2 = type(fut)()
        fut2.set_result(Guidance(guide=g.guide, public_loss=g.public_loss, theta_round=round_id, theta=moved))
        return fut2


class _Recording(FunctionTrainer):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.seen: list[dict] = []

    def train_round(self, **kw):
        g = kw["guide"]
        self.seen.append({"kind": g.kind if g else None, "k": g.k if g else 0, "lr": kw["schedule"].lr,
                          "eps": kw["schedule"].eps, "local_steps": kw["local_steps"], "theta": kw["theta"].copy()})
        return super().train_round(**kw)


def _run_daemon(tmp_path: Path, train: dict, *, leading: bool = False, rounds: int = 1):
    tokens = {"c0": "secret-token-0000", "c1": "secret-token-0001"}
    cfg = GuideConfig.from_dict({
        "server": {"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl"),
                   "insecure": True,  # plaintext on purpose: TLS is tested in test_cloud.py
                   "long_poll_s": 2.0, "io_timeout_s": 10.0},
        "rounds": {"rounds": rounds, "min_clients": 2, "max_clients": 2, "deadline_s": 20.0, "join_window_s": 0.1},
        "train": train, "clients": {"tokens": tokens}})
    tc = cfg.train
    src = (_Leading if leading else StaticGuidance)(d=SPEC.d, k=tc.k, mix_alpha=1.0 if tc.subspace else tc.mix_alpha,
                                                    rng=np.random.default_rng(0),
                                                    kind=tc.kind if tc.subspace else "guided")
    theta0 = SPEC.flatten(SPEC.init(0))
    trainers = {n: _Recording(loss_fn=_quadratic(1 + i), examples_per_step=4, seed=10 + i, q=tc.q)
                for i, n in enumerate(tokens)}

    async def main():
        srv = GuideServer(config=cfg, spec=SPEC, theta0=theta0, guidance=src)
        await srv.start()
        try:
            clients = [EdgeClient(config=ClientConfig(host="127.0.0.1", port=srv.port, client_id=n, token=t,
                                                      state_dir=str(tmp_path / n), io_timeout_s=10.0,
                                                      backoff_initial_s=0.05, backoff_max_s=0.2, insecure=True),
                                  trainer=trainers[n], rng=np.random.default_rng(i), log=lambda *a, **k: None)
                       for i, (n, t) in enumerate(tokens.items())]
            await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 60)
            while not srv.finished:
                await asyncio.sleep(0.02)
        finally:
            await srv.stop()

    asyncio.run(main())
    return cfg, src, theta0, trainers


def test_daemon_demo_and_study_compute_the_same_theta_from_one_engine(tmp_path):
    cfg, src, theta0, _ = _run_daemon(tmp_path, {"kind": "subspace", "k": 8, "local_steps": 3, "q": 2},
                                      leading=True)
    store = Store(root=tmp_path / "state")
    try:
        plan = store.load_plan(0)
        daemon_theta1 = store.load_theta(1)
        uploads = store.uploads(0)
    finally:
        store.close()
    assert plan.guide is not None and plan.guide.subspace
    assert np.array_equal(merge(plan, uploads), daemon_theta1)  # the stored round replays to the daemon's θ_1
    # the study / demo path: same plan from the engine, same trainers in process, same merge
    g = src.submit(theta0, 0).result()
    wire, guide = compress_guidance(g.guide)
    plan2 = plan_round(round_id=0, theta=theta0, guidance=g, guide=guide, basis_id=wire.guide_id, train=cfg.train,
                       total_rounds=cfg.rounds.rounds)
    assert np.array_equal(plan2.theta, plan.theta) and plan2.basis_id == plan.basis_id
    trainers = {f"c{i}": FunctionTrainer(loss_fn=_quadratic(1 + i), examples_per_step=4, seed=10 + i, q=2)
                for i in range(2)}
    _, study_theta1 = simulate_round(plan2, trainers, q=2, batch=8)
    assert np.array_equal(study_theta1, daemon_theta1)
    assert not np.array_equal(daemon_theta1, plan.theta)  # the edges did move it


def test_guide_toml_settings_reach_the_edge_and_change_what_it_does(tmp_path):
    a = _run_daemon(tmp_path / "a", {"kind": "subspace", "k": 8, "lr": 0.02, "local_steps": 3})[3]
    b = _run_daemon(tmp_path / "b", {"kind": "subspace", "k": 32, "lr": 0.07, "local_steps": 5})[3]
    c = _run_daemon(tmp_path / "c", {"kind": "guided", "k": 4, "local_steps": 2, "lam": 0.0})[3]
    d = _run_daemon(tmp_path / "d", {"kind": "subspace", "k": 8, "lr": 0.02, "local_steps": 3}, leading=True)[3]
    sa, sb, sc, sd = (x["c0"].seen[0] for x in (a, b, c, d))
    assert (sa["kind"], sa["k"], sa["lr"], sa["eps"], sa["local_steps"]) == ("subspace", 8, 0.02, 0.1, 3)
    assert (sb["kind"], sb["k"], sb["lr"], sb["local_steps"]) == ("subspace", 32, 0.07, 5)
    assert (sc["kind"], sc["k"], sc["lr"], sc["eps"]) == ("guided", 4, 0.03, 1e-3)  # the kind's own defaults
    # the cloud's steps reach the edge as the θ it starts from
    assert np.allclose(sd["theta"] - sa["theta"], 0.01)
    # and what the edge does differs: its θ after the round
    ta = replay_theta(tmp_path / "a")
    tb = replay_theta(tmp_path / "b")
    assert not np.allclose(ta, tb)


def replay_theta(root: Path) -> np.ndarray:
    store = Store(root=root / "state")
    try:
        return store.load_theta(1)
    finally:
        store.close()


def test_wire_guidance_keeps_its_kind_in_the_digest():
    guide = _subspace_guide(4)
    sub = WireGuidance.from_guide(guide, "fp32", "fp32")
    full = WireGuidance.from_guide(Guide(guide.basis, 1.0, None, "guided"), "fp32", "fp32")
    assert sub.to_guide().kind == "subspace" and full.to_guide().kind == "guided"
    assert sub.guide_id != full.guide_id


def test_guide_serve_with_a_model_warm_starts_and_leads_with_a_subspace(tmp_path, tiny_llama_dir):
    """`edgezo guide serve`'s construction on a real (tiny) torch model: the cloud's AdamW warm start is
    θ_0, checkpointed in the state dir; the guidance source is the leading cloud with a k-dim subspace."""
    import json

    from cloud.cli import build_server
    from cloud.lead import CloudLead

    cfg = GuideConfig.from_dict({
        "server": {"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl")},
        "model": {"path": str(tiny_llama_dir), "rank": 2, "lora_alpha": 4.0},
        "data": {"public_n": 32, "batch": 4},
        "train": {"kind": "subspace", "k": 4},
        "cloud": {"warm_steps": 3, "batch": 4}})
    srv = build_server(cfg)
    try:
        assert isinstance(srv.guidance, CloudLead) and not srv.guidance.pipelined
        assert (tmp_path / "state" / "cloud").is_dir() and any((tmp_path / "state" / "cloud").iterdir())
        init = srv.spec.flatten(srv.spec.init(cfg.model.init_seed))
        assert not np.array_equal(srv.theta, init)  # θ_0 is the cloud's warm start, not the initial adapter
        g = srv.guidance.guidance(srv.theta, 0)
        assert g.guide.subspace and g.guide.k == 4
        u = g.guide.basis.astype(np.float64)
        assert np.allclose(u.T @ u, np.eye(4), atol=1e-5)
        logged = [json.loads(x) for x in (tmp_path / "guide.jsonl").read_text().splitlines()]
        assert any(e.get("event") == "cloud_warm_start" and e["steps"] == 3 for e in logged)
    finally:
        srv.guidance.close()
        srv.store.close()


def test_online_lambda_is_minus_one_in_a_plan_and_online_to_the_edges():
    from cloud.aggregate import PLAN_LAM_ONLINE, lam_from_plan, lam_to_plan
    from cloud.config import TrainConfig
    from cloud.engine import round_start
    from protocol.constants import LAMBDA_ONLINE

    # Prepare: a guided round with a cloud gradient and λ = "online"
    rng = np.random.default_rng(0)
    guide = Guide(orthonormal_basis(list(rng.standard_normal((2, SPEC.d)))), 0.5,
                  rng.standard_normal(SPEC.d).astype(np.float32), "guided")
    train = TrainConfig(kind="guided", k=2, lam="online")
    # Execute
    plan = plan_round(round_id=0, theta=SPEC.flatten(SPEC.init(0)), guidance=None, guide=guide, basis_id="b",
                      train=train, total_rounds=1)
    wire = WireGuidance.from_guide(guide, "fp32", "fp32")
    rs = round_start(plan, spec=SPEC, train=train, guidance=wire, deadline=0.0)
    # Assert
    assert plan.lam == PLAN_LAM_ONLINE == -1.0 and rs.lam == LAMBDA_ONLINE
    assert decode(encode(rs)).lam == LAMBDA_ONLINE
    assert [lam_from_plan(lam_to_plan(x)) for x in (0.0, 0.3, LAMBDA_ONLINE)] == [0.0, 0.3, LAMBDA_ONLINE]
    with pytest.raises(ValueError, match="lam must be a number in \\[0, 1\\] or 'online', got 'offline'"):
        TrainConfig(kind="guided", lam="offline")
    with pytest.raises(ValueError, match="lam must be in \\[0, 1\\], got 1.5"):
        TrainConfig(kind="guided", lam=1.5)


def test_settings_of_the_other_kind_are_refused_not_ignored():
    with pytest.raises(ValueError, match=r"\['lam'\] apply to kind = 'guided' only"):
        GuideConfig.from_dict({"train": {"kind": "subspace", "lam": 0.7}})
    with pytest.raises(ValueError, match=r"\[cloud\] configures the leading cloud"):
        GuideConfig.from_dict({"train": {"kind": "guided"}, "cloud": {"warm_steps": 5}})
    assert GuideConfig.from_dict({"train": {"kind": "guided", "lam": 0.7}}).train.lam == 0.7


@pytest.mark.parametrize(("toml", "new_key"), [
    ('[train]\nkind = "guided"\nalpha = 0.5\n', "[train] alpha was renamed mix_alpha"),
    ("[model]\nrank = 2\nalpha = 4.0\n", "[model] alpha was renamed lora_alpha"),
])
def test_an_old_alpha_key_is_refused_with_its_new_name(tmp_path, capsys, toml, new_key):
    from app.cli import main

    # Prepare
    path = tmp_path / "guide.toml"
    path.write_text(toml + '[clients.tokens]\nedge-1 = "a-long-random-secret"\n')
    # Execute / Assert: the config layer names the new key; `guide serve` says it in one line and exits 2
    with pytest.raises(ValueError, match=re.escape(new_key)):
        GuideConfig.load(path)
    assert main(["guide", "serve", "--config", str(path), "--dims", "2,64,128,4,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and new_key in err[0]
    cfg = GuideConfig.from_dict({"train": {"kind": "guided", "mix_alpha": 0.25}, "model": {"lora_alpha": 4.0}})
    assert (cfg.train.mix_alpha, cfg.model.lora_alpha) == (0.25, 4.0)


def test_subspace_merge_in_c_space_equals_the_d_space_sum():
    """A subspace round merges in c-space (k numbers per client): it equals θ_t + Σ w_i Δ_i of the d-space
    replays within float32 rounding, and one client with weight 1 lands exactly on the θ it trained to."""
    from cloud.aggregate import RoundPlan, Upload, aggregate, client_delta, weights
    from protocol.zo import Group, Guide, Schedule, StepRecord, orthonormal_basis, replay

    rng = np.random.default_rng(3)
    d, k = 300, 6
    guide = Guide(basis=orthonormal_basis(list(rng.standard_normal((k, d)).astype(np.float32))), alpha=1.0,
                  grad=None, kind="subspace")
    plan = RoundPlan(round_id=0, basis_id="b", theta=rng.standard_normal(d).astype(np.float32), guide=guide,
                     schedule=Schedule(lr=0.05, eps=0.1), lam=0.0, local_steps=3, edge_weight=0.8)
    ups = [Upload(client=f"c{i}", round_id=0, basis_id="b", examples=10 + i,
                  steps=[StepRecord(groups=[Group(seeds=rng.integers(0, 2**63, 2, dtype=np.uint64),
                                                  grads=rng.standard_normal(2).astype(np.float32))])
                         for _ in range(3)]) for i in range(5)]
    dspace = plan.theta.astype(np.float64) + 0.8 * sum(w * client_delta(plan, u) for w, u in zip(weights(ups), ups, strict=True))
    np.testing.assert_allclose(aggregate(plan, ups), dspace.astype(np.float32), rtol=1e-6, atol=1e-6)
    one = RoundPlan(**{**plan.__dict__, "edge_weight": 1.0})
    assert np.array_equal(aggregate(one, ups[:1]), replay(one.theta, ups[0].steps, one.schedule, guide))


def test_a_rejected_step_is_accepted_under_a_fixed_lambda_and_changes_nothing():
    """An edge that measures a non-finite loss records an empty step with λ = 0 (edge.zo.zo_measure): a no-op on
    both sides. A guided round with λ fixed at 0.5 must accept it (the study's (c) arm hit this: one diverged
    client got its whole upload refused); a non-empty step with λ = 0 is still refused."""
    from cloud.aggregate import RoundPlan, Upload, UploadRefused, aggregate, validate_upload
    from protocol.zo import Group, StepRecord

    rng = np.random.default_rng(0)
    q = orthonormal_basis(list(rng.standard_normal((4, SPEC.d)).astype(np.float32)))
    guide = Guide(q, 0.5, rng.standard_normal(SPEC.d).astype(np.float32) * 1e-3)
    theta = SPEC.flatten(SPEC.init(0))
    plan = RoundPlan(round_id=4, basis_id="g", theta=theta, guide=guide, schedule=Schedule(lr=1e-3, eps=1e-3),
                     lam=0.5, local_steps=1)
    rejected = Upload(client="c", round_id=4, basis_id="g", steps=[StepRecord(groups=[], lam=0.0)], examples=8)
    validate_upload(plan, rejected)
    assert np.array_equal(aggregate(plan, [rejected]), theta)
    measured = StepRecord(groups=[Group(seeds=np.array([7], np.uint64), grads=np.array([0.1], np.float32))], lam=0.0)
    with pytest.raises(UploadRefused, match="fixed λ = 0.5"):
        validate_upload(plan, Upload(client="c", round_id=4, basis_id="g", steps=[measured], examples=8))


def test_subspace_rounds_switch_the_run_to_full_space_mezo_on_both_sides(tmp_path):
    """[train] subspace_rounds = 1: round 0 searches the cloud's subspace, round 1 is plain full-space MeZO at
    mezo_lr / mezo_eps with no guidance sent; the stored plans replay both rounds to the daemon's θ."""
    train = {"kind": "subspace", "k": 8, "local_steps": 3, "q": 2, "subspace_rounds": 1, "mezo_lr": 2e-3,
             "mezo_eps": 5e-3}
    cfg, src, _, trainers = _run_daemon(tmp_path, train, leading=True, rounds=2)
    seen = trainers["c0"].seen
    assert [(s["kind"], s["k"], s["lr"], s["eps"]) for s in seen] == [("subspace", 8, 0.05, 0.1),
                                                                      (None, 0, 2e-3, 5e-3)]
    store = Store(root=tmp_path / "state")
    try:
        plans = [store.load_plan(r) for r in (0, 1)]
        thetas = [store.load_theta(r) for r in (1, 2)]
        uploads = [store.uploads(r) for r in (0, 1)]
    finally:
        store.close()
    assert plans[0].guide is not None and plans[0].guide.subspace and plans[1].guide is None
    # round 1 starts from θ_1 itself: the leading cloud is not asked for a round that takes no guidance
    assert np.array_equal(plans[1].theta, thetas[0])
    for plan, ups, theta in zip(plans, uploads, thetas, strict=True):
        assert len(ups) == 2 and np.array_equal(merge(plan, ups), theta)
    assert not np.array_equal(thetas[1], thetas[0])  # the MeZO round moved θ off the round-0 subspace
    assert cfg.train.at_round(0) is cfg.train and not cfg.train.at_round(5).guided


def test_subspace_rounds_settings_are_checked_and_never_idle():
    with pytest.raises(ValueError, match="subspace_rounds must be an integer >= 0"):
        GuideConfig.from_dict({"train": {"subspace_rounds": -1}})
    with pytest.raises(ValueError, match="needs kind 'subspace'"):
        GuideConfig.from_dict({"train": {"kind": "guided", "subspace_rounds": 3}})
    with pytest.raises(ValueError, match=r"\['mezo_lr'\] set the MeZO rounds after subspace_rounds, which is 0"):
        GuideConfig.from_dict({"train": {"mezo_lr": 1e-3}})
    with pytest.raises(ValueError, match="need mezo_lr >= 0 and mezo_eps > 0"):
        GuideConfig.from_dict({"train": {"subspace_rounds": 2, "mezo_eps": 0.0}})
    with pytest.raises(ValueError, match=r"\['mezo_eps'\] set the MeZO rounds"):  # in code as in guide.toml
        TrainConfig(mezo_eps=1e-3)
    assert TrainConfig().mezo_lr is None and TrainConfig(subspace_rounds=1, mezo_lr=1e-3).at_round(1).lr == 1e-3
    tc = GuideConfig.from_dict({"train": {"subspace_rounds": 2}}).train
    assert [tc.at_round(r).subspace for r in range(4)] == [True, True, False, False]
    assert (tc.at_round(2).lr, tc.at_round(2).eps) == (tc.mezo_lr, tc.mezo_eps)
