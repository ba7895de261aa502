"""θ on the wire (issue "operators", item 3): replay records since the client's last round when it can rebuild θ
exactly from them, an adaptively compressed delta that *is* the round's θ, else dense fp32.

Real daemon, real edge clients (FunctionTrainer on a quadratic), TLS on 127.0.0.1, SQLite state; plus the pure
pieces (cloud.theta_wire, the ReplayRound forms through the wire, the store)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tls_pair

from cloud.aggregate import RoundPlan, Upload, aggregate, aggregate_move
from cloud.config import GuideConfig, TrainConfig, WireConfig
from cloud.daemon import GuideServer, StaticGuidance
from cloud.engine import merge, round_start
from cloud.guidance import Guidance
from cloud.store import Store
from cloud.theta_wire import MAX_CHAIN, choose_theta, same_bits, wire_start
from edge.client import ClientConfig, EdgeClient
from edge.held_theta import HeldTheta
from edge.round_trainer import FunctionTrainer, round_inputs
from protocol.codecs import AdaptiveConfig, chunk_errors
from protocol.codecs import encode as encode_array
from protocol.errors import ProtocolError
from protocol.messages import Guidance as WireGuidance
from protocol.messages import ReplayRound, RoundStart, ThetaReplay, decode, encode, theta_digest
from protocol.samples import tiny_spec
from protocol.spec import AdapterSpec, ModelDims
from protocol.zo import Group, Guide, Schedule, StepRecord, orthonormal_basis, subspace_theta

SPEC = AdapterSpec(kind="lora", dims=ModelDims(2, 16, 32, 4, 2), rank=2)
REPO = Path(__file__).resolve().parents[1]


def _quadratic(seed: int):
    target = np.random.default_rng(seed).standard_normal(SPEC.d).astype(np.float32)
    return lambda th, t: float(np.mean((th - target) ** 2))


def _basis(d: int, k: int, seed) -> np.ndarray:
    return orthonormal_basis(list(np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32)))


class _Rotating(StaticGuidance):
    """A fresh seeded subspace every round (pipelined: built while the previous round runs, so edges prefetch it);
    ``step`` > 0 moves each round's start like the cloud's own AdamW steps would (θ'_t ≠ θ_t)."""

    def __init__(self, *, d: int, k: int, step: float = 0.0) -> None:
        self.d, self.k, self.step = d, k, step
        self.pipelined = step == 0.0  # a leading cloud needs θ_{t+1} first
        self.calls = 0  # a pipelined source is asked for round t+1's guidance with round_id t: count the calls

    def submit(self, theta, round_id):
        import concurrent.futures as cf

        fut: cf.Future = cf.Future()
        self.calls += 1
        g = Guide(_basis(self.d, self.k, [5, self.calls]), 1.0, None, "subspace")
        moved = None
        if self.step:
            rng = np.random.default_rng([9, round_id])
            moved = (np.asarray(theta, np.float32) + self.step * rng.standard_normal(self.d)).astype(np.float32)
        fut.set_result(Guidance(guide=g, public_loss=float("nan"), theta_round=round_id, theta=moved))
        return fut


class _Recording(FunctionTrainer):
    """Keeps the θ each round started from on this edge (what it rebuilt from the RoundStart)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.starts: list[np.ndarray] = []

    def train_round(self, **kw):
        self.starts.append(np.array(kw["theta"], np.float32, copy=True))
        return super().train_round(**kw)


def _config(tmp: Path, tokens: dict[str, str], *, rounds: int, wire: dict | None = None, min_clients: int = 2,
            max_clients: int = 2, join_window_s: float = 0.1) -> GuideConfig:
    cert, key = tls_pair()
    return GuideConfig.from_dict({
        "server": {"port": 0, "state_dir": str(tmp / "state"), "log_file": str(tmp / "guide.jsonl"),
                   "tls_cert": str(cert), "tls_key": str(key), "long_poll_s": 2.0, "io_timeout_s": 10.0},
        "rounds": {"rounds": rounds, "min_clients": min_clients, "max_clients": max_clients, "deadline_s": 20.0,
                   "join_window_s": join_window_s},
        "train": {"kind": "subspace", "k": 4, "local_steps": 3, "q": 2},
        "wire": wire or {}, "clients": {"tokens": tokens}})


def _edge(port: int, name: str, token: str, tmp: Path, trainer: FunctionTrainer, **kw) -> EdgeClient:
    cfg = ClientConfig(host="127.0.0.1", port=port, client_id=name, token=token, state_dir=str(tmp / name),
                       io_timeout_s=10.0, backoff_initial_s=0.05, backoff_max_s=0.2, ca=str(tls_pair()[0]), **kw)
    return EdgeClient(config=cfg, trainer=trainer, rng=np.random.default_rng(len(name)), log=lambda *a, **k: None)


def _log(tmp: Path, event: str) -> list[dict]:
    lines = [json.loads(x) for x in (tmp / "guide.jsonl").read_text().splitlines()]
    return [e for e in lines if e.get("event") == event]


def _stored(tmp: Path, rounds: int) -> tuple[list[RoundPlan], list[np.ndarray], list[list[Upload]]]:
    store = Store(root=tmp / "state")
    try:
        plans = [store.load_plan(r) for r in range(rounds)]
        thetas = [store.load_theta(r) for r in range(rounds + 1)]
        uploads = [store.uploads(r) for r in range(rounds)]
    finally:
        store.close()
    return plans, thetas, uploads


def _run(tmp: Path, *, rounds: int, source, wire: dict | None = None, n: int = 2,
         before_stop=None) -> dict[str, _Recording]:
    tokens = {f"c{i}": f"secret-token-{i:04d}" for i in range(n)}
    cfg = _config(tmp, tokens, rounds=rounds, wire=wire, min_clients=n, max_clients=n)
    trainers = {c: _Recording(loss_fn=_quadratic(1 + i), examples_per_step=4, seed=10 + i, q=2)
                for i, c in enumerate(tokens)}

    async def main():
        srv = GuideServer(config=cfg, spec=SPEC, theta0=SPEC.flatten(SPEC.init(0)), guidance=source)
        await srv.start()
        try:
            edges = [_edge(srv.port, c, t, tmp, trainers[c]) for c, t in tokens.items()]
            await asyncio.wait_for(asyncio.gather(*(e.run() for e in edges)), 90)
            while not srv.finished:
                await asyncio.sleep(0.02)
            if before_stop is not None:
                await asyncio.get_running_loop().run_in_executor(None, before_stop, srv.port)
        finally:
            await srv.stop()

    asyncio.run(main())
    return trainers


# ---- over TLS, with the real daemon ----------------------------------------------------------------------------
def test_replay_records_rebuild_theta_bit_for_bit_for_three_rounds(tmp_path, capsys):
    """Subspace rounds with no cloud steps: from round 1 on every edge gets θ as round t-1's c-space move (k numbers)
    and rebuilds the guide's θ_t bit for bit; the θ the edges start from is the guide's merged θ_t itself. Bytes
    each way per round are logged, stored and shown by `edgezo guide status`."""
    from app.cli import main as edgezo

    rounds = 4
    status = []

    def guide_status(port: int) -> None:
        status.append(edgezo(["guide", "status", f"127.0.0.1:{port}", "--ca", str(tls_pair()[0]), "--client-id", "c0",
                              "--token", "secret-token-0000"]))

    trainers = _run(tmp_path, rounds=rounds, source=_Rotating(d=SPEC.d, k=4), before_stop=guide_status)
    plans, thetas, uploads = _stored(tmp_path, rounds)
    for t in range(rounds):
        assert same_bits(plans[t].theta, thetas[t])  # lossless: the round starts from the merged θ_t
        assert same_bits(merge(plans[t], uploads[t]), thetas[t + 1])
        for tr in trainers.values():
            assert same_bits(tr.starts[t], plans[t].theta)  # the edge's θ, rebuilt from the records, bit for bit
    frames = _log(tmp_path, "round_frame")
    replay = [f for f in frames if f["round"] >= 1]  # one frame per round and form: both edges get the same bytes
    assert sorted({f["round"] for f in replay}) == list(range(1, rounds))
    assert all(f["theta_form"] == "replay" and f["base_round"] == f["round"] - 1 for f in replay)
    assert all(f["theta_bytes"] < 300 < 4 * SPEC.d for f in replay)  # k = 4 float64 numbers (+ keys), not d floats
    assert all(f["theta_form"] == "dense" for f in frames if f["round"] == 0)
    opened = _log(tmp_path, "round_open")
    assert [o["theta_form"] for o in opened] == ["dense"] + ["c"] * (rounds - 1)
    closed = _log(tmp_path, "round_closed")
    assert [c["theta_replay"] for c in closed] == [0] + [2] * (rounds - 1)
    # bytes each way, per round, are stored with the round: round 1 sends far less than round 0
    store = Store(root=tmp_path / "state")
    try:
        rows = store.rounds()
    finally:
        store.close()
    assert all(r["down_bytes"] > 0 and r["up_bytes"] > 0 for r in rows)
    assert all(r["down_bytes"] < rows[0]["down_bytes"] for r in rows[1:])  # (they include the next U's prefetch)
    assert status == [0]
    printed = capsys.readouterr().out.splitlines()
    assert "theta last round: 2 as replay records, 0 dense" in printed
    head = next(i for i, x in enumerate(printed) if x.split()[:1] == ["round"] and "down_bytes" in x)
    table = [x.split() for x in printed[head + 1: head + 1 + rounds]]
    assert [(int(r[0]), int(r[-2]), int(r[-1])) for r in table] == [
        (r["round"], r["down_bytes"], r["up_bytes"]) for r in rows]


def test_a_client_that_missed_a_round_gets_dense_theta_and_still_lands_on_the_guides(tmp_path):
    """c2 trains round 0, is away for round 1 (its subspace U_1 is not held), comes back as a new process on the same
    state dir: its θ of round 0 is on disk, but the move of round 1 needs U_1, so it gets θ dense, starts from the
    guide's θ bit for bit, and from then on gets replay records again."""
    tokens = {f"c{i}": f"secret-token-{i:04d}" for i in range(3)}
    rounds = 4
    cfg = _config(tmp_path, tokens, rounds=rounds, min_clients=2, max_clients=3, join_window_s=0.3)
    trainers = {c: _Recording(loss_fn=_quadratic(1 + i), examples_per_step=4, seed=10 + i, q=2)
                for i, c in enumerate(tokens)}

    async def main():
        srv = GuideServer(config=cfg, spec=SPEC, theta0=SPEC.flatten(SPEC.init(0)),
                          guidance=_Rotating(d=SPEC.d, k=4))
        await srv.start()
        try:
            steady = [asyncio.ensure_future(_edge(srv.port, c, tokens[c], tmp_path, trainers[c]).run())
                      for c in ("c0", "c1")]
            await _edge(srv.port, "c2", tokens["c2"], tmp_path, trainers["c2"], max_rounds=1).run()
            while srv.round_id < 2:  # round 1 runs without c2
                await asyncio.sleep(0.02)
            back = _edge(srv.port, "c2", tokens["c2"], tmp_path, trainers["c2"])
            assert back.held.round_id == 0  # read back from its state dir
            await asyncio.wait_for(asyncio.gather(back.run(), *steady), 90)
            while not srv.finished:
                await asyncio.sleep(0.02)
        finally:
            await srv.stop()

    asyncio.run(main())
    plans, thetas, _ = _stored(tmp_path, rounds)
    store = Store(root=tmp_path / "state")
    try:
        rows = {r["round"]: r for r in store.rounds()}
    finally:
        store.close()
    assert rows[1]["selected"] == 2  # c2 missed round 1
    c2_rounds = [json.loads(x)["round"] for x in (tmp_path / "c2" / "rounds.jsonl").read_text().splitlines()]
    assert c2_rounds[0] == 0 and 1 not in c2_rounds and len(c2_rounds) >= 2
    for t, start in zip(c2_rounds, trainers["c2"].starts, strict=True):
        assert same_bits(start, plans[t].theta)
    frames = _log(tmp_path, "round_frame")
    back_round = c2_rounds[1]
    assert any(f["round"] == back_round and f["theta_form"] == "dense" for f in frames)  # c2's catch-up
    assert all(f["theta_form"] == "replay" for f in frames if f["round"] >= 1 and f["round"] != back_round)
    for t in range(rounds):
        assert same_bits(plans[t].theta, thetas[t])


def test_adaptive_theta_the_plan_is_the_decoded_theta_and_stays_near_the_fp32_run(tmp_path):
    """A leading cloud (θ'_t ≠ θ_t: no exact record reaches the round's θ): with [wire] theta = "adaptive" the round's
    θ is θ_{t-1} + decode(delta), every edge starts from exactly that, the carry goes back in at the merge, and after
    N rounds θ stays within the target of the fp32 run. Dense fp32 for the same rounds is 4 bytes per number."""
    rounds, target = 4, 0.02
    runs = {}
    # the guidance goes fp32 in both runs, so the only difference is how θ travels
    for name, wire in (("f32", {"guidance": "fp32"}), ("ada", {"guidance": "fp32", "theta": "adaptive",
                                                               "target": target})):
        trainers = _run(tmp_path / name, rounds=rounds, source=_Rotating(d=SPEC.d, k=4, step=0.05), wire=wire)
        runs[name] = (trainers, *_stored(tmp_path / name, rounds))
    trainers, plans, thetas, uploads = runs["ada"]
    store = Store(root=tmp_path / "ada" / "state")
    try:
        moves = [store.load_wire(t) for t in range(rounds)]
    finally:
        store.close()
    assert moves[0][1] is None
    for t in range(1, rounds):
        digest, move = moves[t]
        assert move.form == "delta" and digest == theta_digest(plans[t].theta)
        assert same_bits(move.apply(plans[t - 1].theta), plans[t].theta)  # the plan's θ IS the decoded one
        assert plans[t].carry is not None
        for tr in trainers.values():
            assert same_bits(tr.starts[t], plans[t].theta)
    for t in range(rounds):  # every θ_{t+1} is recomputable from the stored plan (with its carry) and uploads
        assert same_bits(merge(plans[t], uploads[t]), thetas[t + 1])
    frames = [f for f in _log(tmp_path / "ada", "round_frame") if f["round"] >= 1]
    assert frames and all(f["theta_form"] == "replay" and f["theta_bytes"] < 4 * SPEC.d for f in frames)
    f32 = runs["f32"][2][rounds]
    theta0 = runs["f32"][2][0]
    drift = np.linalg.norm(thetas[rounds].astype(np.float64) - f32)
    assert drift <= target * np.linalg.norm(f32.astype(np.float64) - theta0), drift
    assert all(f["theta_form"] == "dense" for f in _log(tmp_path / "f32", "round_frame"))


def test_a_bad_wire_theta_is_refused_in_one_line_with_exit_2(tmp_path):
    cfg = tmp_path / "guide.toml"
    cert, key = tls_pair()
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\nport = 0\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                   '[wire]\ntheta = "q8"\n[clients.tokens]\nc0 = "secret-token-0000"\n')
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "app", "guide", "serve", "--config", str(cfg), "--dims", "2,16,32,4,2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "edgezo: error: [wire] theta must be one of ['fp32', 'adaptive'], got 'q8' (fp32: exact, as replay records "
        "or dense; adaptive: a compressed delta with target or theta_budget)"]
    with pytest.raises(ValueError, match="theta_budget applies to theta = 'adaptive'"):
        WireConfig(theta_budget=1000)
    assert WireConfig(theta="adaptive").theta_codec() == AdaptiveConfig(target=0.02)
    assert WireConfig(theta="adaptive", theta_budget=5000).theta_codec() == AdaptiveConfig(budget=5000)
    assert WireConfig().theta_codec() is None


# ---- the pure pieces ---------------------------------------------------------------------------------------------
def _plan(rng: np.random.Generator, d: int, k: int, **kw) -> RoundPlan:
    guide = Guide(_basis(d, k, rng.integers(1 << 30)), 1.0, None, "subspace")
    return RoundPlan(round_id=0, basis_id="b0", theta=rng.standard_normal(d).astype(np.float32), guide=guide,
                     schedule=Schedule(lr=0.05, eps=0.1), lam=0.0, local_steps=2, **kw)


def _ups(rng: np.random.Generator, n: int) -> list[Upload]:
    return [Upload(client=f"c{i}", round_id=0, basis_id="b0", examples=8 + i,
                   steps=[StepRecord(groups=[Group(seeds=rng.integers(0, 2**63, 2, dtype=np.uint64),
                                                   grads=rng.standard_normal(2).astype(np.float32))])
                          for _ in range(2)]) for i in range(n)]


def test_wire_start_forms_and_the_moves_through_the_wire():
    rng = np.random.default_rng(0)
    d, k = 700, 5
    plan = _plan(rng, d, k, edge_weight=0.7)
    ups = _ups(rng, 3)
    theta1, move = aggregate_move(plan, ups)
    assert move.shape == (k,) and same_bits(theta1, aggregate(plan, ups))
    assert same_bits(subspace_theta(plan.theta, plan.guide.basis, move), theta1)
    kw = dict(prev_round=0, prev_theta=plan.theta, prev_guide=plan.guide, prev_guide_id="b0", prev_move=move)
    c = wire_start(theta1, codec=None, **kw)  # no cloud step: the exact c-space move
    assert c.form == "c" and c.carry is None and same_bits(c.theta, theta1)
    stepped = (theta1 + np.float32(0.01)).astype(np.float32)
    assert wire_start(stepped, codec=None, **kw).form == "dense"  # fp32: no exact record reaches it
    cfg = AdaptiveConfig(target=0.05)
    dl = wire_start(stepped, codec=cfg, **kw)
    assert dl.form == "delta" and not same_bits(dl.theta, stepped)
    delta = (stepped.astype(np.float64) - plan.theta).astype(np.float32)
    assert chunk_errors(delta, dl.move.delta).max() <= 0.05  # mode A: the target on every chunk
    assert np.allclose(dl.theta.astype(np.float64) + dl.carry, stepped, atol=1e-6)
    assert wire_start(stepped, prev_round=-1, prev_theta=None, prev_guide=None, prev_guide_id="", prev_move=None,
                      codec=cfg).form == "dense"
    # both moves through a RoundStart frame: the receiver rebuilds the θ bit for bit from the θ it holds
    spec = tiny_spec()
    d2 = spec.d
    plan2 = _plan(rng, d2, k)
    t1, m1 = aggregate_move(plan2, _ups(rng, 2))
    w1 = wire_start(t1, prev_round=0, prev_theta=plan2.theta, prev_guide=plan2.guide, prev_guide_id="b0",
                    prev_move=m1, codec=None)
    t2 = (t1 + rng.standard_normal(d2).astype(np.float32) * np.float32(0.01)).astype(np.float32)
    w2 = wire_start(t2, prev_round=1, prev_theta=w1.theta, prev_guide=None, prev_guide_id="", prev_move=None,
                    codec=cfg)
    p2 = RoundPlan(round_id=2, basis_id="", theta=w2.theta, guide=None, schedule=Schedule(), lam=0.0, local_steps=1)
    rs = decode(encode(round_start(p2, spec=spec, train=TrainConfig(), guidance=None, deadline=0.0,
                                   theta=ThetaReplay(rounds=[w1.move, w2.move]), base_round=0)))
    assert isinstance(rs, RoundStart) and rs.base_round == 0 and [r.form for r in rs.theta.rounds] == ["c", "delta"]
    assert same_bits(rs.theta.apply(plan2.theta, {"b0": plan2.guide}), w2.theta)
    with pytest.raises(ValueError, match="not held"):
        rs.theta.apply(plan2.theta, {})
    theta, _, _ = round_inputs(rs, {"b0": plan2.guide}, (0, plan2.theta))
    assert same_bits(theta, w2.theta) and rs.theta_digest == theta_digest(w2.theta)
    with pytest.raises(ProtocolError, match="holds round 1"):
        round_inputs(rs, {"b0": plan2.guide}, (1, plan2.theta))
    with pytest.raises(ProtocolError, match="digest"):
        round_inputs(rs, {"b0": plan2.guide}, (0, plan2.theta + np.float32(1.0)))
    with pytest.raises(Exception, match="one of them"):
        encode(round_start(p2, spec=spec, train=TrainConfig(), guidance=None, deadline=0.0, base_round=0,
                           theta=ThetaReplay(rounds=[ReplayRound(round_id=0, c=[1.0], delta=w2.move.delta)])))


def test_choose_theta_sends_moves_only_when_they_rebuild_the_theta_exactly():
    rng = np.random.default_rng(1)
    d = 400
    thetas = [rng.standard_normal(d).astype(np.float32) for _ in range(5)]
    cmove = ReplayRound(round_id=0, guide_id="u", c=[0.1, 0.2])
    big = ReplayRound(round_id=0, delta=encode_array(rng.standard_normal(d).astype(np.float32), "fp32"))
    hist = {0: (theta_digest(thetas[0]), None), 1: (theta_digest(thetas[1]), cmove),
            2: (theta_digest(thetas[2]), None), 3: (theta_digest(thetas[3]), cmove), 4: (theta_digest(thetas[4]), big)}

    def pick(rid, base, digest, held=("u",)):
        return choose_theta(round_id=rid, theta=thetas[rid], base_round=base, base_digest=digest, held=set(held),
                            history=hist.get)

    assert pick(1, 0, theta_digest(thetas[0])) == (0, ThetaReplay(rounds=[cmove]))
    assert pick(1, 0, theta_digest(thetas[0]), held=()) == (-1, None)  # the subspace of round 0 is not held
    assert pick(1, 0, "0" * 16) == (-1, None)  # another θ than the guide's round 0
    assert pick(2, 0, theta_digest(thetas[0])) == (-1, None)  # round 2 has no exact move: dense
    assert pick(3, 3, theta_digest(thetas[3])) == (3, ThetaReplay(rounds=[]))  # a restart mid-round: nothing to send
    assert pick(4, 3, theta_digest(thetas[3])) == (-1, None)  # a move larger than dense θ is not worth it
    assert pick(1, -1, "") == (-1, None)
    assert choose_theta(round_id=MAX_CHAIN + 1, theta=thetas[0], base_round=0, base_digest="x", held=set(),
                        history=hist.get) == (-1, None)


def test_store_keeps_the_move_and_the_carry_across_a_restart(tmp_path):
    rng = np.random.default_rng(2)
    plan = _plan(rng, 300, 4, carry=rng.standard_normal(300).astype(np.float32) * np.float32(1e-3))
    ups = _ups(rng, 2)
    delta = encode_array(rng.standard_normal(300).astype(np.float32), AdaptiveConfig(target=0.1))
    store = Store(root=tmp_path)
    store.open_round(plan, selected=["c0", "c1"], deadline=0.0, move=ReplayRound(round_id=0, delta=delta))
    store.commit_uploads(ups)
    theta1, move = aggregate_move(plan, ups)
    store.close_round(0, theta1, n_uploads=2, public_loss=None, client_loss=None, move=move, down_bytes=123,
                      up_bytes=45)
    store.close()
    again = Store(root=tmp_path)
    try:
        back = again.load_plan(0)
        assert same_bits(back.carry, plan.carry) and same_bits(merge(back, again.uploads(0)), theta1)
        assert np.array_equal(again.load_move(1), move)
        digest, m = again.load_wire(0)
        assert digest == theta_digest(plan.theta) and m.form == "delta"
        assert np.array_equal(m.delta.decode(), delta.decode())
        assert again.load_wire(5) is None and again.load_move(7) is None
        (row,) = again.rounds()
        assert (row["down_bytes"], row["up_bytes"]) == (123, 45)
    finally:
        again.close()
    # the carry is what the merge adds back: without it θ_1 is the plain merge
    plain = RoundPlan(**{**plan.__dict__, "carry": None})
    assert np.allclose(theta1, aggregate(plain, ups) + plan.carry, atol=1e-6)


def test_held_theta_survives_a_restart_and_ignores_torn_files(tmp_path):
    rng = np.random.default_rng(3)
    guide = Guide(_basis(300, 4, 1), 1.0, None, "subspace")
    wire = WireGuidance.from_guide(guide, "q8", "q8")
    theta = rng.standard_normal(300).astype(np.float32)
    HeldTheta(tmp_path).save(5, theta, wire)
    held = HeldTheta(tmp_path)
    guides = held.load()
    assert held.round_id == 5 and same_bits(held.theta, theta) and held.digest == theta_digest(theta)
    assert list(guides) == [wire.guide_id]
    assert np.array_equal(guides[wire.guide_id].basis, wire.to_guide().basis)
    (tmp_path / "held-guidance.bin").write_bytes(b"\x00\x00\x00\x05junk!")
    held2 = HeldTheta(tmp_path)
    assert held2.load() == {} and held2.round_id == 5  # θ kept; a guidance file that does not decode is ignored
    (tmp_path / "held-theta.npz").write_bytes(b"torn")
    held3 = HeldTheta(tmp_path)
    assert held3.load() == {} and held3.round_id == -1 and held3.digest == ""


def test_moves_an_edge_cannot_apply_make_it_forget_its_theta_so_the_next_round_comes_dense(tmp_path):
    """A RoundStart whose moves need guidance the edge does not hold: the round is refused (ProtocolError, the
    client reconnects) and the edge holds nothing any more, so its next RoundRequest gets θ dense, not a loop."""
    spec = tiny_spec()
    theta = np.random.default_rng(4).standard_normal(spec.d).astype(np.float32)
    edge = _edge(7878, "c0", "secret-token-0000", tmp_path, FunctionTrainer(loss_fn=lambda th, t: 0.0,
                                                                           examples_per_step=1, seed=0))
    edge.held.save(3, theta, None)
    plan = RoundPlan(round_id=4, basis_id="", theta=theta, guide=None, schedule=Schedule(), lam=0.0, local_steps=1)
    rs = round_start(plan, spec=spec, train=TrainConfig(), guidance=None, deadline=0.0, base_round=3,
                     theta=ThetaReplay(rounds=[ReplayRound(round_id=3, guide_id="not-held", c=[0.5])]))
    with pytest.raises(ProtocolError, match="not held"):
        asyncio.run(edge._do_round(None, rs))
    assert edge.held.round_id == -1 and edge.held.digest == ""
