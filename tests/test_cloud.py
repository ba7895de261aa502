"""Guide daemon, aggregation, store and wire: model-free tests (static guidance, a quadratic loss on the edge).

Real components throughout: the asyncio daemon on 127.0.0.1, SQLite, the edge client and estimator.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import client_tls, tls_pair  # noqa: E402

from cloud.aggregate import RoundPlan, Upload, UploadRefused, aggregate, validate_upload, weights
from cloud.config import GuideConfig
from cloud.daemon import GuideServer, StaticGuidance
from cloud.store import Store
from edge.client import ClientConfig, EdgeClient
from edge.round_trainer import FunctionTrainer
from protocol.arrays import packb
from protocol.auth import answer
from protocol.errors import ProtocolError
from protocol.framing import read_frame, write_frame
from protocol.messages import (
    Ack,
    Error,
    Hello,
    LossStats,
    RoundRequest,
    RoundStart,
    Update,
    Welcome,
    decode,
    encode,
)
from protocol.spec import AdapterSpec, ModelDims
from protocol.zo import Group, Guide, Schedule, StepRecord, orthonormal_basis, replay

SPEC = AdapterSpec(kind="lora", dims=ModelDims(2, 16, 32, 4, 2), rank=2)
REPO = Path(__file__).resolve().parents[1]


def _quadratic(seed: int):
    target = np.random.default_rng(seed).standard_normal(SPEC.d).astype(np.float32)
    return lambda th, t: float(np.mean((th - target) ** 2))


def _tokens(n: int) -> dict[str, str]:
    return {f"c{i}": f"secret-token-{i:04d}" for i in range(n)}


def _server(tmp_path: Path, tokens: dict[str, str], **rounds) -> GuideServer:
    cfg = GuideConfig(tokens=tokens).override(
        server={"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl"),
                "long_poll_s": 2.0, "io_timeout_s": 10.0, "tls_cert": str(tls_pair()[0]), "tls_key": str(tls_pair()[1])},
        rounds={"rounds": 2, "min_clients": 1, "max_clients": 8, "deadline_s": 10.0, "join_window_s": 0.2, **rounds},
        train={"local_steps": 2, "lr": 0.01, "lam": 0.0, "q": 2})
    return GuideServer(config=cfg, spec=SPEC, theta0=SPEC.flatten(SPEC.init(0)),
                       guidance=StaticGuidance(d=SPEC.d, k=2, mix_alpha=0.5, rng=np.random.default_rng(0)))


def _client(port: int, name: str, token: str, tmp_path: Path, seed: int, **kw) -> EdgeClient:
    cfg = ClientConfig(host="127.0.0.1", port=port, client_id=name, token=token,
                       state_dir=str(tmp_path / name), io_timeout_s=10.0, backoff_initial_s=0.05,
                       backoff_max_s=0.2, ca=str(tls_pair()[0]), **kw)
    return EdgeClient(config=cfg, trainer=FunctionTrainer(loss_fn=_quadratic(1), examples_per_step=4, seed=seed, q=2),
                      rng=np.random.default_rng(seed), log=lambda *a, **k: None)


async def _handshake(port: int, name: str, token: str):
    """A raw handshake that returns the server's last answer (Welcome or Error) instead of raising."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(), server_hostname="127.0.0.1")
    await write_frame(w, Hello(client_id=name))
    ch = await read_frame(r, timeout=5)
    await write_frame(w, answer(ch, name, token))
    return r, w, await read_frame(r, timeout=5)


def _update(rid: int, client: str, rs: RoundStart, steps: list[StepRecord], examples: int) -> Update:
    guide_id = rs.guidance.guide_id if rs.guidance is not None else ""
    return Update(round_id=rid, client_id=client, steps=steps, first_step=rs.hyper.first_step, n_examples=examples,
                  loss=LossStats(mean=1.0, min=1.0, max=1.0, last=1.0), guide_id=guide_id)


def _records(rng: np.random.Generator, n_steps: int, q: int = 2) -> list[StepRecord]:
    return [StepRecord(groups=[Group(seeds=rng.integers(0, 2**63, q, dtype=np.uint64),
                                     grads=rng.standard_normal(q).astype(np.float32))]) for _ in range(n_steps)]


# ---- aggregation: pure functions -----------------------------------------------------------------
def test_aggregate_is_weighted_replay_and_refuses_foreign_uploads():
    # Prepare: a round plan with a guide and two uploads of different sizes
    rng = np.random.default_rng(0)
    theta = SPEC.flatten(SPEC.init(0))
    guide = Guide(basis=orthonormal_basis(list(rng.standard_normal((2, SPEC.d)))), alpha=0.5)
    plan = RoundPlan(round_id=3, basis_id="b3", theta=theta, guide=guide, schedule=Schedule(lr=0.01),
                     lam=0.0, local_steps=2, first_step=6)
    ups = [Upload(client="x", round_id=3, basis_id="b3", steps=_records(rng, 2), examples=30),
           Upload(client="a", round_id=3, basis_id="b3", steps=_records(rng, 1), examples=10)]
    # Execute
    out = aggregate(plan, ups)
    # Assert: θ + Σ w_i (replay_i − θ), w ∝ examples, independent of arrival order
    exp = theta.astype(np.float64)
    for w, u in zip(weights(ups), ups, strict=False):
        exp += w * (replay(theta, u.steps, plan.schedule, guide, first_step=6).astype(np.float64) - theta)
    np.testing.assert_allclose(out, exp.astype(np.float32), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(out, aggregate(plan, ups[::-1]))
    np.testing.assert_array_equal(aggregate(plan, []), theta)
    for bad in (Upload(client="a", round_id=2, basis_id="b3", steps=ups[0].steps, examples=1),
                Upload(client="a", round_id=3, basis_id="old", steps=ups[0].steps, examples=1),
                Upload(client="a", round_id=3, basis_id="b3", steps=_records(rng, 3), examples=1),
                Upload(client="a", round_id=3, basis_id="b3", steps=ups[0].steps, examples=0)):
        with pytest.raises(UploadRefused):
            validate_upload(plan, bad)


def test_store_commits_and_reads_back_uploads(tmp_path):
    # Prepare
    st = Store(root=tmp_path)
    rng = np.random.default_rng(1)
    up = Upload(client="c0", round_id=0, basis_id="b", steps=_records(rng, 2), examples=5, loss_after=0.5)
    theta = rng.standard_normal(SPEC.d).astype(np.float32)
    plan = RoundPlan(round_id=0, basis_id="b", theta=theta, guide=None, schedule=Schedule(), lam=0.0, local_steps=2)
    # Execute
    st.open_round(plan, selected=["c0"], deadline=time.time() + 5)
    st.commit_uploads([up])
    st.close()
    st2 = Store(root=tmp_path)
    back = st2.uploads(0)
    # Assert: identical records, plan and WAL mode
    assert st2.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(back) == 1 and back[0].examples == 5 and back[0].loss_after == 0.5
    for a, b in zip(back[0].steps, up.steps, strict=False):
        np.testing.assert_array_equal(a.groups[0].seeds, b.groups[0].seeds)
        np.testing.assert_array_equal(a.groups[0].grads, b.groups[0].grads)
    np.testing.assert_array_equal(st2.load_plan(0).theta, theta)
    assert not list(tmp_path.glob(".*tmp*"))


def test_store_group_commit_spans_several_statements(tmp_path):
    """A batch larger than one multi-row INSERT (here 3 rows a statement) lands whole, in one transaction; a batch
    with a row already stored lands not at all."""
    st = Store(root=tmp_path)
    st._rows = 3  # as on an SQLite whose variable limit allows 3 uploads a statement
    rng = np.random.default_rng(4)
    ups = [Upload(client=f"c{i}", round_id=0, basis_id="b", steps=_records(rng, 2), examples=i + 1) for i in range(7)]
    st.commit_uploads(ups)
    back = {u.client: u for u in st.uploads(0)}
    assert sorted(back) == [f"c{i}" for i in range(7)] and [back[f"c{i}"].examples for i in range(7)] == list(
        range(1, 8))
    assert {c["client"]: c["uploads"] for c in st.clients()} == {f"c{i}": 1 for i in range(7)}
    late = Upload(client="c7", round_id=0, basis_id="b", steps=_records(rng, 2), examples=1)
    with pytest.raises(sqlite3.IntegrityError):
        st.commit_uploads([late, *ups[5:]])  # c5, c6 are stored: the whole batch rolls back, c7 included
    assert len(st.uploads(0)) == 7 and st.clients()[-1]["client"] == "c6"


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_update_roundtrip_and_rejects_garbage():
    steps = _records(np.random.default_rng(2), 2)
    msg = decode(encode(Update(round_id=0, client_id="c0", steps=steps, n_examples=4,
                               loss=LossStats(mean=1.0, min=1.0, max=1.0, last=1.0))))
    assert msg.steps[1].groups[0].seeds.tolist() == steps[1].groups[0].seeds.tolist()
    for junk in (b"\xc1", b"\x93\x01\x02\x03", packb({"v": 1, "type": 5}), b"\xd4\x07\x00",
                 packb({"v": 1, "type": "update", "round_id": 0, "client_id": "c0", "n_examples": 1,
                        "loss": {"mean": 1.0, "min": 1.0, "max": 1.0, "last": 1.0},
                        "steps": {"seeds": "x"}})):
        with pytest.raises(ProtocolError):
            decode(_frame(junk))


# ---- daemon over loopback ------------------------------------------------------------------------
def test_clients_run_rounds_and_status(tmp_path, capsys):
    from app.cli import main as edgezo

    async def main():
        srv = _server(tmp_path, _tokens(3), rounds=2, min_clients=3, max_clients=3)
        await srv.start()
        try:
            clients = [_client(srv.port, f"c{i}", f"secret-token-{i:04d}", tmp_path, i) for i in range(3)]
            sums = await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 60)
            from cloud.cli import fetch_status

            while not srv.finished:
                await asyncio.sleep(0.02)
            st = await fetch_status("127.0.0.1", srv.port, tls=client_tls(), client_id="c0",
                                    token="secret-token-0000")
            rc = await asyncio.get_running_loop().run_in_executor(
                None, edgezo, ["guide", "status", f"127.0.0.1:{srv.port}", "--ca", str(tls_pair()[0]),
                                 "--client-id", "c1", "--token", "secret-token-0001"])
            assert rc == 0
            return sums, st, [c.theta for c in clients]
        finally:
            await srv.stop()

    sums, st, _ = asyncio.run(main())
    assert [[r["reply"] for r in s.rounds] for s in sums] == [["ack", "ack"]] * 3
    assert st["finished"] and [r["uploads"] for r in st["rounds"]] == [3, 3]
    assert sorted(c["client"] for c in st["clients"]) == ["c0", "c1", "c2"]
    assert st["last_down_bytes_per_client"] > 4 * SPEC.d and st["last_up_bytes_per_upload"] > 0
    assert (tmp_path / "state" / "theta-2.npz").exists()
    printed = capsys.readouterr().out
    assert "finished=True" in printed and "clients (3): c0(2), c1(2), c2(2)" in printed


def test_unknown_token_oversize_frame_and_malformed_messages_are_contained(tmp_path):
    async def main():
        srv = _server(tmp_path, _tokens(2), rounds=1, min_clients=1, max_clients=2)
        await srv.start()
        proc = psutil.Process()
        try:
            # unknown client and wrong token: refused, connection closed
            _, _, reply = await _handshake(srv.port, "intruder", "secret-token-0000")
            _, _, reply2 = await _handshake(srv.port, "c0", "wrong-token-xxxx")
            # an authenticated client announces a 2 GiB frame: refused from the header, nothing allocated
            r, w, welcome = await _handshake(srv.port, "c1", "secret-token-0001")
            rss0 = proc.memory_info().rss
            w.write(struct.pack(">I", 2**31 - 1) + b"x" * 1024)
            await w.drain()
            big = await read_frame(r, timeout=5)
            rss1 = proc.memory_info().rss
            eof = await r.read()
            # a client sending garbage frames, while c0 trains normally: dropped at the max_errors-th (5)
            r3, w3, _ = await _handshake(srv.port, "c1", "secret-token-0001")
            good = asyncio.ensure_future(_client(srv.port, "c0", "secret-token-0000", tmp_path, 0).run())
            errs = []
            for junk in (b"\xc1\xc1", packb({"v": 1, "type": "update", "round_id": "x"}), b"\x92\x01",
                         packb({"v": 1, "type": "nope"}), b"\xc1"):
                w3.write(_frame(junk))
                await w3.drain()
                errs.append(await read_frame(r3, timeout=5))
            dropped = await asyncio.wait_for(r3.read(), 5)
            summary = await asyncio.wait_for(good, 30)
            return reply, reply2, welcome, big, rss1 - rss0, eof, errs, dropped, summary, dict(srv.stats)
        finally:
            await srv.stop()

    reply, reply2, welcome, big, drss, eof, errs, dropped, summary, stats = asyncio.run(main())
    assert reply == Error(code="auth", message="unknown client or bad token")
    assert isinstance(reply2, Error) and reply2.code == "auth" and isinstance(welcome, Welcome)
    assert isinstance(big, Error) and big.code == "frame_too_large" and big.fatal and eof == b""
    assert drss < 32 << 20
    assert [type(e) for e in errs] == [Error] * 5 and [e.fatal for e in errs] == [False] * 4 + [True]
    assert dropped == b""  # the guide closed the connection after the fifth
    assert [r["reply"] for r in summary.rounds] == ["ack"]  # c0's round went on
    assert stats["auth_failed"] == 2 and stats["malformed"] >= 5


def test_dead_client_does_not_hold_round_past_deadline(tmp_path):
    async def main():
        srv = _server(tmp_path, _tokens(3), rounds=1, min_clients=3, max_clients=3, deadline_s=2.0)
        await srv.start()
        try:
            # c2 joins, receives the round, then dies silently (socket left open, like a hung device)
            r, w, _ = await _handshake(srv.port, "c2", "secret-token-0002")
            await write_frame(w, RoundRequest())
            clients = [_client(srv.port, f"c{i}", f"secret-token-{i:04d}", tmp_path, i) for i in range(2)]
            t0 = time.monotonic()
            tasks = [asyncio.ensure_future(c.run()) for c in clients]
            round_msg = await read_frame(r, timeout=10)
            await asyncio.wait_for(asyncio.gather(*tasks), 20)
            elapsed = time.monotonic() - t0
            return round_msg, elapsed, srv.store.rounds()
        finally:
            await srv.stop()

    round_msg, elapsed, rounds = asyncio.run(main())
    assert isinstance(round_msg, RoundStart)
    assert rounds[0]["status"] == "closed" and rounds[0]["uploads"] == 2 and rounds[0]["selected"] == 3
    assert elapsed < 2.0 + 3.0  # closed at the deadline (+ join window and slack), not waiting for c2


def test_restarted_client_resends_its_pending_upload(tmp_path):
    async def main():
        srv = _server(tmp_path, _tokens(1), rounds=1, min_clients=1, max_clients=1)
        await srv.start()
        try:
            # the client got round 0, computed, persisted its upload ... and crashed before sending it
            r, w, _ = await _handshake(srv.port, "c0", "secret-token-0000")
            await write_frame(w, RoundRequest())
            rmsg = await read_frame(r, timeout=10)
            w.close()
            steps = _records(np.random.default_rng(9), 2)
            (tmp_path / "c0").mkdir()
            (tmp_path / "c0" / "pending.bin").write_bytes(encode(_update(0, "c0", rmsg, steps, 4)))
            # the restarted client re-sends it first, then carries on until the guide is done
            await asyncio.wait_for(_client(srv.port, "c0", "secret-token-0000", tmp_path, 0).run(), 30)
            while not srv.finished:
                await asyncio.sleep(0.02)
            return steps, await srv._db(srv.store.uploads, 0)
        finally:
            await srv.stop()

    steps, stored = asyncio.run(main())
    assert len(stored) == 1 and stored[0].examples == 4
    np.testing.assert_array_equal(stored[0].steps[1].groups[0].seeds, steps[1].groups[0].seeds)
    assert not (tmp_path / "c0" / "pending.bin").exists()


def test_restarted_daemon_resends_the_same_round_bits(tmp_path):
    async def get_round(srv: GuideServer) -> RoundStart:
        await srv.start()
        try:
            r, w, _ = await _handshake(srv.port, "c0", "secret-token-0000")
            await write_frame(w, RoundRequest())
            rs = await read_frame(r, timeout=10)
            w.close()
            return rs
        finally:
            await srv.stop()

    # Prepare: round 0 opened (q8 guidance) and the daemon stopped with the round still open
    first = asyncio.run(get_round(_server(tmp_path, _tokens(1), rounds=1)))
    # Execute: a new daemon on the same state dir resumes the round and sends it again
    again = asyncio.run(get_round(_server(tmp_path, _tokens(1), rounds=1)))
    # Assert: same θ and the same decoded guide (so uploads replay exactly), whatever the codec
    assert first.guidance.basis.codec != "fp32" and first.guidance.guide_id == again.guidance.guide_id
    np.testing.assert_array_equal(first.theta.decode(), again.theta.decode())
    np.testing.assert_array_equal(first.guidance.to_guide().basis, again.guidance.to_guide().basis)


# ---- kill -9 -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cfg_path: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "app", "guide", "serve", "--config", str(cfg_path),
                             "--dims", "2,16,32,4,2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(log, "ab"))  # noqa: SIM115


async def _wait_port(port: int, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while True:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() - t0 > timeout:
                raise
            await asyncio.sleep(0.1)


def test_kill9_daemon_keeps_every_acknowledged_upload(tmp_path):
    # Prepare: a daemon subprocess, 4 selected clients; 3 upload and are acked, the 4th stalls
    port = _free_port()
    tokens = _tokens(4)
    cfg_path = tmp_path / "guide.toml"
    cfg_path.write_text(
        f'[server]\nport = {port}\nstate_dir = "{tmp_path / "state"}"\nlong_poll_s = 2.0\n'
        f'tls_cert = "{tls_pair()[0]}"\ntls_key = "{tls_pair()[1]}"\n'
        f'[rounds]\nrounds = 1\nmin_clients = 4\nmax_clients = 4\ndeadline_s = 6.0\njoin_window_s = 0.2\n'
        f'[train]\nkind = "guided"\nlocal_steps = 2\nlam = 0.0\n[clients.tokens]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in tokens.items()))
    proc = _spawn(cfg_path, tmp_path / "guide1.log")

    async def phase1():
        await _wait_port(port)
        conns = {c: await _handshake(port, c, t) for c, t in tokens.items()}
        for _r, w, _ in conns.values():
            await write_frame(w, RoundRequest())
        rounds = {c: await read_frame(r, timeout=20) for c, (r, w, _) in conns.items()}
        acked = {}
        rng = np.random.default_rng(5)
        for c in ("c0", "c1", "c2"):
            r, w, _ = conns[c]
            steps = _records(rng, 2)
            await write_frame(w, _update(0, c, rounds[c], steps, 8 + int(c[1])))
            ack = await read_frame(r, timeout=10)
            if isinstance(ack, Ack) and ack.accepted:
                acked[c] = steps
        return rounds["c0"], acked

    try:
        round0, acked = asyncio.run(phase1())
        # Execute: kill -9 right after the acks, then restart on the same state dir
        proc.kill()
        proc.wait(10)
        proc = _spawn(cfg_path, tmp_path / "guide2.log")

        async def phase2():
            await _wait_port(port)
            from cloud.cli import fetch_status

            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:
                st = await fetch_status("127.0.0.1", port, tls=client_tls(), client_id="c0",
                                        token=tokens["c0"])
                if st["rounds"] and st["rounds"][0]["status"] == "closed":
                    return st
                await asyncio.sleep(0.2)
            raise TimeoutError("round did not close after restart")

        st = asyncio.run(phase2())
    finally:
        proc.terminate()
        rc = proc.wait(20)
    # Assert: all 3 acknowledged uploads survived and θ_1 is exactly their aggregate
    assert sorted(acked) == ["c0", "c1", "c2"]
    assert st["rounds"][0]["uploads"] == 3
    store = Store(root=tmp_path / "state")
    plan = store.load_plan(0)
    expected = aggregate(plan, [Upload(client=c, round_id=0, basis_id=plan.basis_id, steps=s,
                                       examples=8 + int(c[1])) for c, s in acked.items()])
    np.testing.assert_array_equal(store.load_theta(1), expected)
    assert rc == 0  # SIGTERM: clean shutdown


class _PerRoundGuidance:
    """A new seeded basis and gradient every round, built in a worker thread after a short delay (as a real
    guide's backprop would be): the guidance source for prefetch tests."""

    def __init__(self, d: int, delay_s: float = 0.2) -> None:
        import concurrent.futures as cf

        self.d, self.delay_s, self.builds = d, delay_s, 0
        self.pool = cf.ThreadPoolExecutor(max_workers=1)

    def _build(self, round_id: int):
        from cloud.guidance import Guidance

        time.sleep(self.delay_s)
        self.builds += 1  # every build differs (a real guide's gradients move with θ and the public batch)
        rng = np.random.default_rng(100 + self.builds)
        guide = Guide(orthonormal_basis(list(rng.standard_normal((2, self.d)))), 0.5,
                      (0.1 * rng.standard_normal(self.d)).astype(np.float32))
        return Guidance(guide=guide, public_loss=1.0, theta_round=round_id)

    def submit(self, theta, round_id):
        return self.pool.submit(self._build, round_id)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _run_guided(tmp_path: Path, prefetch: bool) -> tuple[np.ndarray, list[dict], list[list[str]]]:
    """2 clients × 3 guided rounds with λ = 0.5; returns θ_3, the guide's round_frame log events, client events."""
    events: list[list[str]] = [[], []]

    async def main():
        cfg = GuideConfig(tokens=_tokens(2)).override(
            server={"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl"),
                    "long_poll_s": 2.0, "io_timeout_s": 10.0, "tls_cert": str(tls_pair()[0]),
                    "tls_key": str(tls_pair()[1])},
            rounds={"rounds": 3, "min_clients": 2, "max_clients": 2, "deadline_s": 20.0, "join_window_s": 0.0},
            train={"local_steps": 2, "lr": 0.01, "lam": 0.5, "q": 2})
        srv = GuideServer(config=cfg, spec=SPEC, theta0=SPEC.flatten(SPEC.init(0)), guidance=_PerRoundGuidance(SPEC.d))
        await srv.start()
        try:
            clients = [_client(srv.port, f"c{i}", f"secret-token-{i:04d}", tmp_path, i, prefetch=prefetch)
                       for i in range(2)]
            for i, c in enumerate(clients):
                c.log = lambda ev, _i=i, **f: events[_i].append(ev)
            await asyncio.wait_for(asyncio.gather(*(c.run() for c in clients)), 60)
            while not srv.finished:
                await asyncio.sleep(0.02)
        finally:
            await srv.stop()

    asyncio.run(main())
    import json

    frames = [e for e in map(json.loads, (tmp_path / "guide.jsonl").read_text().splitlines())
              if e["event"] == "round_frame"]
    return Store(root=tmp_path / "state").load_theta(3), frames, events


def test_prefetched_guidance_shrinks_round_start_and_keeps_replay_exact(tmp_path):
    # Execute: the same guided run with and without prefetching the next round's guidance
    theta_pf, frames_pf, events_pf = _run_guided(tmp_path / "prefetch", prefetch=True)
    theta_no, frames_no, events_no = _run_guided(tmp_path / "plain", prefetch=False)
    # Assert: identical training, and rounds 1-2 went out without the guidance arrays when prefetched
    np.testing.assert_array_equal(theta_pf, theta_no)
    assert all("prefetched" in ev and "prefetch_failed" not in ev for ev in events_pf)
    assert not any("prefetched" in ev for ev in events_no)
    by_ref = {f["round"] for f in frames_pf if f["by_ref"]}
    assert by_ref == {1, 2}
    full = max(f["bytes"] for f in frames_pf if not f["by_ref"])
    small = max(f["bytes"] for f in frames_pf if f["by_ref"])
    assert small < full - 2 * SPEC.d  # Q (d × 2, q8) and g_B (q8) stayed off the round-start path
    assert not any(f["by_ref"] for f in frames_no)
