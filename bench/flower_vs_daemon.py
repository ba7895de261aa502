"""The same edgezo rounds over two transports on loopback: Flower's deployment runtime (flower-superlink + N
flower-supernode processes, ``flwr run`` of app/flower) and the edgezo daemon (``edgezo guide serve`` + N
``edgezo train --guide`` processes). Reports, per transport and fleet size, the devices that uploaded in each round
and the round latency read from the guide's own log (round_open → round_closed: RoundStart out, local steps,
uploads in, merge), plus the cycle from one round's open to the next and the bytes each way.

    python bench/flower_vs_daemon.py --clients 2,4 --rounds 3 --json docs/bench/flower_vs_daemon.json

Both transports run the same guide.toml (model-free static subspace guidance on the model's sizes, k 8, 2 local
steps of q 1 at batch 4), the same edge trainer (llama.cpp, 1 thread per device) on the packaged SmolLM2-135M
Q4_1 (``--model`` for another GGUF) and each device's own synthetic rows. Both run plaintext on 127.0.0.1
(Flower's ``--insecure``, the daemon's ``insecure = true``): this measures the transports, TLS is docs/flower.md.
Every device is a process on this machine, so N is kept small (≤ 4 on 2 cores): the figures are per-round
overheads on loopback, not a fleet's throughput.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.flower_local import LocalDeployment, free_port, guide_toml  # noqa: E402

WORDS_POS = ["warm", "funny", "clever", "moving", "charming", "superb", "bright", "tender"]
WORDS_NEG = ["dull", "boring", "silly", "cold", "tedious", "sour", "clumsy", "bleak"]


def write_rows(path: Path, seed: int, n: int = 24) -> Path:
    """``n`` labelled synthetic reviews, different per device (``seed``)."""
    import random

    rng = random.Random(seed)
    lines = ["text,label"]
    for i in range(n):
        pos = i % 2 == 0
        w = rng.sample(WORDS_POS if pos else WORDS_NEG, 3)
        lines.append(f'"a {w[0]}, {w[1]} and {w[2]} film",{"positive" if pos else "negative"}')
    path.write_text("\n".join(lines) + "\n")
    return path


def model_dims(model: str) -> str:
    from edge.runtime import Runtime, RuntimeConfig

    rt = Runtime(model, RuntimeConfig(n_ctx=64, n_seq_max=1, n_threads=1))
    try:
        d = rt.dims()
    finally:
        rt.close()
    return f"{d.n_layers},{d.hidden},{d.intermediate},{d.n_heads},{d.n_kv_heads}"


def read_log(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.exists() else []


def wait_finished(log: Path, timeout: float, what: str, alive) -> None:
    end = time.monotonic() + timeout
    while not any(e["event"] in ("finished", "round_loop_failed") for e in read_log(log)):
        if time.monotonic() > end or not alive():
            raise RuntimeError(f"{what} did not finish; log tail:\n" + "\n".join(log.read_text().splitlines()[-20:])
                               if log.exists() else f"{what} did not finish (no log)")
        time.sleep(0.2)


def summarize(events: list[dict], transport: str, clients: int, started: float) -> dict:
    """Per-round devices, latency (open → closed) and cycle (open → next open), from the guide's log; startup:
    from ``started`` (unix time the first process was launched) to the first round's open."""
    opened = {e["round"]: e for e in events if e["event"] == "round_open"}
    closed = {e["round"]: e for e in events if e["event"] == "round_closed"}
    rounds = []
    for r in sorted(closed):
        c, o = closed[r], opened[r]
        row = {"round": r, "devices": c["uploads"], "selected": c["selected"],
               "latency_s": round(c["ts"] - o["ts"], 3),
               "cycle_s": round(opened[r + 1]["ts"] - o["ts"], 3) if r + 1 in opened else None}
        for k in ("down_bytes", "up_bytes", "merge_s"):
            if k in c:
                row[k] = c[k]
        if "client_s" in c:
            row["client_s"] = c["client_s"]
        rounds.append(row)
    lat = sorted(x["latency_s"] for x in rounds)
    startup = min(o["ts"] for o in opened.values()) - started if opened else None
    return {"transport": transport, "clients": clients, "startup_s": round(startup, 2) if startup else None,
            "rounds": rounds,
            "devices_per_round": [x["devices"] for x in rounds],
            "latency_median_s": lat[len(lat) // 2] if lat else None,
            "latency_mean_s": round(sum(lat) / len(lat), 3) if lat else None}


def run_flower(work: Path, model: str, dims: str, clients: int, rounds: int, timeout: float) -> dict:
    state, log = work / "state", work / "guide.jsonl"
    toml = guide_toml(work / "guide.toml", state=state, log=log, rounds=rounds, clients=clients)
    nodes = [{"model": model, "data": str(write_rows(work / f"rows-{i}.csv", i)), "threads": 1}
             for i in range(clients)]
    t0 = time.time()
    with LocalDeployment(work / "flower", tls=None) as dep:  # --insecure: loopback only, see the docstring
        dep.start(nodes)
        dep.run({"guide-config": str(toml), "dims": dims, "join-timeout-s": 120.0})
        wait_finished(log, timeout, "the Flower run", lambda: all(p.poll() is None for p in dep.procs))
    return summarize(read_log(log), "flower", clients, t0)


def run_daemon(work: Path, model: str, dims: str, clients: int, rounds: int, timeout: float) -> dict:
    state, log = work / "state", work / "guide.jsonl"
    port = free_port()
    toml = guide_toml(work / "guide.toml", state=state, log=log, rounds=rounds, clients=clients, port=port,
                      insecure=True)
    tokens = {f"c{i}": f"bench-token-{i:04d}" for i in range(clients)}
    py = [sys.executable, "-m", "app"]
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()

    def spawn(name: str, argv: list[str]) -> None:
        with open(work / f"{name}.log", "ab") as f:
            f.write(("$ " + shlex.join(argv) + "\n").encode())
            f.flush()
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work,
                                          start_new_session=True))

    try:
        spawn("guide", py + ["guide", "serve", "--config", str(toml), "--dims", dims]
              + [a for c, t in tokens.items() for a in ("--token", f"{c}={t}")])
        for i, (c, t) in enumerate(tokens.items()):
            spawn(c, py + ["train", "--model", model, "--data", str(write_rows(work / f"rows-{i}.csv", i)),
                           "--guide", f"127.0.0.1:{port}", "--token", t, "--client-id", c, "--insecure",
                           "--state-dir", str(work / c), "--max-rounds", str(rounds), "--threads", "1",
                           "--rank", "2", "--alpha", "4", "--batch-size", "4", "--eval-fraction", "0.0"])
        wait_finished(log, timeout, "the daemon run", lambda: procs[0].poll() is None)
    finally:
        for p in procs:  # only the processes this function started, by pid
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
    return summarize(read_log(log), "daemon", clients, t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="2,4", help="fleet sizes (devices are processes here: keep them small)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="GGUF every device trains (default: the packaged SmolLM2 Q4_1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.model is None:
        from edge.models import smollm2_path

        a.model = str(smollm2_path())
    dims = model_dims(a.model)
    load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgezo-flower-bench-") as tmp:
        for n in (int(x) for x in a.clients.split(",") if x.strip()):
            for name, fn in (("daemon", run_daemon), ("flower", run_flower)):
                work = Path(tmp) / f"{name}-{n}"
                work.mkdir()
                res = fn(work, a.model, dims, n, a.rounds, a.timeout)
                results.append(res)
                print(f"{name:6s} N={n}: devices/round {res['devices_per_round']}, latency median "
                      f"{res['latency_median_s']} s (rounds {[r['latency_s'] for r in res['rounds']]}), "
                      f"startup {res['startup_s']} s", flush=True)
    out = {"bench": "flower_vs_daemon", "model": Path(a.model).name, "dims": dims, "rounds": a.rounds,
           "train": {"kind": "subspace", "k": 8, "local_steps": 2, "q": 1, "batch": 4, "rank": 2, "threads": 1},
           "machine": {"cpus": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load],
                       "python": platform.python_version()},
           "results": results}
    out["flwr"] = importlib.metadata.version("flwr")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
