"""Load test of the guide daemon: N simulated clients (protocol only, no model) on 127.0.0.1.

The daemon runs as a real subprocess (``python -m app guide serve`` in model-free mode), so its peak RSS
is measured from outside (psutil, sampled every 20 ms). Every simulated client authenticates, joins each
round, uploads valid (seed, g) records for it and waits for the ack; the ack latency is measured from the
first byte of the upload written to the Ack read. Each round's uploads start once every client holds the round
(:class:`RoundBarrier`), all at once or spread over ``--spread`` s. Bounded: R rounds, then every client says bye;
a global timeout stops everything regardless.

Like edge/client.py, a client names the θ and guidance it holds when it asks for a round (``--cold``: nothing), so
after round 0 a subspace round's θ comes as k numbers. The static guidance repeats its basis, so it goes by id after
round 0; a real guide's basis changes each round and its k·d bytes go out by prefetch while the edges train. The
clients share one process (and here the cores) with the daemon: ``client_loop_lag_ms`` is how late their own event
loop ran, part of every measured ack latency; the daemon's share is in ``rounds_closed`` (``guide_ack_ms``: decoded
Update to Ack written, ``guide_commit_ms``, ``guide_loop_lag_ms``).

    edgezo bench guide-load --clients 500 --rounds 3 --json out.json
    python bench/guide_load.py --clients 500 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from app.benches._args import int_range, nonneg_float, positive_float
from protocol.auth import client_handshake, client_ssl_context
from protocol.codecs import EncodedArray
from protocol.framing import deadline, read_frame, write_frame
from protocol.messages import Ack, Bye, LossStats, RoundRequest, RoundStart, Update, encode
from protocol.zo import Group, StepRecord

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the app package: the daemon's PYTHONPATH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALL_ACKED = -1  # the RoundBarrier key the clients meet at after their last round, before they say Bye


class RoundBarrier:
    """Holds every simulated client's upload of round r until all clients still running hold r's RoundStart: the
    round's downlink is over before its uploads start, as on real devices, which train between the two. Without
    it the first clients' uploads and acks would queue behind the other clients' downloads, all in one process on
    the same cores (work a real fleet does on 1,000 separate CPUs)."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self._arrived: dict[int, int] = {}
        self._open: dict[int, asyncio.Event] = {}

    def _event(self, r: int) -> asyncio.Event:
        return self._open.setdefault(r, asyncio.Event())

    def _check(self) -> None:
        for r, n in self._arrived.items():
            if n >= self.parties:
                self._event(r).set()

    async def wait(self, r: int, timeout: float) -> None:
        """Arrive at round ``r`` and wait (up to ``timeout`` s) for the others."""
        self._arrived[r] = self._arrived.get(r, 0) + 1
        self._check()
        await asyncio.wait_for(self._event(r).wait(), timeout)

    def leave(self) -> None:
        """A client ended (done, refused or failed): the others stop waiting for it."""
        self.parties -= 1
        self._check()


async def _client(i: int, port: int, token: str, rounds: int, steps: int, q: int, lat: list[float],
                  rng: np.random.Generator, counters: dict, tls, barrier: RoundBarrier, cold: bool = False,
                  io_s: float = 120.0, spread_s: float = 0.0) -> None:
    """One simulated edge. Like edge/client.py it asks for each round naming the θ it holds (the digest of its last
    round's θ) and the guidance ids it decoded, so the guide may send θ as the moves since then and the guidance by
    id; ``cold``: it holds nothing, every RoundStart carries θ dense and the guidance in full.

    Each round: download (RoundStart, decoded as an edge does), "train" (build and encode the Update), wait at the
    round's barrier, then upload: at once (``spread_s`` 0: every client together, one burst of N uploads) or after
    a uniform random 0..spread_s s, as real devices finish at different times. The ack latency runs from the
    upload's first byte written to its Ack read. After its last round a client waits for the others
    (``ALL_ACKED``) before it says Bye and disconnects."""
    name = f"sim{i:05d}"
    held_round, held_digest, guide_ids = -1, "", []
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                             server_hostname="127.0.0.1" if tls else None)
    except BaseException:
        barrier.leave()
        raise
    try:
        await client_handshake(r, w, name, token, timeout=60)
        done = 0
        while done < rounds:
            await write_frame(w, RoundRequest() if cold else RoundRequest(
                last_round=held_round, theta_digest=held_digest, guide_ids=guide_ids[-4:]))
            m = await read_frame(r, timeout=io_s, idle_timeout=io_s)
            if isinstance(m, Bye):
                break
            if not isinstance(m, RoundStart):
                continue
            if isinstance(m.theta, EncodedArray):  # what a real edge does with dense θ (and the guide): decode it
                m.theta.decode()
            if m.guidance is not None:
                m.guidance.to_guide()
            held_round, held_digest = m.round_id, m.theta_digest  # (a real edge rebuilds θ from the moves first)
            if m.guidance_id and m.guidance_id not in guide_ids:
                guide_ids.append(m.guidance_id)
            recs = [StepRecord(groups=[Group(seeds=rng.integers(0, 2**63, q, dtype=np.uint64),
                                             grads=(0.01 * rng.standard_normal(q)).astype(np.float32))])
                    for _ in range(steps)]
            frame = encode(Update(round_id=m.round_id, client_id=name, steps=recs, first_step=m.hyper.first_step,
                                  n_examples=16, loss=LossStats(mean=0.5, min=0.5, max=0.5, last=0.5),
                                  guide_id=m.guidance_id))
            await barrier.wait(m.round_id, io_s)
            if spread_s > 0:
                await asyncio.sleep(float(rng.uniform(0.0, spread_s)))
            t0 = time.perf_counter()
            counters["first"] = min(counters.get("first", t0), t0)
            w.write(frame)
            async with deadline(io_s):
                await w.drain()
            counters["up_bytes"] = counters.get("up_bytes", 0) + len(frame)
            a = await read_frame(r, timeout=io_s, idle_timeout=io_s)
            t1 = time.perf_counter()
            if isinstance(a, Ack) and a.accepted:
                lat.append(t1 - t0)
                counters.setdefault("by_round", {}).setdefault(m.round_id, []).append(t1 - t0)
                counters["last"] = max(counters.get("last", t1), t1)
            else:
                counters["refused"] = counters.get("refused", 0) + 1
            done += 1
        # every client says Bye once all have their last ack: one client's teardown (TLS close in this shared
        # process) must not sit between another's ack and its read, which a real device's never does
        await barrier.wait(ALL_ACKED, io_s)
        await write_frame(w, Bye())
    finally:
        barrier.leave()
        w.close()


class DaemonDied(RuntimeError):
    """The guide daemon exited before it listened; the message carries the tail of its stderr."""


async def _run(args, port: int, tokens: dict[str, str], proc: subprocess.Popen, err: Path) -> dict:
    import psutil

    ps = psutil.Process(proc.pid)
    peak = [0]
    stop = asyncio.Event()

    async def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                return
            await asyncio.sleep(0.02)

    sampler = asyncio.ensure_future(sample())
    t_start = time.monotonic()
    while True:  # wait for the daemon to listen
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            if proc.poll() is not None:
                stop.set()
                tail = err.read_text(errors="replace").strip().splitlines()[-1:] if err.is_file() else []
                raise DaemonDied(f"the guide daemon exited with code {proc.returncode} before listening: "
                                 f"{tail[0] if tail else '(no stderr)'}") from None
            if time.monotonic() - t_start > 60:
                raise
            await asyncio.sleep(0.1)
    rss_idle = ps.memory_info().rss
    lat: list[float] = []
    counters: dict = {}
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    tls = None if args.insecure else client_ssl_context(args.cert)
    barrier = RoundBarrier(args.clients)
    tasks = [asyncio.ensure_future(_client(i, port, tokens[f"sim{i:05d}"], args.rounds, args.steps, args.q, lat,
                                           np.random.default_rng(rng.integers(2**32)), counters, tls, barrier,
                                           args.cold, max(120.0, args.timeout), args.spread))
             for i in range(args.clients)]
    lags: list[float] = []

    async def loop_lag():  # the simulated clients' own event loop: time it spent busy when an ack was due
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.02)
            lags.append(max(0.0, time.perf_counter() - t - 0.02))

    lagger = asyncio.ensure_future(loop_lag())
    res = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), args.timeout)
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    await lagger
    lag_ms = np.array(lags or [0.0]) * 1e3
    errors = [repr(e) for e in res if isinstance(e, BaseException)]
    lat_ms = np.array(lat) * 1e3
    span = counters.get("last", 0) - counters.get("first", 0)
    return {
        "clients": args.clients, "rounds": args.rounds, "steps_per_upload": args.steps, "q": args.q,
        "tls": not args.insecure, "spread_s": args.spread,
        "uploads_acked": len(lat), "refused": counters.get("refused", 0), "client_errors": len(errors),
        "error_samples": errors[:3], "wall_s": round(wall, 2),
        "uploads_per_s": round(len(lat) / wall, 1),
        "uploads_per_s_upload_phase": round(len(lat) / span, 1) if span > 0 else None,
        "ack_latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 2),
                           "p99": round(float(np.percentile(lat_ms, 99)), 2),
                           "max": round(float(lat_ms.max()), 2)} if lat else None,
        "ack_latency_ms_by_round": {str(r): {"p50": round(float(np.percentile(x, 50)) * 1e3, 2),
                                             "p99": round(float(np.percentile(x, 99)) * 1e3, 2)}
                                    for r, x in sorted(counters.get("by_round", {}).items())},
        "daemon_rss_mb": {"idle": round(rss_idle / 2**20, 1), "peak": round(peak[0] / 2**20, 1)},
        "up_bytes_per_update": counters.get("up_bytes", 0) // max(1, len(lat)),
        "client_loop_lag_ms": {"p50": round(float(np.percentile(lag_ms, 50)), 2),
                               "p99": round(float(np.percentile(lag_ms, 99)), 2), "max": round(float(lag_ms.max()), 2)},
    }


def _dims(s: str) -> str:
    """An argparse ``type``: five positive integers n_layers,hidden,intermediate,heads,kv_heads."""
    parts = s.split(",")
    if len(parts) != 5 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"want five positive integers n_layers,hidden,intermediate,heads,kv_heads, "
                                         f"got {s!r}")
    return s


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The bench's flags (``edgezo bench guide-load`` and ``bench/guide_load.py`` alike)."""
    ap.add_argument("--clients", type=int_range(1, 5000), default=500)
    ap.add_argument("--rounds", type=int_range(1, 100), default=3)
    ap.add_argument("--steps", type=int_range(1), default=10, help="local steps (StepRecords) per upload")
    ap.add_argument("--q", type=int_range(1), default=2, help="perturbations per step")
    ap.add_argument("--dims", type=_dims, default="30,576,1536,9,3",
                    help="adapter dims (default: SmolLM2-135M, d=460,800)")
    ap.add_argument("--timeout", type=positive_float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--insecure", action="store_true", help="plaintext TCP instead of TLS (the default)")
    ap.add_argument("--cold", action="store_true",
                    help="clients hold nothing between rounds: θ dense and the guidance in full in every RoundStart")
    ap.add_argument("--spread", type=nonneg_float, default=0.0, metavar="S",
                    help="each client waits uniform 0..S s after the round's downlink before uploading, as devices' "
                         "training times spread their uploads (default 0: all N uploads at once, one burst)")
    ap.add_argument("--note", default="", help="a note stored with the results (e.g. what else the machine ran)")


def run(args: argparse.Namespace) -> int:
    """Start the daemon, run the clients, print the results as JSON (and write them with --json).

    0 when every upload of every round was acked and no client failed; 1 otherwise; 2 without psutil."""
    from cloud.extras import MissingExtra

    try:
        import psutil  # noqa: F401  (the daemon's RSS is read from outside)
    except ModuleNotFoundError:
        raise MissingExtra("bench guide-load needs psutil (psutil is missing): pip install psutil") from None
    load_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    tmp = Path(tempfile.mkdtemp(prefix="guide_load_"))
    port = _free_port()
    tokens = {f"sim{i:05d}": f"tok-{i:05d}-{os.urandom(6).hex()}" for i in range(args.clients)}
    cfg = tmp / "guide.toml"
    io_s = max(120.0, args.timeout)  # the guide's round deadline and frame timeouts: a big round on busy cores is slow
    if args.insecure:
        server_tls = "insecure = true\n"
    else:
        from cloud.tls import self_signed_pair

        cert, key = self_signed_pair(tmp / "tls", hosts=["127.0.0.1", "localhost"], days=1)
        args.cert = str(cert)
        server_tls = f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
    cfg.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{tmp / "state"}"\nlog_file = "{tmp / "guide.jsonl"}"\n'
        f'long_poll_s = 60.0\nio_timeout_s = {io_s}\n' + server_tls + f'[rounds]\nrounds = {args.rounds}\nmin_clients = {args.clients}\n'
        f'max_clients = {args.clients}\ndeadline_s = {io_s}\njoin_window_s = 0.0\n'
        f'[train]\nlocal_steps = {args.steps}\nq = {args.q}\nk = 4\n[clients.tokens]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in tokens.items()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    err = tmp / "daemon.err"
    proc = subprocess.Popen([sys.executable, "-m", "app", "guide", "serve", "--config", str(cfg),
                             "--dims", args.dims], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(err, "wb"))  # noqa: SIM115
    ok = False
    try:
        out = asyncio.run(_run(args, port, tokens, proc, err))
        t = time.monotonic()  # let the last round close, then read the daemon's own account
        while time.monotonic() - t < 120:
            lines = (tmp / "guide.jsonl").read_text().splitlines()
            closed = [json.loads(x) for x in lines if '"round_closed"' in x]
            if len(closed) >= args.rounds:
                break
            time.sleep(0.2)
        out["rounds_closed"] = [{"round": c["round"], "uploads": c["uploads"], "merge_s": c.get("merge_s"),
                                 "down_bytes": c.get("down_bytes"),
                                 "down_bytes_per_client": c.get("down_bytes_per_client"),
                                 "up_bytes": c.get("up_bytes"), "up_bytes_per_upload": c.get("up_bytes_per_upload"),
                                 "guide_commit_ms": c.get("commit_ms"), "guide_ack_ms": c.get("ack_ms"),
                                 "guide_loop_lag_ms": c.get("loop_lag_ms")}
                                for c in closed]
        opened = {json.loads(x)["round"]: json.loads(x)["ts"] for x in lines if '"round_open"' in x}
        out["aggregate_s"] = [round(c["ts"] - opened.get(c["round"], c["ts"]), 2) for c in closed]
        out["d"] = json.loads(lines[0]).get("d")
        ok = True
    except DaemonDied as e:
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 1
    finally:
        proc.terminate()
        try:
            out_rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out_rc = -9
        if not ok:
            print(f"guide-load: the daemon's config and logs are kept in {tmp}", file=sys.stderr)
    out["daemon_exit"] = out_rc
    out["cpu"] = {"count": os.cpu_count(), "loadavg_start": load_start}
    out["client_mode"] = "cold" if args.cold else "edge"
    if args.note:
        out["note"] = args.note
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    passed = out["uploads_acked"] == args.clients * args.rounds and not out["client_errors"]
    if passed:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"guide-load: not every upload was acked; the daemon's config and logs are kept in {tmp}",
              file=sys.stderr)
    return 0 if passed else 1


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``python -m app.benches.guide_load`` and ``bench/guide_load.py``."""
    from cloud.extras import MissingExtra

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except MissingExtra as e:
        print(f"{ap.prog}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(prog="python -m app.benches.guide_load"))
