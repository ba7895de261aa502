"""The guide for operators (issue "operators"): TLS by default on the real wire, and clear one-line startup errors.

The daemon and real edge clients talk TLS on loopback (tests/test_cloud.py runs every round test that way); here:
a client trusting another CA is refused with a message that says what to do, a plaintext client cannot talk to
a TLS guide, a guide without TLS settings refuses to start unless insecure = true is explicit, and `guide serve`
on a taken port is one line with exit code 2.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from edge.client import AuthRefused, ClientConfig, EdgeClient
from edge.round_trainer import FunctionTrainer
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
                       guidance=StaticGuidance(d=SPEC.d, k=2, mix_alpha=0.5, rng=np.random.default_rng(0)))


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
    return subprocess.run([sys.executable, "-m", "app", "guide", "serve", "--config", str(cfg), "--dims",
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


def test_guide_serve_bad_config_state_dir_or_model_path_is_one_line_exit_2(tmp_path):
    """Broken TOML, a missing config file, a state_dir that is a file, a [model] path that does not exist."""
    cert, key = tls_pair()
    base = f'port = 0\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
    clients = '[clients.tokens]\nc0 = "secret-token-0000"\n'
    (tmp_path / "a-file").write_text("x")
    cases = {
        "[server\n": f"{tmp_path / 'guide.toml'} is not valid TOML: Expected ']' at the end of a table declaration "
                     "(at line 1, column 8)",
        f'[server]\nstate_dir = "{tmp_path / "a-file"}"\n' + base + clients:
            f"state dir {tmp_path / 'a-file'} is a file, not a folder",
    }
    for text, message in cases.items():
        r = _serve(text, tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"edgezo: error: {message}"], r.stderr
    missing = subprocess.run([sys.executable, "-m", "app", "guide", "serve", "--config", str(tmp_path / "no.toml")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines() == [
        f"edgezo: error: config {tmp_path / 'no.toml'} not found"]
    cfg = tmp_path / "model.toml"
    cfg.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n' + base + f'[model]\npath = "{tmp_path / "nope"}"\n'
                   + clients)
    model = subprocess.run([sys.executable, "-m", "app", "guide", "serve", "--config", str(cfg)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert model.returncode == 2 and model.stderr.strip().splitlines() == [
        f"edgezo: error: model {tmp_path / 'nope'} not found: give an HF model folder or a .gguf file (nothing is "
        "downloaded)"], model.stderr


def test_guide_serve_on_a_foreign_or_damaged_state_dir_is_one_line_and_leaves_it_as_it_was(tmp_path):
    """A state dir made for another adapter, or a state.db that is not a database: one line naming it, exit 2, and
    not a byte of the state dir changed."""
    import hashlib

    def digest(folder: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}

    async def made_by_another_adapter():  # SPEC has rank 2; `guide serve --dims` makes rank 8
        srv = _server(tmp_path, insecure=True)
        await srv.start()
        await srv.stop()

    asyncio.run(made_by_another_adapter())
    state = tmp_path / "state"
    before = digest(state)
    cert, key = tls_pair()
    cfg = (f'[server]\nstate_dir = "{state}"\nport = 0\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
           '[clients.tokens]\nc0 = "secret-token-0000"\n')
    foreign = _serve(cfg, tmp_path)
    lines = [x for x in foreign.stderr.strip().splitlines() if not x.startswith("{")]  # JSON log lines aside
    assert foreign.returncode == 2 and lines == [
        f"edgezo: error: state dir {state} holds another adapter spec (rank 2 → 8): use the settings it was made "
        "with, or an empty state_dir"]
    assert digest(state) == before

    for f in state.iterdir():
        f.unlink()
    (state / "state.db").write_bytes(b"not a database, but someone's file" * 100)
    before = digest(state)
    damaged = _serve(cfg, tmp_path)
    assert damaged.returncode == 2 and damaged.stderr.strip().splitlines() == [
        f"edgezo: error: {state / 'state.db'} cannot be read as the guide's state (file is not a database): restore "
        "it from a backup, or point [server] state_dir at an empty folder to start over"]
    assert digest(state) == before


def test_guide_cert_makes_a_pair_and_never_overwrites(tmp_path):
    out = tmp_path / "tls"
    r = subprocess.run([sys.executable, "-m", "app", "guide", "cert", "--out", str(out), "--host", "guide.lan",
                        "--host", "10.0.0.5"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert (out / "cert.pem").is_file() and (out / "key.pem").stat().st_mode & 0o077 == 0
    text = subprocess.run(["openssl", "x509", "-in", str(out / "cert.pem"), "-noout", "-text"], capture_output=True,
                          text=True).stdout
    assert "DNS:guide.lan" in text and "IP Address:10.0.0.5" in text
    again = subprocess.run([sys.executable, "-m", "app", "guide", "cert", "--out", str(out)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
    assert again.returncode == 2 and "exists already" in again.stderr
    with pytest.raises(TLSError, match="at least one host"):
        self_signed_pair(tmp_path / "x", hosts=[])


# ---- no way in for a bad client ---------------------------------------------------------------------------
def _hostile_server(tmp_path: Path, **train) -> GuideServer:
    cert, key = tls_pair()
    tokens = {"c0": "secret-token-0000", "c1": "secret-token-0001"}
    cfg = GuideConfig(tokens=tokens).override(
        server={"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl"),
                "long_poll_s": 2.0, "io_timeout_s": 5.0, "tls_cert": str(cert), "tls_key": str(key)},
        rounds={"rounds": 1, "min_clients": 2, "max_clients": 2, "deadline_s": 20.0, "join_window_s": 0.0},
        train={"kind": "guided", "local_steps": 2, "lr": 0.01, "lam": 0.5, "q": 2, "batch": 4, **train})
    src = StaticGuidance(d=SPEC.d, k=2, mix_alpha=0.5, rng=np.random.default_rng(0))
    src.guide = dataclasses.replace(src.guide, grad=np.full(SPEC.d, 1e-3, np.float32))  # λ = 0.5 is live
    return GuideServer(config=cfg, spec=SPEC, theta0=SPEC.flatten(SPEC.init(0)), guidance=src)


async def _session(port: int, name: str, versions=None):
    from conftest import client_tls

    from protocol.auth import answer
    from protocol.framing import read_frame, write_frame
    from protocol.messages import Hello

    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(), server_hostname="127.0.0.1")
    await write_frame(w, Hello(client_id=name, **({"versions": versions} if versions is not None else {})))
    ch = await read_frame(r, timeout=5)
    if versions is not None:
        return r, w, ch  # the guide's answer to an unsupported version
    await write_frame(w, answer(ch, name, f"secret-token-000{name[-1]}"))
    return r, w, await read_frame(r, timeout=5)


def _steps(seed: int, lam: float = 0.5):
    from protocol.zo import Group, StepRecord

    rng = np.random.default_rng(seed)
    return [StepRecord(groups=[Group(seeds=rng.integers(0, 2**63, 2, dtype=np.uint64),
                                     grads=rng.standard_normal(2).astype(np.float32))], lam=lam) for _ in range(2)]


def _upd(rs, name: str, steps, examples: int = 8):
    from protocol.messages import LossStats, Update

    return Update(round_id=rs.round_id, client_id=name, steps=steps, first_step=rs.hyper.first_step,
                  n_examples=examples, loss=LossStats(mean=1.0, min=1.0, max=1.0, last=1.0),
                  guide_id=rs.guidance.guide_id if rs.guidance is not None else "")


def test_forged_duplicate_inflated_weight_and_client_lambda_are_refused(tmp_path):
    """A second, different upload for a round is refused (an identical re-send is acked); a client claiming
    10⁹ examples is weighted by the server's cap; a step with a λ other than the plan's is refused."""
    from protocol.framing import read_frame, write_frame
    from protocol.messages import Ack, Error, RoundRequest, RoundStart

    async def main():
        srv = _hostile_server(tmp_path)
        await srv.start()
        try:
            (r0, w0, _), (r1, w1, _) = await _session(srv.port, "c0"), await _session(srv.port, "c1")
            for w in (w0, w1):
                await write_frame(w, RoundRequest())
            rs0, rs1 = await read_frame(r0, timeout=10), await read_frame(r1, timeout=10)
            assert isinstance(rs0, RoundStart) and isinstance(rs1, RoundStart)
            out = {}
            await write_frame(w0, _upd(rs0, "c0", _steps(1), examples=10**9))  # inflated weight
            out["inflated"] = await read_frame(r0, timeout=10)
            await write_frame(w0, _upd(rs0, "c0", _steps(1), examples=10**9))  # byte-identical re-send
            out["resend"] = await read_frame(r0, timeout=10)
            await write_frame(w0, _upd(rs0, "c0", _steps(2), examples=10**9))  # forged: other records
            out["forged"] = await read_frame(r0, timeout=10)
            await write_frame(w1, _upd(rs1, "c1", _steps(3, lam=0.9)))  # λ of its own choosing
            out["lambda"] = await read_frame(r1, timeout=10)
            await write_frame(w1, _upd(rs1, "c1", _steps(3)))  # then an honest one
            out["honest"] = await read_frame(r1, timeout=10)
            await asyncio.sleep(0.5)
            out["stored"] = {u.client: u.examples for u in srv.store.uploads(rs0.round_id)}
            out["stats"] = dict(srv.stats)
            return out
        finally:
            await srv.stop()

    out = asyncio.run(main())
    assert isinstance(out["inflated"], Ack) and out["inflated"].accepted
    assert isinstance(out["resend"], Ack) and out["resend"].accepted and out["resend"].reason == "duplicate"
    assert isinstance(out["forged"], Error) and out["forged"].code == "duplicate"
    assert "different update" in out["forged"].message
    assert isinstance(out["lambda"], Ack) and not out["lambda"].accepted and "fixed λ = 0.5" in out["lambda"].reason
    assert isinstance(out["honest"], Ack) and out["honest"].accepted
    assert out["stored"] == {"c0": 2 * 4, "c1": 8}  # capped at local_steps × batch, not 10⁹
    assert out["stats"]["examples_capped"] == 1 and out["stats"]["forged_duplicates"] == 1


def test_status_needs_a_token_and_versions_are_negotiated(tmp_path):
    """Tokenless status is refused (and says how to ask); with public_status it carries counts, no client ids;
    a Hello offering only unknown protocol versions gets a version_mismatch error."""
    from conftest import client_tls

    from cloud.cli import fetch_status
    from protocol.errors import ProtocolError

    async def main(public: bool):
        srv = _server(tmp_path / str(public), tls_cert=str(tls_pair()[0]), tls_key=str(tls_pair()[1]),
                      public_status=public)
        await srv.start()
        try:
            got: dict = {}
            try:
                got["anon"] = await fetch_status("127.0.0.1", srv.port, tls=client_tls())
            except ProtocolError as e:
                got["anon"] = e
            got["auth"] = await fetch_status("127.0.0.1", srv.port, tls=client_tls(), client_id="c0",
                                             token=TOKENS["c0"])
            _, _, got["version"] = await _session(srv.port, "c0", versions=[99, 100])
            return got
        finally:
            await srv.stop()

    closed = asyncio.run(main(False))
    assert isinstance(closed["anon"], ProtocolError) and closed["anon"].code == "auth"
    assert "status needs a client token" in str(closed["anon"]) and "public_status" in str(closed["anon"])
    assert isinstance(closed["auth"], dict) and "round" in closed["auth"]
    assert closed["version"].code == "version_mismatch" and "[99, 100]" in closed["version"].message
    public = asyncio.run(main(True))
    assert isinstance(public["anon"], dict) and public["anon"]["clients"] == []


# ---- the operator's own public data ---------------------------------------------------------------------
def _reviews(n: int = 40) -> list[dict]:
    pos = ["a joy to watch", "great acting", "moving and funny", "superb", "clever and warm"]
    neg = ["dull and long", "I hated it", "a boring mess", "tedious", "the worst film"]
    return [{"review": (pos if i % 2 else neg)[i % 5] + f" #{i}", "stars": "good" if i % 2 else "bad"}
            for i in range(n)]


def test_guide_trains_on_the_operators_csv_jsonl_or_datasets_folder(tmp_path, tiny_llama_dir):
    """[data] source = the operator's compressed CSV (or JSONL, or a save_to_disk folder) with its own fields,
    label words and template: the guide's cloud task is built from them and the log says what was read."""
    import csv
    import gzip
    import json

    import datasets

    from cloud.cli import build_server
    from cloud.public_data import load_public

    rows = _reviews()
    csv_gz = tmp_path / "reviews.csv.gz"
    with gzip.open(csv_gz, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["review", "stars"])
        w.writeheader()
        w.writerows(rows + [{"review": "", "stars": "good"}])  # an empty text is dropped, and counted
    data = {"source": str(csv_gz), "text_field": "review", "label_field": "stars",
            "label_words": {"bad": "negative", "good": "positive"}, "template": "Film: {text}\nVerdict:",
            "public_n": 16, "batch": 4}
    cfg = GuideConfig.from_dict({
        "server": {"port": 0, "state_dir": str(tmp_path / "state"), "log_file": str(tmp_path / "guide.jsonl"),
                   "insecure": True},
        "model": {"path": str(tiny_llama_dir), "rank": 2, "lora_alpha": 4.0}, "data": data,
        "train": {"kind": "subspace", "k": 4}, "cloud": {"warm_steps": 1, "batch": 4}})
    srv = build_server(cfg)
    try:
        task = srv.guidance.scorer.task
        assert task.template == "Film: {text}\nVerdict:" and task.label_words == (" negative", " positive")
        logged = [json.loads(x) for x in (tmp_path / "guide.jsonl").read_text().splitlines()]
        pub = next(e for e in logged if e["event"] == "public_data")
        assert pub["rows"] == 41 and pub["dropped"] == 1 and pub["used"] == 16 and pub["classes"] == {
            "bad": 20, "good": 20}
    finally:
        srv.guidance.close()
        srv.store.close()
    # the same rows as JSONL and as a datasets folder give the same slice
    jl = tmp_path / "reviews.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "reviews-ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    from cloud.config import DataConfig

    base = {k: v for k, v in data.items() if k not in ("source", "public_n", "batch")}
    a, _ = load_public(DataConfig(source=str(jl), **base))
    b, _ = load_public(DataConfig(source=str(folder), **base))
    assert a == b and len(a) == 40 and a.labels[:2] == [0, 1]


def test_public_data_that_does_not_match_the_task_is_refused(tmp_path):
    import json

    from cloud.config import DataConfig
    from cloud.public_data import PublicDataError, load_public

    jl = tmp_path / "r.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in _reviews(10)))
    words = {"bad": "negative", "good": "positive"}
    with pytest.raises(PublicDataError, match=r"labels \{'good': 5\} are not in \[data\] label_words"):
        load_public(DataConfig(source=str(jl), text_field="review", label_field="stars",
                               label_words={"bad": "negative", "meh": "positive"}))
    with pytest.raises(PublicDataError, match=r"no column \['text'\] \(columns: \['review', 'stars'\]\)"):
        load_public(DataConfig(source=str(jl), label_field="stars", label_words=words))
    with pytest.raises(PublicDataError, match="not found"):
        load_public(DataConfig(source=str(tmp_path / "nope.csv")))
    bad = tmp_path / "broken.csv.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(PublicDataError, match="broken.csv.gz: cannot be read"):
        load_public(DataConfig(source=str(bad), label_words=words))
    with pytest.raises(ValueError, match="template must contain"):
        DataConfig(template="no slot")
    with pytest.raises(ValueError, match="two or more"):
        DataConfig(label_words={"a": "yes"})


def test_wire_section_sets_the_guidance_codec_and_replay_stays_exact(tmp_path):
    """[wire] guidance (adaptive by default, mode A target / mode B budget, or a fixed codec) changes the bytes a round sends; the client's
    θ after the round equals the guide's θ_1 (one client, edge_weight 1), i.e. both used the decoded bits."""
    import json

    from cloud.config import WireConfig

    def run(sub: str, **wire):
        cfg = GuideConfig.from_dict({
            "server": {"port": 0, "state_dir": str(tmp_path / sub / "state"), "insecure": True,
                       "log_file": str(tmp_path / sub / "guide.jsonl"), "long_poll_s": 1.0},
            "rounds": {"rounds": 1, "min_clients": 1, "max_clients": 1, "deadline_s": 10.0, "join_window_s": 0.0},
            "train": {"kind": "guided", "local_steps": 2, "lr": 0.01, "lam": 0.0, "q": 1, "k": 8},
            "wire": wire, "clients": {"tokens": TOKENS}})
        srv = GuideServer(config=cfg, spec=SPEC, theta0=SPEC.flatten(SPEC.init(0)),
                          guidance=StaticGuidance(d=SPEC.d, k=8, mix_alpha=0.5, rng=np.random.default_rng(0)))

        async def main():
            await srv.start()
            try:
                cl = _client(srv.port, tmp_path / sub, insecure=True)
                await asyncio.wait_for(cl.run(), 30)
                return cl.theta
            finally:
                await srv.stop()

        theta_client = asyncio.run(main())
        frames = [json.loads(x) for x in (tmp_path / sub / "guide.jsonl").read_text().splitlines()
                  if '"round_frame"' in x]
        theta1 = srv.store.load_theta(1)
        return frames[0]["guidance_bytes"], theta_client, theta1

    a, tc_a, t1_a = run("default")  # adaptive, the basis at BASIS_TARGET
    q8, tc_q8, t1_q8 = run("q8", guidance="q8")
    fine, _, _ = run("fine", guidance="adaptive", target=0.02)
    f32, _, _ = run("f32", guidance="fp32")
    assert a < q8 < f32 and a < fine
    assert WireConfig().guidance == "adaptive"
    np.testing.assert_array_equal(tc_q8, t1_q8)
    np.testing.assert_array_equal(tc_a, t1_a)
    with pytest.raises(ValueError, match=r"\[wire\] theta must be one of \['fp32', 'adaptive'\], got 'q8'"):
        WireConfig(theta="q8")
    with pytest.raises(ValueError, match="apply to guidance = 'adaptive'"):
        WireConfig(guidance="q8", target=0.1)
    with pytest.raises(ValueError, match="unknown keys"):
        GuideConfig.from_dict({"wire": {"guidence": "q8"}})


def test_the_shipped_service_unit_verifies(tmp_path):
    """docs/edgezo-guide.service passes `systemd-analyze verify` (ExecStart pointed at this install's edgezo)."""
    import shutil

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "docs" / "edgezo-guide.service").read_text()
    assert "ExecStart=/opt/edgezo/venv/bin/edgezo guide serve --config /etc/edgezo/guide.toml" in unit
    assert "Restart=on-failure" in unit and "User=edgezo" in unit and "StateDirectory=edgezo-guide" in unit
    local = tmp_path / "edgezo-guide.service"
    local.write_text(unit.replace("/opt/edgezo/venv/bin/edgezo", str(Path(sys.executable).with_name("edgezo"))))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [x for x in (r.stdout + r.stderr).splitlines() if "edgezo-guide.service" in x]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_the_round_phase_refuses_out_of_order_transitions(tmp_path):
    from cloud.daemon import TRANSITIONS, Phase, RoundStateError

    srv = _server(tmp_path, insecure=True)
    assert srv.phase is Phase.IDLE and not srv.closing and not srv.finished
    with pytest.raises(RoundStateError, match="idle → closing is not a transition"):
        srv._to(Phase.CLOSING)
    for p in (Phase.OPEN, Phase.CLOSING, Phase.IDLE, Phase.FINISHED):
        srv._to(p)
    assert srv.finished and TRANSITIONS[Phase.FINISHED] == set()
    with pytest.raises(RoundStateError, match="finished → open"):
        srv._to(Phase.OPEN)
    srv.store.close()


def test_the_daemon_collects_garbage_between_rounds_and_nothing_cyclic_leaks(tmp_path):
    """serve() lets the server own the GC: a full pass at start and at each round close, freezing what survives.
    With CPython's own passes off, a cycle made during the round is freed at its close, so freezing leaks nothing."""
    import gc
    import json
    import weakref

    class Node:
        pass

    async def main():
        srv = _server(tmp_path, insecure=True)
        srv.manage_gc = True
        await srv.start()
        try:
            a, b = Node(), Node()
            a.other, b.other = b, a  # a cycle: only the GC frees it
            ref = weakref.ref(a)
            del a, b
            run = await asyncio.wait_for(_client(srv.port, tmp_path / "c", insecure=True).run(), 30)
            for _ in range(300):  # the round closes after the ack the client saw
                if srv.finished:
                    break
                await asyncio.sleep(0.1)
            return run, ref, gc.get_freeze_count()
        finally:
            await srv.stop()

    was = gc.isenabled()
    gc.disable()  # only the server's own passes may free the cycle
    try:
        run, ref, frozen = asyncio.run(main())
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
    assert [r["reply"] for r in run.rounds] == ["ack"]
    assert ref() is None and frozen > 0
    events = [json.loads(x) for x in (tmp_path / "guide.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("gc") == 2 and kinds.index("gc") < kinds.index("round_open") < kinds.index("round_closed")
    assert "gc" in kinds[kinds.index("round_closed"):]  # the second pass: at the round's close
