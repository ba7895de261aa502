"""The cloud's backprop past one process (issue "fleets"): torchrun --nproc-per-node 2 (gloo) gives the same
public gradient as one process within 1e-5 relative."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_ranks_gradient_equals_single_process(tmp_path, tiny_llama_dir):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "grad.npz"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cloud.distributed",
                        "--model", str(tiny_llama_dir), "--out", str(out), "--batch", "7"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    z = np.load(out)
    assert int(z["world"]) == 2
    rel = np.linalg.norm(z["dp"] - z["single"]) / np.linalg.norm(z["single"])
    assert np.linalg.norm(z["single"]) > 0 and rel <= 1e-5, rel
    assert abs(float(z["loss_dp"]) - float(z["loss_single"])) <= 1e-5 * abs(float(z["loss_single"]))


# ---- `edgezo guide serve` under torchrun: the daemon on rank 0, the cloud's backprop on every rank ----------
POS = ["a joy to watch", "great acting", "moving and funny", "superb", "clever and warm", "a delight"]
NEG = ["dull and long", "I hated it", "a boring mess", "tedious", "the worst film", "a chore"]
TOKENS = {"c0": "secret-token-0000", "c1": "secret-token-0001"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(log: Path) -> list[dict]:
    import json

    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _serve_one_round(root: Path, model: Path, public: Path, launcher: list[str], ranks: int = 1) -> dict:
    """Run `launcher ... guide serve` for one round with two in-process edges; the guide's log events."""
    import asyncio
    import signal
    import time

    from edge.client import ClientConfig, EdgeClient
    from edge.round_trainer import FunctionTrainer

    root.mkdir()
    port, state, log = _free_port(), root / "state", root / "guide.jsonl"
    (root / "guide.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{state}"\nlog_file = "{log}"\ninsecure = true\n'
        'long_poll_s = 2.0\n[rounds]\nrounds = 1\nmin_clients = 2\nmax_clients = 2\ndeadline_s = 60.0\n'
        f'join_window_s = 0.1\n[model]\npath = "{model}"\nrank = 2\nlora_alpha = 4.0\n'
        f'[data]\nsource = "{public}"\ntext_field = "review"\nlabel_field = "verdict"\n'
        'label_words = { bad = "negative", good = "positive" }\npublic_n = 16\nbatch = 4\n'
        f'[train]\nkind = "subspace"\nk = 4\nlocal_steps = 3\nq = 2\n[cloud]\nwarm_steps = 2\nbatch = 5\nranks = {ranks}\n'
        '[clients.tokens]\n' + "".join(f'{c} = "{t}"\n' for c, t in TOKENS.items()))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", EDGEZO_CACHE=str(root / "cache"))
    err = open(root / "guide.err", "wb")  # noqa: SIM115
    p = subprocess.Popen([*launcher, "-m", "app", "guide", "serve", "--config", str(root / "guide.toml")],
                         cwd=REPO, env=env, stdout=err, stderr=err, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not any(e["event"] == "listening" for e in _events(log)):
            assert p.poll() is None, (root / "guide.err").read_text()[-3000:]
            assert time.monotonic() - t0 < 300, "the guide did not start listening"
            time.sleep(0.1)

        async def edges():
            cs = [EdgeClient(config=ClientConfig(host="127.0.0.1", port=port, client_id=n, token=t,
                                                 state_dir=str(root / n), io_timeout_s=30.0, backoff_initial_s=0.05,
                                                 backoff_max_s=0.2, insecure=True),
                             trainer=FunctionTrainer(loss_fn=lambda th, _t: float(np.mean(th.astype(np.float64) ** 2)),
                                                     examples_per_step=4, seed=10 + i, q=2),
                             rng=np.random.default_rng(i), log=lambda *a, **k: None)
                  for i, (n, t) in enumerate(TOKENS.items())]
            await asyncio.wait_for(asyncio.gather(*(c.run() for c in cs)), 180)

        asyncio.run(edges())
        while not any(e["event"] == "finished" for e in _events(log)):
            assert p.poll() is None and time.monotonic() - t0 < 420, (root / "guide.err").read_text()[-3000:]
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)  # torchrun passes it on: rank 0 stops the daemon, then its followers
        p.wait(120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        err.close()
    return {e["event"]: e for e in _events(log)}


@pytest.mark.slow
def test_guide_serve_under_torchrun_gives_the_single_process_guidance(tmp_path, tiny_llama_dir):
    """`torchrun --nproc-per-node 2 -m app guide serve`: rank 0 is the daemon, the warm start and the subspace's
    gradients are data parallel over both ranks; θ_0 and U equal a one-process guide's within float tolerance.
    So do they with `[cloud] ranks = 2` and no torchrun (the daemon starts its follower itself)."""
    from cloud.store import Store

    public = _public_csv(tmp_path / "public.csv")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    one = _serve_one_round(tmp_path / "one", tiny_llama_dir, public, [sys.executable])
    two = _serve_one_round(tmp_path / "two", tiny_llama_dir, public,
                           [torchrun, "--standalone", "--nproc-per-node", "2"])
    local = _serve_one_round(tmp_path / "local", tiny_llama_dir, public, [sys.executable], ranks=2)
    assert "cloud_data_parallel" not in one
    for e in (two, local):
        assert e["cloud_data_parallel"]["world"] == 2 and e["cloud_data_parallel"]["backend"] == "gloo"
    assert "stopped" in one and "stopped" in two and "stopped" in local  # all shut down cleanly
    plans = []
    for name in ("one", "two", "local"):
        store = Store(root=tmp_path / name / "state")
        try:
            plans.append(store.load_plan(0))
        finally:
            store.close()
    p1 = plans[0]
    for e, p2 in zip((two, local), plans[1:], strict=True):
        assert e["cloud_warm_start"]["steps"] == 2
        # θ_0: two AdamW steps from the same initial adapter, on the same mini-batches (drawn on rank 0 only)
        np.testing.assert_allclose(e["cloud_warm_start"]["public_loss_first"],
                                   one["cloud_warm_start"]["public_loss_first"], rtol=1e-5)
        np.testing.assert_allclose(p2.theta, p1.theta, rtol=1e-4, atol=1e-6)
        # U: the same span (signs and rounding may differ; the stored basis went through the wire codec, so it
        # is re-orthonormalised first): every principal cosine ≈ 1
        u1, u2 = p1.guide.basis.astype(np.float64), p2.guide.basis.astype(np.float64)
        assert u1.shape == u2.shape and u1.shape[1] == 4
        cos = np.linalg.svd(np.linalg.qr(u1)[0].T @ np.linalg.qr(u2)[0], compute_uv=False)
        assert np.all(np.abs(cos - 1.0) <= 1e-4), cos
    # rank 1 took its share of every gradient (2 warm steps + the subspace's) and ended on rank 0's STOP
    err = (tmp_path / "two" / "guide.err").read_text()
    m = re.search(r"rank 1: computed its share of (\d+) cloud gradients; stopped by rank 0", err)
    assert m and int(m.group(1)) >= 3, err[-3000:]


def _public_csv(path: Path) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        for i in range(24):
            w.writerow([(POS if i % 2 else NEG)[i % 6] + f" ({i})", "good" if i % 2 else "bad"])
    return path


@pytest.mark.slow
def test_flower_serverapp_with_cloud_ranks_gives_the_single_process_guidance(tmp_path, tiny_llama_dir):
    """The Flower ServerApp (cloud.flower_server.serve, Flower's Grid faked in process) with ``[cloud] ranks = 2``:
    it starts one follower process and is rank 0; θ_0 and U equal the one-process ServerApp's, and the follower
    is gone when the run ends."""
    pytest.importorskip("flwr")
    import multiprocessing

    import torch.distributed as dist
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import _FakeGrid

    from cloud.flower_server import serve
    from edge.round_trainer import FunctionTrainer, round_inputs, round_update, train_round_start
    from protocol.flower import RECORD, client_name, frame_entry, message_from_entry
    from protocol.messages import RoundStart

    def reply(m):
        rs = message_from_entry(m.content.config_records.get(RECORD), RoundStart)
        theta, guide, gid = round_inputs(rs, {})
        node = m.metadata.dst_node_id
        tr = FunctionTrainer(loss_fn=lambda th, _t: float(np.mean(th.astype(np.float64) ** 2)), examples_per_step=4,
                             seed=node, q=2)
        up = round_update(rs, train_round_start(tr, rs, theta, guide), client_id=client_name(node), guide_id=gid,
                          duration_s=0.0)
        return [Message(RecordDict({RECORD: ConfigRecord(frame_entry(up))}), reply_to=m)]

    public = _public_csv(tmp_path / "public.csv")
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    plans = []
    try:
        for ranks in (1, 2):
            root = tmp_path / f"ranks{ranks}"
            root.mkdir()
            (root / "guide.toml").write_text(
                f'[server]\nstate_dir = "{root / "state"}"\nlog_file = "{root / "guide.jsonl"}"\n'
                '[rounds]\nrounds = 1\nmin_clients = 2\nmax_clients = 2\ndeadline_s = 30.0\njoin_window_s = 0.0\n'
                f'[model]\npath = "{tiny_llama_dir}"\nrank = 2\nlora_alpha = 4.0\n'
                f'[data]\nsource = "{public}"\ntext_field = "review"\nlabel_field = "verdict"\n'
                'label_words = { bad = "negative", good = "positive" }\npublic_n = 16\nbatch = 4\n'
                '[train]\nkind = "subspace"\nk = 4\nlocal_steps = 3\nq = 2\nbatch = 4\n'
                f'[cloud]\nwarm_steps = 2\nbatch = 5\nranks = {ranks}\n')
            serve(_FakeGrid([3, 4], reply), {"guide-config": str(root / "guide.toml"), "poll-s": 0.01})
            assert not multiprocessing.active_children() and not dist.is_initialized()
            events = _events(root / "guide.jsonl")
            dp = [e for e in events if e["event"] == "cloud_data_parallel"]
            assert (dp[0]["world"], dp[0]["backend"]) == (2, "gloo") if ranks == 2 else not dp
            assert any(e["event"] == "finished" for e in events)
            from cloud.store import Store

            store = Store(root=root / "state")
            try:
                plans.append(store.load_plan(0))
            finally:
                store.close()
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old
    p1, p2 = plans
    np.testing.assert_allclose(p2.theta, p1.theta, rtol=1e-4, atol=1e-6)
    u1, u2 = p1.guide.basis.astype(np.float64), p2.guide.basis.astype(np.float64)
    cos = np.linalg.svd(np.linalg.qr(u1)[0].T @ np.linalg.qr(u2)[0], compute_uv=False)
    assert u1.shape == u2.shape == (u1.shape[0], 4) and np.all(np.abs(cos - 1.0) <= 1e-4), cos


def test_cloud_ranks_is_checked_and_refused_where_it_cannot_act(tmp_path):
    from cloud.cli import build_source
    from cloud.config import GuideConfig

    with pytest.raises(ValueError, match="ranks must be >= 1, got 0"):
        GuideConfig.from_dict({"cloud": {"ranks": 0}})
    cfg = GuideConfig.from_dict({"server": {"state_dir": str(tmp_path)}, "cloud": {"ranks": 2}})
    assert cfg.cloud.ranks == 2
    with pytest.raises(ValueError, match=r"ranks > 1 needs a model"):  # a model-free guide has no backprop
        build_source(cfg, dims="2,64,128,4,2")
    cfg = cfg.override(model={"path": str(tmp_path / "model")})
    with pytest.raises(ValueError, match="under torchrun leave it at 1"):  # torchrun already gave the ranks
        build_source(cfg, scorer_wrap=lambda s: s)
