"""``edgezo demo``: round v2 on one machine — a guide and two edge clients on loopback, SmolLM2-135M.

* Cloud: the GGUF dequantized to fp32 in torch; it leads (AdamW on public movie snippets, then each round a
  k-dimensional subspace U at θ_t from its trajectory and public gradients), through the real guide daemon.
* Edges: two :class:`edge.client.EdgeClient` s training through llama.cpp on Q4_0 (converted once from the
  packaged Q4_1 and cached) on private, label-skewed tweets: SPSA + Adam on c with θ = θ_t + U·c.
* It prints zero-shot, cloud-only and edgezo accuracy on the same private test tweets — raw and calibrated
  (threshold fixed on private validation) — and plots them, so a new user sees what the edges added.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.models import fast_model, smollm2_path  # no llama_cpp import: model files only


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes. The guidance kind, lr and ε are the product's defaults (cloud.config.TrainConfig)."""

    rounds: int = 3
    local_steps: int = 15
    batch: int = 8
    k: int = 8  # smaller than the product's 16: each column is one cloud gradient, ~6 s here (demo ≤ 6 min)
    warm_steps: int = 12  # the cloud's AdamW steps on public movie snippets before round 0
    public_n: int = 256
    private_n: int = 200  # tweets per edge (label-skewed: edge-1 mostly positive, edge-2 mixed)
    val_n: int = 64  # private validation: calibration
    test_n: int = 160
    rank: int = 8
    seed: int = 0
    threads: int = 1  # per llama.cpp edge / torch

    def __post_init__(self) -> None:
        if min(self.rounds, self.local_steps, self.batch, self.public_n, self.private_n, self.val_n,
               self.test_n) < 1 or self.warm_steps < 0:
            raise ValueError("all demo sizes must be >= 1 (warm_steps >= 0)")
        if not 4 <= self.k <= 128:
            raise ValueError(f"k must be in 4..128, got {self.k}")

    @classmethod
    def quick(cls, **kw) -> DemoConfig:
        base = dict(rounds=1, local_steps=2, warm_steps=2, public_n=32, private_n=32, val_n=16, test_n=32, k=4)
        return cls(**{**base, **kw})


def edge_model(cache: Path | None = None) -> Path:
    """The edge's GGUF: the packaged Q4_1 converted once to Q4_0 (edge.models.fast_model), cached."""
    return fast_model(cache=cache)


def demo_tls(out: Path, log=print) -> tuple[Path, Path] | None:
    """The demo's self-signed TLS pair in OUT/tls (made once, as `edgezo guide cert` does); None, and a
    plaintext loopback run, only when the openssl command is missing."""
    from cloud.tls import TLSError, self_signed_pair

    cert, key = out / "tls" / "cert.pem", out / "tls" / "key.pem"
    if cert.exists() and key.exists():
        return cert, key
    try:
        return self_signed_pair(out / "tls", hosts=["localhost", "127.0.0.1"], days=30)
    except TLSError as e:
        log(f"[demo] no TLS ({e}): guide and edges talk plaintext on loopback")
        return None


def run_demo(cfg: DemoConfig, *, out: str | Path, log=print, cache: Path | None = None) -> dict:
    """Guide (the cloud leads, subspace guidance) + two llama.cpp edges on loopback, tweets as private data."""
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from app.local import llama_margins, llama_trainer
    from cloud.cli import lead_config
    from cloud.config import GuideConfig
    from cloud.daemon import GuideServer
    from cloud.data import dirichlet_shards, load_rotten_tomatoes, load_tweets, split
    from cloud.guidance import GuidanceConfig
    from cloud.lead import CloudLead
    from cloud.model import accuracy, build_cloud, calibrate_threshold
    from cloud.store import Store
    from edge.client import ClientConfig, EdgeClient
    from edge.round_trainer import EdgeTrainerAdapter

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gguf = edge_model(cache)
    tweets = load_tweets()
    held = split(tweets, {"val": cfg.val_n, "test": cfg.test_n}, rng)
    used = set(held["val"].texts) | set(held["test"].texts)
    rest = [(t, y) for t, y in zip(tweets.texts, tweets.labels, strict=True) if t not in used]
    from cloud.data import Slice

    shards = dirichlet_shards(Slice([t for t, _ in rest], [y for _, y in rest]), 2, cfg.private_n, 0.5, rng)
    public = split(load_rotten_tomatoes(), {"public": cfg.public_n}, rng)["public"]
    log(f"[demo] private: tweets, {cfg.private_n} per edge (label-skewed), val {cfg.val_n}, test {cfg.test_n}; "
        f"public (cloud): {cfg.public_n} movie snippets; edge model {gguf.name}")
    tls = demo_tls(out, log)
    gcfg = GuideConfig(tokens={"edge-1": "demo-token-edge-1", "edge-2": "demo-token-edge-2"}).override(
        server={"port": 0, "state_dir": str(out / "guide-state"), "log_file": str(out / "guide.jsonl"),
                **({"tls_cert": str(tls[0]), "tls_key": str(tls[1])} if tls else {"insecure": True})},
        rounds={"rounds": cfg.rounds, "min_clients": 2, "max_clients": 2, "deadline_s": 3600.0,
                "join_window_s": 0.0, "sample_seed": cfg.seed},
        train={"kind": "subspace", "k": cfg.k, "local_steps": cfg.local_steps, "q": 1, "batch": cfg.batch},
        cloud={"warm_steps": cfg.warm_steps, "batch": cfg.batch})
    if (out / "guide-state").exists():
        shutil.rmtree(out / "guide-state")
    t0 = time.perf_counter()
    spec, theta_init, builder, scorer = build_cloud(
        model_path=str(smollm2_path()), device="", rank=cfg.rank, alpha=2.0 * cfg.rank,
        targets=("q_proj", "v_proj"), layers=(), train="AB", init_seed=cfg.seed, public=public, batch=cfg.batch,
        guidance_config=GuidanceConfig(), rng=rng)
    builder.close()
    lead = CloudLead(scorer=scorer, public=public, config=lead_config(gcfg), rng=rng,
                     state_dir=out / "guide-state" / "cloud", progress=False)
    theta0 = lead.warm_start(theta_init)
    log(f"[demo] cloud: fp32 torch (d={spec.d}), {cfg.warm_steps} AdamW steps on public data in "
        f"{time.perf_counter() - t0:.1f}s")

    def edge_trainer(data, name: str):
        return llama_trainer(gguf=gguf, spec=spec, texts=data.texts, labels=data.labels, name=name,
                             batch=cfg.batch, q=1, lr=0.0, eps=1e-3, threads=cfg.threads, init_seed=cfg.seed)

    edges = {name: edge_trainer(sh, name) for name, sh in zip(gcfg.tokens, shards, strict=True)}

    async def federate():
        srv = GuideServer(config=gcfg, spec=spec, theta0=theta0, guidance=lead)
        await srv.start()
        try:
            clients = [EdgeClient(config=ClientConfig(host="127.0.0.1", port=srv.port, client_id=n, token=t,
                                                      state_dir=str(out / n), max_rounds=cfg.rounds,
                                                      **({"ca": str(tls[0])} if tls else {"insecure": True})),
                                  trainer=EdgeTrainerAdapter(trainer=edges[n][0]), rng=np.random.default_rng(i),
                                  log=lambda ev, **f: log(f"[{f.get('client', '')}] {ev} "
                                                          f"{ {k: v for k, v in f.items() if k != 'client'} }")
                                  if ev == "round_done" else None)
                       for i, (n, t) in enumerate(gcfg.tokens.items())]
            sums = await asyncio.gather(*(c.run() for c in clients))
            while not srv.finished:
                await asyncio.sleep(0.05)
            return sums
        finally:
            await srv.stop()

    t0 = time.perf_counter()
    sums = asyncio.run(federate())
    train_s = time.perf_counter() - t0
    log(f"[demo] {cfg.rounds} rounds in {train_s:.1f}s")
    for tr, rt in edges.values():
        tr.close()
        rt.close()

    # ---- the same private test texts, scored on the edge runtime (llama.cpp) ------------------------------
    store = Store(root=out / "guide-state")
    ev_tr, ev_rt = edge_trainer(held["val"], "eval")
    val, test = held["val"], held["test"]

    def score(th: np.ndarray) -> dict:
        mv = llama_margins(ev_tr, th, val.texts, 16)
        mt = llama_margins(ev_tr, th, test.texts, 16)
        thr = calibrate_threshold(mv, val.labels)  # fixed on private validation, never on test
        return {"acc": accuracy(mt, test.labels), "acc_calibrated": accuracy(mt, test.labels, thr), "threshold": thr}

    per_round_passes = 2 * cfg.local_steps * len(edges)
    zero_shot = {"round": None, "forward_passes": 0, **score(theta_init)}
    curve = []
    for r in range(cfg.rounds + 1):
        th = store.load_theta(r)
        if th is None:
            break
        curve.append({"round": r, "forward_passes": r * per_round_passes, **score(th)})
    rounds = store.rounds(1000)
    store.close()
    ev_tr.close()
    ev_rt.close()
    cloud_only = curve[0]  # θ_0: what the cloud reaches on public data alone
    for name, row in (("zero-shot", zero_shot), ("cloud only (θ_0)", cloud_only), ("edgezo", curve[-1])):
        log(f"[demo] {name:17s} test acc {row['acc']:.3f}, calibrated {row['acc_calibrated']:.3f}")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    x = [c["forward_passes"] for c in curve]
    ax.plot(x, [c["acc_calibrated"] for c in curve], "o-", label="edgezo (calibrated)")
    ax.plot(x, [c["acc"] for c in curve], "o:", alpha=0.6, label="edgezo (raw)")
    ax.axhline(cloud_only["acc_calibrated"], color="C2", ls="--", label="cloud only (calibrated)")
    ax.axhline(zero_shot["acc_calibrated"], color="grey", ls="--", label="zero-shot (calibrated)")
    ax.set_xlabel("edge forward passes (both edges)")
    ax.set_ylabel(f"private test accuracy (n={cfg.test_n} tweets)")
    ax.set_title("edgezo: the cloud leads on movie snippets, the edges correct on tweets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    summary = {
        "config": asdict(cfg), "d": spec.d, "zero_shot": zero_shot, "cloud_only": cloud_only, "before": curve[0],
        "after": curve[-1], "curve": curve,
        "rounds": [{k: r[k] for k in ("round", "uploads", "public_loss", "client_loss")} for r in rounds],
        "client_reconnects": [s.reconnects for s in sums],
        "seconds": {"train": round(train_s, 1), "total": round(time.perf_counter() - t_start, 1)},
        "plot": str(out / "accuracy.png"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"[demo] the edges added {100 * (curve[-1]['acc_calibrated'] - cloud_only['acc_calibrated']):+.1f} "
        f"calibrated points over the cloud alone; plot {out / 'accuracy.png'}")
    return summary


def register(sub) -> None:
    """Add ``demo``."""
    d = sub.add_parser("demo", help="round v2 on loopback: a guide leading on movie snippets, two SmolLM2-135M "
                                    "edges correcting on private tweets; prints zero-shot / cloud-only / edgezo")
    d.add_argument("--rounds", type=int, default=None)
    d.add_argument("--local-steps", type=int, default=None)
    d.add_argument("--batch", type=int, default=None, help="examples per forward pass")
    d.add_argument("--k", type=int, default=None, help="subspace size (4-128)")
    d.add_argument("--warm-steps", type=int, default=None, help="the cloud's AdamW steps before round 0")
    d.add_argument("--val-n", type=int, default=None)
    d.add_argument("--test-n", type=int, default=None)
    d.add_argument("--out", default="edgezo-demo", help="output folder (plot, JSON summary, guide state)")
    d.add_argument("--quick", action="store_true", help="a smaller, faster run (smoke test)")
    d.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from cloud.extras import require_cloud

    require_cloud()

    kw = {}
    if args.rounds is not None:
        kw["rounds"] = args.rounds
    for name in ("local_steps", "batch", "k", "warm_steps", "val_n", "test_n"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    try:
        cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    except ValueError as e:
        print(f"edgezo demo: {e}", file=sys.stderr)
        return 2
    summary = run_demo(cfg, out=args.out)
    print(json.dumps({k: summary[k] for k in ('zero_shot', 'cloud_only', 'after', 'seconds', 'plot')}, default=str))
    return 0
