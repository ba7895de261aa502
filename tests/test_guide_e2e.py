"""End to end with real processes: `edgezo guide serve` (TLS, the operator's own CSV as public data, a tiny torch
model) and two `edgezo train --guide` devices (llama.cpp on the tiny GGUF). A device is killed -9 mid-round and
restarted, then the guide is killed -9 and restarted. The guide's final θ is the replay of every stored upload,
round by round, and every upload a device saw acknowledged is stored."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tls_pair

REPO = Path(__file__).resolve().parents[1]
TOKENS = {"d0": "device-token-0000", "d1": "device-token-0001"}
POS = ["a joy to watch", "great acting", "moving and funny", "superb", "clever and warm", "a delight"]
NEG = ["dull and long", "I hated it", "a boring mess", "tedious", "the worst film", "a chore"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(log: Path) -> list[dict]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9
            pass
    return out


def _wait(pred, what: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_kill9_a_device_then_the_guide_and_every_acked_upload_is_in_the_replayed_theta(
        tmp_path, tiny_llama_dir, tiny_llama_gguf):
    from cloud.engine import merge
    from cloud.store import Store

    cert, key = tls_pair()
    public = tmp_path / "public.csv"
    with open(public, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        for i in range(24):
            w.writerow([(POS if i % 2 else NEG)[i % 6] + f" ({i})", "good" if i % 2 else "bad"])
    port = _free_port()
    state, log = tmp_path / "state", tmp_path / "guide.jsonl"
    (tmp_path / "guide.toml").write_text(
        f'[server]\nport = {port}\nstate_dir = "{state}"\nlog_file = "{log}"\nlong_poll_s = 2.0\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
        f'[rounds]\nrounds = 2\nmin_clients = 2\nmax_clients = 2\ndeadline_s = 120.0\njoin_window_s = 0.2\n'
        f'[model]\npath = "{tiny_llama_dir}"\nrank = 2\nlora_alpha = 4.0\n'
        f'[data]\nsource = "{public}"\ntext_field = "review"\nlabel_field = "verdict"\n'
        f'label_words = {{ bad = "negative", good = "positive" }}\npublic_n = 16\nbatch = 4\n'
        f'[train]\nkind = "subspace"\nk = 4\nlocal_steps = 600\nq = 1\nbatch = 4\n'
        f'[cloud]\nwarm_steps = 2\nbatch = 4\n'
        '[clients.tokens]\n' + "".join(f'{c} = "{t}"\n' for c, t in TOKENS.items()))
    env = dict(os.environ, PYTHONPATH=str(REPO), EDGEZO_CACHE=str(tmp_path / "cache"))

    def guide() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "app", "guide", "serve", "--config",
                                 str(tmp_path / "guide.toml")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "guide.err", "ab"))  # noqa: SIM115

    def device(name: str) -> subprocess.Popen:
        data = tmp_path / f"{name}.csv"
        if not data.exists():
            data.write_text("text,label\n" + "".join(f"{(POS if i % 2 else NEG)[(i + len(name)) % 6]} {name}{i},"
                                                     f"{'positive' if i % 2 else 'negative'}\n" for i in range(16)))
        return subprocess.Popen(
            [sys.executable, "-m", "app", "train", "--model", str(tiny_llama_gguf), "--data", str(data),
             "--label-words", "negative=negative,positive=positive", "--guide", f"127.0.0.1:{port}",
             "--client-id", name, "--token", TOKENS[name], "--ca", str(cert), "--state-dir", str(tmp_path / name),
             "--rank", "2", "--alpha", "4", "--threads", "1", "--n-ctx", "256", "--no-progress"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.err", "ab"))  # noqa: SIM115

    procs: list[subprocess.Popen] = []
    try:
        g = guide()
        procs.append(g)
        _wait(lambda: any(e["event"] == "listening" for e in _events(log)), "the guide to listen")
        d0, d1 = device("d0"), device("d1")
        procs += [d0, d1]
        # a device dies mid-round: after round 0 opened, before it uploaded
        _wait(lambda: any(e["event"] == "round_open" and e["round"] == 0 for e in _events(log)), "round 0")
        time.sleep(0.3)
        killed_before_upload = not any(e["event"] == "upload" and e["client"] == "d0" for e in _events(log))
        d0.send_signal(signal.SIGKILL)
        d0.wait(10)
        d0 = device("d0")
        procs.append(d0)
        # the guide dies right after round 0's second upload is acknowledged
        _wait(lambda: sum(e["event"] == "upload" and e["round"] == 0 for e in _events(log)) >= 2, "round 0 uploads")
        g.send_signal(signal.SIGKILL)
        g.wait(10)
        g = guide()
        procs.append(g)
        _wait(lambda: any(e["event"] == "finished" for e in _events(log)), "the guide to finish", timeout=240)
        for d in (d0, d1):
            d.wait(120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert killed_before_upload  # the kill landed mid-round (600 local steps take seconds on the tiny model)
    store = Store(root=state)
    try:
        stored = {(r, u.client): u for r in (0, 1) for u in store.uploads(r)}
        for r in (0, 1):
            plan = store.load_plan(r)
            ups = [u for (rr, _), u in sorted(stored.items()) if rr == r]
            assert len(ups) == 2
            np.testing.assert_array_equal(merge(plan, ups).astype(np.float32), store.load_theta(r + 1))
        for name in TOKENS:
            acked = [json.loads(x)["round"] for x in (tmp_path / name / "rounds.jsonl").read_text().splitlines()
                     if json.loads(x)["reply"] == "ack"]
            assert sorted(set(acked)) == [0, 1] and all((r, name) in stored for r in acked)
    finally:
        store.close()
    events = _events(log)
    assert sum(e["event"] == "resumed" for e in events) >= 1 and any(e["event"] == "public_data" for e in events)
