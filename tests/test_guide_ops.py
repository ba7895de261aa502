"""The guide for operators (issue "operators"): TLS by default on the real wire, and clear one-line startup errors.

The daemon and real edge clients talk TLS on loopback (tests/test_cloud.py runs every round test that way); here:
a client trusting another CA is refused with a message that says what to do, a plaintext client cannot talk to
a TLS guide, a guide without TLS settings refuses to start unless insecure = true is explicit, and `guide serve`
on a taken port is one line with exit code 2.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import tls_pair

from cloud.config import GuideConfig, ServerConfig
from cloud.daemon import GuideServer, StaticGuidance
from cloud.tls import TLSError, self_signed_pair
from edge.client import AuthRefused, ClientConfig, EdgeClient, FunctionTrainer
from protocol.spec import AdapterSpec, ModelDims

SPEC = AdapterSpec(kind="lora", dims=ModelDims(2, 16, 32, 4, 2), rank=2)
REPO = Path(__file__).resolve().parents[1]
TOKENS = {"c0": "secret-token-0000"}


def _server(tmp_path: Path, **server) -> GuideServer:
    cfg = GuideConfig(tokens=TOKENS).override(
        server={"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl"),
                "long_poll_s": 1.0, "io_timeout_s": 5.0, **server},
        rounds={"rounds": 1, "min_clients": 1, "max_clients": 1, "deadline_s": 10.0, "join_window_s": 0.0},
        train={"kind": "guided", "local_steps": 2, "lr": 0.01, "lam": 0.0, "q": 1})
    return GuideServer(config=cfg, spec=SPEC, theta0=SPEC.flatten(SPEC.init(0)),
                       guidance=StaticGuidance(d=SPEC.d, k=2, alpha=0.5, rng=np.random.default_rng(0)))


def _client(port: int, tmp_path: Path, **kw) -> EdgeClient:
    cfg = ClientConfig(host="127.0.0.1", port=port, client_id="c0", token=TOKENS["c0"], state_dir=str(tmp_path / "c0"),
                       io_timeout_s=5.0, backoff_initial_s=0.05, backoff_max_s=0.1, max_reconnects=2, **kw)
    target = np.ones(SPEC.d, np.float32)
    return EdgeClient(config=cfg, trainer=FunctionTrainer(loss_fn=lambda th, t: float(np.mean((th - target) ** 2)),
                                                          examples_per_step=4, seed=0, q=1),
                      rng=np.random.default_rng(0), log=lambda *a, **k: None)


def _tls_server(tmp_path: Path) -> GuideServer:
    cert, key = tls_pair()
    return _server(tmp_path, tls_cert=str(cert), tls_key=str(key))


def test_tls_round_and_a_client_with_the_wrong_ca_is_refused(tmp_path):
    """One TLS round end to end; a client trusting another CA, and a plaintext client, get a clear refusal."""
    other_ca, _ = self_signed_pair(tmp_path / "other", hosts=["127.0.0.1"], days=1)

    async def main():
        srv = _tls_server(tmp_path)
        await srv.start()
        try:
            wrong = _client(srv.port, tmp_path / "w", ca=str(other_ca))
            with pytest.raises(AuthRefused) as e_wrong:
                await asyncio.wait_for(wrong.run(), 20)
            plain = _client(srv.port, tmp_path / "p", insecure=True)
            with pytest.raises((ConnectionError, AuthRefused)) as e_plain:
                await asyncio.wait_for(plain.run(), 20)
            good = await asyncio.wait_for(_client(srv.port, tmp_path / "g", ca=str(tls_pair()[0])).run(), 30)
            return e_wrong.value, e_plain.value, good
        finally:
            await srv.stop()

    e_wrong, e_plain, good = asyncio.run(main())
    assert "certificate is not trusted" in str(e_wrong) and "--ca" in str(e_wrong)
    assert [r["reply"] for r in good.rounds] == ["ack"]
    log = (tmp_path / "guide.jsonl").read_text()
    assert '"tls": true' in log and "insecure" not in log


def test_a_guide_without_tls_settings_refuses_to_start_unless_insecure(tmp_path):
    with pytest.raises(ValueError, match=r"needs tls_cert and tls_key .*edgezo guide cert.*insecure = true"):
        ServerConfig().ssl_context()
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(tls_cert="c.pem")
    with pytest.raises(ValueError, match="contradict"):
        ServerConfig(tls_cert="c.pem", tls_key="k.pem", insecure=True)
    with pytest.raises(ValueError, match="cannot be loaded"):
        ServerConfig(tls_cert=str(tmp_path / "missing.pem"), tls_key=str(tmp_path / "missing.key")).ssl_context()

    async def main():
        srv = _server(tmp_path, insecure=True)
        await srv.start()
        try:
            return await asyncio.wait_for(_client(srv.port, tmp_path, insecure=True).run(), 30)
        finally:
            await srv.stop()

    summary = asyncio.run(main())
    assert [r["reply"] for r in summary.rounds] == ["ack"]
    log = (tmp_path / "guide.jsonl").read_text()
    assert '"warning"' in log and "plaintext" in log and '"tls": false' in log


def _serve(cfg_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cfg = tmp_path / "guide.toml"
    cfg.write_text(cfg_text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "edge.cli", "guide", "serve", "--config", str(cfg), "--dims",
                           "2,16,32,4,2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_guide_serve_startup_failures_are_one_line_exit_2(tmp_path):
    """No TLS settings, unreadable TLS files, a port already taken: one line naming the problem, exit 2."""
    cert, key = tls_pair()
    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    clients = '[clients.tokens]\nc0 = "secret-token-0000"\n'
    no_tls = _serve(base + "port = 0\n" + clients, tmp_path)
    assert no_tls.returncode == 2
    assert no_tls.stderr.strip().splitlines() == [
        "edgezo: error: [server] needs tls_cert and tls_key (make a pair with `edgezo guide cert`), "
        "or insecure = true for plaintext"]
    missing = _serve(base + f'port = 0\ntls_cert = "{tmp_path / "no.pem"}"\ntls_key = "{key}"\n' + clients, tmp_path)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "cannot be loaded" in missing.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        taken = _serve(base + f'port = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"\n' + clients, tmp_path)
    lines = [x for x in taken.stderr.strip().splitlines() if not x.startswith("{")]  # JSON log lines aside
    assert taken.returncode == 2
    assert lines == [f"edgezo: error: cannot listen on 127.0.0.1:{port}: address already in use"]


def test_guide_cert_makes_a_pair_and_never_overwrites(tmp_path):
    out = tmp_path / "tls"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "guide", "cert", "--out", str(out), "--host", "guide.lan",
                        "--host", "10.0.0.5"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert (out / "cert.pem").is_file() and (out / "key.pem").stat().st_mode & 0o077 == 0
    text = subprocess.run(["openssl", "x509", "-in", str(out / "cert.pem"), "-noout", "-text"], capture_output=True,
                          text=True).stdout
    assert "DNS:guide.lan" in text and "IP Address:10.0.0.5" in text
    again = subprocess.run([sys.executable, "-m", "edge.cli", "guide", "cert", "--out", str(out)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert again.returncode == 2 and "exists already" in again.stderr
    with pytest.raises(TLSError, match="at least one host"):
        self_signed_pair(tmp_path / "x", hosts=[])
