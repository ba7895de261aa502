"""edgezo on Flower's deployment runtime: a SuperLink and two SuperNodes on loopback, ``flwr run`` of the edgezo
Flower app (app/flower), two rounds on a tiny llama.cpp model. The ServerApp's θ must be the exact replay of the
two clients' (seed, g) records, the θ the edgezo daemon's merge computes from the same plans and uploads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the Flower path needs the flower extra (bash install.sh --dev installs it)")

from cloud.aggregate import client_c, validate_upload  # noqa: E402
from cloud.config import GuideConfig  # noqa: E402
from cloud.engine import compress_guidance, merge, plan_round, round_start  # noqa: E402
from cloud.store import Store  # noqa: E402
from protocol.flower import RECORD, client_name, frame_entry, message_from_entry  # noqa: E402
from protocol.messages import RoundStart, Update  # noqa: E402

POSITIVE = ["a warm and funny film", "I loved every minute", "great acting and a clever plot", "a joy to watch",
            "beautiful, moving and smart", "the best film this year", "charming and sweet", "a superb cast"]
NEGATIVE = ["a dull and boring mess", "I hated every minute", "bad acting and a silly plot", "a chore to sit through",
            "ugly, cold and stupid", "the worst film this year", "tedious and sour", "a wasted cast"]


def _write_csv(path: Path, pos: list[str], neg: list[str]) -> Path:
    rows = [(t, "positive") for t in pos] + [(t, "negative") for t in neg]
    path.write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    return path


def _guide_toml(path: Path, state: Path, log: Path, rounds: int) -> Path:
    from app.flower_local import guide_toml

    return guide_toml(path, state=state, log=log, rounds=rounds, clients=2, k=4, deadline_s=240.0)


def test_frames_travel_in_a_config_record_and_refuse_the_wrong_type():
    """The bytes a Flower ConfigRecord carries are one edgezo frame; anything else is a ProtocolError."""
    from flwr.app import ConfigRecord

    from protocol.errors import MalformedFrame, ProtocolError
    from protocol.spec import AdapterSpec, ModelDims

    spec = AdapterSpec(kind="lora", dims=ModelDims(2, 16, 32, 4, 2), rank=2)
    cfg = GuideConfig.from_dict({"train": {"kind": "subspace", "k": 4}})
    from cloud.daemon import StaticGuidance

    g = StaticGuidance(d=spec.d, k=4, mix_alpha=1.0, rng=np.random.default_rng(0), kind="subspace").submit(None, 0).result()
    wire, guide = compress_guidance(g.guide)
    plan = plan_round(round_id=0, theta=spec.flatten(spec.init(0)), guidance=g, guide=guide, basis_id=wire.guide_id,
                      train=cfg.train, total_rounds=1)
    rec = ConfigRecord(frame_entry(round_start(plan, spec=spec, train=cfg.train, guidance=wire, deadline=1.0)))
    rs = message_from_entry(rec, RoundStart)
    assert rs.guidance.guide_id == plan.basis_id and np.array_equal(rs.theta.decode(), plan.theta)
    with pytest.raises(ProtocolError, match="expected a Update"):
        message_from_entry(rec, Update)
    with pytest.raises(MalformedFrame):
        message_from_entry(ConfigRecord({"frame": "not bytes"}), RoundStart)
    with pytest.raises(MalformedFrame):
        message_from_entry(None, RoundStart)
    assert client_name(18446744073709551615) == "node-18446744073709551615" and RECORD == "edgezo"


def test_the_flower_client_app_loads_without_torch():
    """edgezo[flower] on a device: the ClientApp and Flower import with torch unimportable, and flwr requires no
    torch (the edge install stays torch-free)."""
    import importlib.metadata
    import subprocess
    import sys

    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'transformers', 'peft', 'accelerate'}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import edge.flower_client
from flwr.clientapp import ClientApp
assert isinstance(edge.flower_client.app, ClientApp)
print('OK', [m for m in sys.modules if m.split('.')[0] == 'torch'])
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "OK []" in out.stdout, out.stderr[-2000:]
    reqs = importlib.metadata.requires("flwr") or []
    assert not [r for r in reqs if r.split()[0].lower().startswith("torch") and "extra" not in r], reqs


def _flower_rounds(tmp_path: Path, gguf: Path, *, rounds: int, tls: tuple[str, str, str] | None):
    """Start a SuperLink and two SuperNodes (each its own rows), ``flwr run`` the edgezo app for ``rounds`` rounds,
    wait for the guide's "finished". Returns (guide.toml, dims, log events, plans, uploads, θ_0..θ_rounds, logs)."""
    from app.flower_local import LocalDeployment
    from edge.runtime import Runtime, RuntimeConfig

    rt = Runtime(str(gguf), RuntimeConfig(n_ctx=64, n_seq_max=1, n_threads=1))
    d = rt.dims()
    rt.close()
    dims = f"{d.n_layers},{d.hidden},{d.intermediate},{d.n_heads},{d.n_kv_heads}"
    state, log = tmp_path / "state", tmp_path / "guide.jsonl"
    toml = _guide_toml(tmp_path / "guide.toml", state, log, rounds)
    data = [_write_csv(tmp_path / "a.csv", POSITIVE[:5], NEGATIVE[:5]),
            _write_csv(tmp_path / "b.csv", POSITIVE[3:], NEGATIVE[3:])]  # each SuperNode its own private rows
    nodes = [{"model": str(gguf), "data": str(p), "threads": 1} for p in data]
    with LocalDeployment(tmp_path / "flower", tls=tls) as dep:
        dep.start(nodes)
        dep.run({"guide-config": str(toml), "dims": dims, "join-timeout-s": 60.0})
        end = time.monotonic() + 300
        while not (log.exists() and '"finished"' in log.read_text()):
            failed = log.exists() and "upload_refused" in log.read_text()
            if failed or time.monotonic() > end:
                pytest.fail(f"the Flower run did not finish ({'an upload was refused' if failed else 'timeout'}):\n"
                            f"{log.read_text() if log.exists() else ''}\n{dep.tail()}")
            time.sleep(0.5)
        logs = {n: dep.log_text(n) for n in dep.logs}
    events = [json.loads(x) for x in log.read_text().splitlines()]
    store = Store(root=state)
    try:
        plans = [store.load_plan(t) for t in range(rounds)]
        uploads = [store.uploads(t) for t in range(rounds)]
        thetas = [store.load_theta(t) for t in range(rounds + 1)]
    finally:
        store.close()
    return toml, dims, events, plans, uploads, thetas, logs


def _check_exact_replay(plans, uploads, thetas) -> None:
    """Each round: two llama.cpp clients uploaded, and θ_{t+1} is the exact replay of their records."""
    from protocol.zo import subspace_theta

    for t, (plan, ups) in enumerate(zip(plans, uploads, strict=True)):
        assert len({u.client for u in ups}) == 2 and all(u.client.startswith("node-") for u in ups)
        for u in ups:  # llama.cpp ran the round: 2 local steps of q = 1, batch 4, finite losses
            validate_upload(plan, u)
            assert len(u.steps) == 2 and u.examples == 8 and np.isfinite(u.loss_after)
        # θ_{t+1} is the exact replay of both clients' records: the daemon's merge over the stored plan
        assert np.array_equal(merge(plan, ups), thetas[t + 1])
        assert not np.array_equal(thetas[t + 1], plan.theta)  # the edges moved it
        # and it is the c-space average of what each client's records reach (weights ∝ examples: equal here)
        c = np.mean([client_c(plan, u) for u in ups], axis=0)
        assert np.array_equal(subspace_theta(plan.theta, plan.guide.basis, c), thetas[t + 1])


@pytest.mark.slow
def test_flwr_run_two_supernodes_and_the_final_theta_is_the_exact_replay(tmp_path, tiny_llama_gguf):
    """Runs Flower with ``--insecure`` on purpose: plaintext on 127.0.0.1 only, so this test needs no certificates.
    TLS (the SuperLink's --ssl-* files, the SuperNodes' --root-certificates) is docs/flower.md and the next test."""
    from cloud.cli import build_source

    toml, dims, events, plans, uploads, thetas, _ = _flower_rounds(tmp_path, tiny_llama_gguf, rounds=2, tls=None)
    closed = [e for e in events if e["event"] == "round_closed"]
    assert [e["uploads"] for e in closed] == [2, 2] and all(e["transport"] == "flower" for e in closed)
    _check_exact_replay(plans, uploads, thetas)
    assert np.array_equal(plans[1].theta, thetas[1])  # static guidance: round 1 starts where round 0's merge ended
    # the plan is the one the daemon makes: the same spec, θ_0 and guidance from the same guide.toml
    cfg = GuideConfig.load(toml)
    spec, theta0, src, _ = build_source(cfg, dims=dims)
    g = src.submit(theta0, 0).result()
    wire, guide = compress_guidance(g.guide, cfg.wire.codec())
    plan0 = plan_round(round_id=0, theta=theta0, guidance=g, guide=guide, basis_id=wire.guide_id, train=cfg.train,
                       total_rounds=cfg.rounds.rounds)
    assert plan0.basis_id == plans[0].basis_id and np.array_equal(plan0.theta, plans[0].theta)
    assert np.array_equal(thetas[0], theta0) and np.array_equal(merge(plan0, uploads[0]), thetas[1])


@pytest.mark.slow
def test_flwr_run_over_tls(tmp_path, tiny_llama_gguf):
    """The same deployment with Flower's TLS: the SuperLink serves HTTPS (--ssl-ca-certfile/--ssl-certfile/
    --ssl-keyfile; the self-signed pair is its own CA), SuperNodes and flwr verify it (--root-certificates)."""
    from conftest import tls_pair

    cert, key = (str(x) for x in tls_pair())
    _, _, events, plans, uploads, thetas, logs = _flower_rounds(tmp_path, tiny_llama_gguf, rounds=1,
                                                                tls=(cert, cert, key))
    assert "Uvicorn running on https://127.0.0.1" in logs["superlink"]
    assert all("--insecure" not in logs[n].splitlines()[0] for n in logs)
    _check_exact_replay(plans, uploads, thetas)


# ---- the strategy against a Grid without a SuperLink (fast: no processes, a quadratic loss on the edge) -----------
class _FakeGrid:
    """What EdgezoStrategy uses of a Flower Grid; each pushed message is answered by ``respond(message)``."""

    def __init__(self, nodes: list[int], respond) -> None:
        self.nodes, self.respond, self.pending = nodes, respond, []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # what Flower's grid does before pushing
            self.pending.append(m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids) -> list:
        out = [r for m in self.pending if m.metadata.message_id in ids for r in self.respond(m)]
        self.pending = []
        return out


@pytest.fixture
def flower_task():
    """Flower messages need a run id in the process (a ClientApp / ServerApp process has one)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _quadratic(seed: int):
    from test_round_v2 import SPEC

    target = np.random.default_rng(seed).standard_normal(SPEC.d).astype(np.float32)
    return lambda th, t: float(np.mean((th - target) ** 2))


def _strategy(tmp_path: Path, clients: int, rounds: int):
    from test_round_v2 import SPEC

    from cloud.daemon import StaticGuidance
    from cloud.flower_server import EdgezoStrategy

    cfg = GuideConfig.from_dict({"server": {"state_dir": str(tmp_path / "state")},
                                 "rounds": {"rounds": rounds, "min_clients": clients, "max_clients": clients,
                                            "deadline_s": 5.0, "join_window_s": 0.0},
                                 "train": {"kind": "subspace", "k": 8, "local_steps": 3, "q": 2, "batch": 4}})
    src = StaticGuidance(d=SPEC.d, k=8, mix_alpha=1.0, rng=np.random.default_rng(0), kind="subspace")
    store = Store(root=cfg.server.state_dir)
    events: list[tuple[str, dict]] = []
    theta0 = SPEC.flatten(SPEC.init(0))
    strat = EdgezoStrategy(config=cfg, spec=SPEC, theta0=theta0, guidance=src, store=store,
                           log=lambda e, **f: events.append((e, f)), join_timeout_s=1.0, poll_s=0.01)
    return cfg, strat, store, events, theta0


def _reply(m, *, node: int, name: str | None = None, round_shift: int = 0):
    """The edge's answer to a RoundStart message: FunctionTrainer steps as (seed, g) records in an Update frame."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from edge.round_trainer import FunctionTrainer, round_inputs, round_update, train_round_start

    rs = message_from_entry(m.content.config_records.get(RECORD), RoundStart)
    theta, guide, gid = round_inputs(rs, {})
    trainer = FunctionTrainer(loss_fn=_quadratic(node), examples_per_step=4, seed=node, q=2)
    res = train_round_start(trainer, rs, theta, guide)
    up = round_update(rs, res, client_id=name or client_name(node), guide_id=gid, duration_s=0.0)
    if round_shift:
        up.round_id += round_shift
    return Message(RecordDict({RECORD: ConfigRecord(frame_entry(up))}), reply_to=m)


def test_strategy_rounds_equal_the_daemons_engine_in_process(tmp_path, flower_task):
    """Two rounds through EdgezoStrategy's configure / exchange / aggregate give the θ the study's simulate_round
    (the daemon's engine, in process) computes from the same plan and the same trainers."""
    from cloud.engine import simulate_round
    from edge.round_trainer import FunctionTrainer

    nodes = [7, 18446744073709551615]  # Flower node ids are uint64
    cfg, strat, store, events, _ = _strategy(tmp_path, clients=2, rounds=2)
    try:
        theta = strat.run(_FakeGrid(nodes, lambda m: [_reply(m, node=m.metadata.dst_node_id)]), 2)
        for t in range(2):
            plan, ups = store.load_plan(t), store.uploads(t)
            assert sorted(u.client for u in ups) == sorted(client_name(n) for n in nodes)
            trainers = {client_name(n): FunctionTrainer(loss_fn=_quadratic(n), examples_per_step=4, seed=n, q=2)
                        for n in nodes}
            _, study = simulate_round(plan, trainers, q=2, batch=4)
            assert np.array_equal(study, store.load_theta(t + 1)) and np.array_equal(merge(plan, ups), study)
        assert np.array_equal(theta, store.load_theta(2))
    finally:
        store.close()
    assert [f["uploads"] for e, f in events if e == "round_closed"] == [2, 2]


def test_strategy_keeps_only_valid_uploads_from_the_node_they_name(tmp_path, flower_task):
    """An impersonating node, a failed ClientApp, a wrong round, a duplicate and a node outside the round are
    refused; θ_1 is the replay of the one honest upload."""
    from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

    nodes = [1, 2, 3, 4]

    def respond(m):
        n = m.metadata.dst_node_id
        if n == 1:  # honest, and then the same upload again
            return [_reply(m, node=1), _reply(m, node=1)]
        if n == 2:  # claims to be node 1
            return [_reply(m, node=2, name=client_name(1))]
        if n == 3:  # the ClientApp raised
            return [Message(Error(code=0, reason="model not found"), reply_to=m)]
        stray = Message(RecordDict({RECORD: ConfigRecord(dict(m.content.config_records[RECORD]))}), dst_node_id=99,
                        message_type=MessageType.TRAIN, group_id="0")
        stray.metadata.__dict__["_message_id"] = stray.object_id
        return [_reply(m, node=4, round_shift=1), _reply(stray, node=99)]  # wrong round; a node not selected

    cfg, strat, store, events, theta0 = _strategy(tmp_path, clients=4, rounds=1)
    try:
        strat.run(_FakeGrid(nodes, respond), 1)
        plan, ups = store.load_plan(0), store.uploads(0)
        assert [u.client for u in ups] == [client_name(1)]
        assert np.array_equal(merge(plan, ups), store.load_theta(1)) and not np.array_equal(plan.theta,
                                                                                                store.load_theta(1))
    finally:
        store.close()
    reasons = [f["reason"] for e, f in events if e == "upload_refused"]
    assert len(reasons) == 5, reasons
    for needle in ("already uploaded", "names client 'node-1'", "model not found", "upload for round 1",
                   "node 99 is not in round 0"):
        assert any(needle in r for r in reasons), (needle, reasons)


def test_a_wire_theta_the_flower_path_cannot_send_is_refused_not_ignored(tmp_path):
    """[wire] theta = "adaptive" is the daemon's; the Flower ServerApp refuses it before any state is written."""
    from cloud.flower_server import serve

    toml = _guide_toml(tmp_path / "guide.toml", tmp_path / "state", tmp_path / "log.jsonl", rounds=1)
    toml.write_text(toml.read_text() + '\n[wire]\ntheta = "adaptive"\ntarget = 0.02\n')
    with pytest.raises(ValueError, match=r"\[wire\] theta = 'adaptive' is not supported on the Flower path"):
        serve(None, {"guide-config": str(toml), "state-dir": str(tmp_path / "state")})
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())
