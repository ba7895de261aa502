"""``edgezo guide serve|status|cert``: the cloud subcommands (registered by app/cli.py).

Heavy imports (torch, transformers) happen inside handlers, after ``cloud.extras.require_cloud()``; a guide without
a model (``[model] path = ""``: static guidance, for load tests) runs without torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``guide`` (serve, status, cert)."""
    g = sub.add_parser("guide", help="the cloud guide daemon (federated rounds, guidance, aggregation)")
    gs = g.add_subparsers(dest="guide_command", metavar="ACTION")
    s = gs.add_parser("serve", help="run the guide daemon (asyncio TCP, SQLite state; SIGTERM stops cleanly)")
    s.add_argument("--config", default=None, help="guide.toml (flags override it)")
    s.add_argument("--host", default=None)
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--state-dir", default=None)
    s.add_argument("--log-file", default=None, help="JSON-lines log file (default: stderr)")
    s.add_argument("--rounds", type=int, default=None, help="rounds to run (0: until stopped)")
    s.add_argument("--min-clients", type=int, default=None)
    s.add_argument("--max-clients", type=int, default=None)
    s.add_argument("--deadline", type=float, default=None, help="seconds a round waits for stragglers")
    s.add_argument("--model", default=None, help="HF folder or GGUF (fp32 in the cloud); '' for no model")
    s.add_argument("--device", default=None)
    s.add_argument("--token", action="append", default=[], metavar="CLIENT=TOKEN", help="add a client (repeatable)")
    s.add_argument("--dims", default=None, help="model-free mode: n_layers,hidden,intermediate,heads,kv_heads")
    s.set_defaults(handler=cmd_serve)
    st = gs.add_parser("status", help="show rounds, clients and loss of a running guide")
    st.add_argument("addr", help="HOST:PORT")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.add_argument("--ca", default="", help="CA file (PEM) that signed the guide's certificate")
    st.add_argument("--client-id", default="", help="authenticate as this client (needed unless public_status)")
    st.add_argument("--token", default="", help="that client's token (or env EDGEZO_TOKEN)")
    st.add_argument("--insecure", action="store_true", help="plaintext, for a guide with insecure = true")
    st.set_defaults(handler=cmd_status)
    c = gs.add_parser("cert", help="make a self-signed TLS pair for a first run (openssl): cert.pem, key.pem")
    c.add_argument("--out", default="guide-tls", help="folder for cert.pem and key.pem")
    c.add_argument("--host", action="append", default=[], help="name or IP the edges connect to (repeatable; "
                                                              "default localhost and 127.0.0.1)")
    c.add_argument("--days", type=int, default=365)
    c.set_defaults(handler=cmd_cert)
    g.set_defaults(handler=lambda a: (g.print_help(), 2)[1])



def _config_from_args(args: argparse.Namespace):
    from cloud.config import GuideConfig

    cfg = GuideConfig.load(args.config)
    tokens = {}
    for t in args.token:
        if "=" not in t:
            raise ValueError(f"--token {t!r} is not CLIENT=TOKEN")
        k, v = t.split("=", 1)
        tokens[k] = v
    model = {"path": args.model, "device": args.device}
    return cfg.override(
        server={"host": args.host, "port": args.port, "state_dir": args.state_dir, "log_file": args.log_file},
        rounds={"rounds": args.rounds, "min_clients": args.min_clients, "max_clients": args.max_clients,
                "deadline_s": args.deadline},
        model=model, tokens=tokens,
    )


def lead_config(cfg):
    """cloud.lead.LeadConfig from guide.toml's [cloud] section and [train] k (one place maps the two)."""
    from cloud.lead import LeadConfig

    c = cfg.cloud
    return LeadConfig(warm_steps=c.warm_steps, round_steps=c.round_steps, lr=c.lr, batch=c.batch, prox=c.prox,
                      k=cfg.train.k, trajectory=c.trajectory)


def _model_kwargs(cfg) -> dict:
    """cloud.model.build_scorer's arguments from [model] and [data] (rank 0 and its followers build alike)."""
    from cloud.public_data import cloud_task

    m = cfg.model
    return dict(model_path=m.path, device=m.device, rank=m.rank, alpha=m.lora_alpha, targets=m.targets,
                layers=m.layers, train=m.train, init_seed=m.init_seed, task=cloud_task(cfg.data))


def scorer_from_config(cfg):
    """The TorchScorer a data-parallel follower rank needs (no public data: rank 0 sends each mini-batch)."""
    import torch

    from cloud.model import build_scorer

    torch.manual_seed(cfg.data.seed)
    return build_scorer(**_model_kwargs(cfg))[1]


def _torch_source(cfg, public, rng, scorer_wrap, events: list) -> tuple:
    """build_source's torch part: (spec, θ_0, guidance) on the public slice; appends its log events."""
    from pathlib import Path

    import numpy as np

    from cloud.guidance import GuidanceConfig
    from cloud.model import build_cloud

    tc = cfg.train
    spec, theta0, guidance, scorer = build_cloud(**_model_kwargs(cfg), public=public, batch=cfg.data.batch,
        guidance_config=GuidanceConfig(k=tc.k, batches=tc.guide_batches, mix_alpha=tc.mix_alpha,
                                      precondition=tc.precondition), rng=rng, wrap=scorer_wrap)
    if scorer_wrap is not None:
        events.append(("cloud_data_parallel", {"world": getattr(scorer, "world", 1),
                                               "backend": getattr(scorer, "backend", "")}))
    if tc.subspace:  # round v2: the cloud leads (warm start, resumable) and sends a subspace each round
        from cloud.lead import CloudLead

        guidance.close()
        guidance = CloudLead(scorer=scorer, public=public, config=lead_config(cfg), rng=rng,
                             state_dir=Path(cfg.server.state_dir) / "cloud")
        theta0 = guidance.warm_start(theta0)
        warm = [h["loss"] for h in guidance.history if h["phase"] == "warm"]
        # what the cloud alone reached before round 0
        events.append(("cloud_warm_start", {"steps": cfg.cloud.warm_steps,
                                            "public_loss_first": warm[0] if warm else None,
                                            "public_loss_last": warm[-1] if warm else None,
                                            "theta0_norm": float(np.linalg.norm(theta0))}))
    return spec, theta0, guidance


def build_source(cfg, *, dims: str | None = None, scorer_wrap=None) -> tuple:
    """(spec, θ_0, guidance source, log events) for a config, whatever the transport (the TCP daemon, the Flower
    ServerApp): torch guidance when ``[model] path`` is set (round v2: the leading cloud, warm-started), else
    static guidance on ``dims`` ("n_layers,hidden,intermediate,heads,kv_heads"). ``log events``: (event, fields)
    pairs for the guide's log. ``scorer_wrap``: wraps the torch scorer before any gradient (rank 0 of a
    data-parallel guide: :class:`cloud.distributed.LeaderScorer`); it needs a model."""
    import numpy as np

    from cloud.daemon import StaticGuidance
    from protocol.spec import AdapterSpec, ModelDims

    m, tc = cfg.model, cfg.train
    rng = np.random.default_rng(cfg.data.seed)
    events: list[tuple[str, dict]] = []
    if scorer_wrap is not None and not m.path:
        raise ValueError("a data-parallel guide (torchrun) needs a model: set [model] path (the ranks share the "
                         "cloud's backprop; a model-free guide has none)")
    if cfg.cloud.ranks > 1 and not m.path:
        raise ValueError("[cloud] ranks > 1 needs a model: set [model] path (the ranks share the cloud's backprop; "
                         "a model-free guide has none)")
    if cfg.cloud.ranks > 1 and scorer_wrap is not None:
        raise ValueError("[cloud] ranks = N starts its own ranks; under torchrun leave it at 1")
    if m.path:
        from cloud.extras import require_cloud

        require_cloud()
        from pathlib import Path

        import torch

        from cloud.data import split
        from cloud.public_data import load_public

        torch.manual_seed(cfg.data.seed)
        data, report = load_public(cfg.data, Path(cfg.server.state_dir) / "datasets-cache")
        n = min(cfg.data.public_n, len(data))
        counts = np.bincount(data.labels)
        public = split(data, {"public": n}, rng, balanced=len(counts) == 2 and counts.min() >= n - n // 2)["public"]
        ranks = None
        if cfg.cloud.ranks > 1:  # this process is rank 0 of ranks it starts itself (e.g. the Flower ServerApp)
            from cloud.distributed import LeaderScorer, LocalRanks

            ranks = LocalRanks(cfg.cloud.ranks, _model_kwargs(cfg), cfg.data.seed)
            scorer_wrap = LeaderScorer
        events.append(("public_data", {**report, "used": len(public), "template": cfg.data.template,
                                       "label_words": cfg.data.label_words}))
        try:
            spec, theta0, guidance = _torch_source(cfg, public, rng, scorer_wrap, events)
        except BaseException:
            if ranks is not None:
                ranks.close()
            raise
        if ranks is not None:
            from cloud.distributed import WithRanks

            guidance = WithRanks(guidance, ranks)
    else:
        if not dims:
            raise ValueError("no model configured: give [model] path or --dims for a model-free guide")
        nl, h, i, nh, nkv = (int(x) for x in dims.split(","))
        spec = AdapterSpec(kind="lora", dims=ModelDims(nl, h, i, nh, nkv), rank=m.rank, alpha=m.lora_alpha,
                           targets=m.targets, layers=m.layers, train=m.train)
        theta0 = spec.flatten(spec.init(m.init_seed))
        guidance = StaticGuidance(d=spec.d, k=tc.k, mix_alpha=tc.mix_alpha, rng=rng,
                                  kind=tc.kind if tc.subspace else "guided")
    return spec, theta0, guidance, events


def build_server(cfg, *, dims: str | None = None, scorer_wrap=None):
    """A GuideServer for a config: torch guidance when a model is set, else static guidance on ``dims``."""
    from cloud.daemon import GuideServer

    spec, theta0, guidance, events = build_source(cfg, dims=dims, scorer_wrap=scorer_wrap)
    server = GuideServer(config=cfg, spec=spec, theta0=theta0, guidance=guidance)
    for event, fields in events:
        server.log(event, **fields)
    return server


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # cloud.distributed.launched()
        return _serve_data_parallel(args)
    return _serve(args)


def _serve_data_parallel(args: argparse.Namespace) -> int:
    """Under torchrun: rank 0 is the daemon, its cloud backprop data parallel over all ranks; the other ranks
    follow (cloud.distributed). Rank 0 stops the followers however the daemon ends."""
    from cloud.extras import require_cloud

    require_cloud()
    from cloud import distributed

    rank, _ = distributed.start()
    try:
        if rank == 0:
            return _serve(args, scorer_wrap=distributed.LeaderScorer)
        try:
            scorer = scorer_from_config(_config_from_args(args))
        except (ValueError, FileNotFoundError, OSError):
            scorer = None  # rank 0 meets the same error, reports it and stops us
        n = distributed.follow(scorer)
        print(f"edgezo: rank {rank}: computed its share of {n} cloud gradients; stopped by rank 0", file=sys.stderr)
        return 0
    finally:
        if rank == 0:
            distributed.stop_followers()
        distributed.shutdown()


def _serve(args: argparse.Namespace, scorer_wrap=None) -> int:
    from cloud.daemon import StartupError, serve

    try:
        cfg = _config_from_args(args)
        if not cfg.tokens:
            raise ValueError("no clients configured: add [clients.tokens] to the config or --token CLIENT=TOKEN")
        cfg.server.ssl_context()  # TLS files (or the explicit insecure = true) are checked before any model loads
        server = build_server(cfg, dims=args.dims, scorer_wrap=scorer_wrap)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(server))
    except StartupError as e:  # the state dir cannot be resumed: one line, the dir untouched
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the port is taken: one line, not a traceback
        import os

        why = os.strerror(e.errno).lower() if e.errno else str(e)
        print(f"edgezo: error: cannot listen on {cfg.server.host}:{cfg.server.port}: {why}", file=sys.stderr)
        return 2
    return 0


async def fetch_status(host: str, port: int, timeout: float = 10.0, tls=None, client_id: str = "",
                       token: str = "") -> dict:
    """One ``StatusRequest`` as a plain dict: the Status fields, its ``extra`` scalars flattened in, and
    ``rounds`` / ``clients`` parsed from their JSON. With ``client_id``/``token`` it authenticates first (a guide
    answers a tokenless request only with public_status = true, and then without client ids).
    ``tls``: an ``ssl.SSLContext`` verifying the guide (None: plaintext, for an insecure guide)."""
    from protocol.auth import client_handshake
    from protocol.framing import read_frame, write_frame
    from protocol.messages import Error, Status, StatusRequest

    r, w = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None), timeout)
    try:
        if client_id:
            await client_handshake(r, w, client_id, token, timeout=timeout, software="edgezo-status")
        await write_frame(w, StatusRequest(), timeout=timeout)
        st = await read_frame(r, timeout=timeout)
    finally:
        w.close()
    if isinstance(st, Error):
        raise st.exception()
    if not isinstance(st, Status):
        raise ValueError(f"guide answered a status request with {type(st).__name__}")
    out = {k: v for k, v in vars(st).items() if k != "extra"}
    out.update(st.extra)
    out["round"] = st.round_id
    out["rounds"] = json.loads(str(out.pop("rounds_json", "[]")))
    out["clients"] = json.loads(str(out.pop("clients_json", "[]")))
    return out


def cmd_status(args: argparse.Namespace) -> int:
    from protocol.errors import ProtocolError
    from protocol.framing import parse_addr

    try:
        host, port = parse_addr(args.addr)
        tls = None
        if not args.insecure:
            from protocol.auth import client_ssl_context

            tls = client_ssl_context(args.ca or None)
        import os

        token = args.token or os.environ.get("EDGEZO_TOKEN", "")
        if args.client_id and not token:
            raise ValueError("--client-id needs --token (or EDGEZO_TOKEN)")
        st = asyncio.run(fetch_status(host, port, tls=tls, client_id=args.client_id, token=token))
    except (OSError, ValueError, asyncio.TimeoutError, ProtocolError) as e:
        print(f"edgezo: cannot reach guide at {args.addr}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, default=str))
        return 0
    print(f"round {st['round']}  open={st['open']}  finished={st['finished']}  selected={st['selected']}  "
          f"uploaded={st['uploaded']}  waiting={st['waiting']}  d={st['d']}")
    print(f"bytes last round: down {st.get('last_down_bytes', 0)} ({st.get('last_down_bytes_per_client', 0)}/client)"
          f"  up {st.get('last_up_bytes', 0)} ({st.get('last_up_bytes_per_upload', 0)}/upload)")
    print(f"theta last round: {st.get('last_theta_replay', 0)} as replay records, {st.get('last_theta_dense', 0)} dense")
    print(f"{'round':>5} {'status':>7} {'uploads':>7} {'selected':>8} {'public_loss':>11} {'client_loss':>11} "
          f"{'down_bytes':>11} {'up_bytes':>9}")
    for r in st.get("rounds", []):
        pl = "-" if r["public_loss"] is None else f"{r['public_loss']:.4f}"
        cl = "-" if r["client_loss"] is None else f"{r['client_loss']:.4f}"
        down = "-" if r.get("down_bytes") is None else str(r["down_bytes"])
        up = "-" if r.get("up_bytes") is None else str(r["up_bytes"])
        print(f"{r['round']:>5} {r['status']:>7} {r['uploads']:>7} {r['selected']:>8} {pl:>11} {cl:>11} {down:>11} "
              f"{up:>9}")
    cl = st.get("clients", [])
    print(f"clients ({len(cl)}): " + ", ".join(f"{c['client']}({c['uploads']})" for c in cl[:20]))
    return 0



def cmd_cert(args: argparse.Namespace) -> int:
    """A self-signed certificate (EC P-256) for the guide; edges verify it with ``--ca OUT/cert.pem``."""
    from cloud.tls import TLSError, self_signed_pair

    try:
        cert, key = self_signed_pair(args.out, hosts=args.host or ["localhost", "127.0.0.1"], days=args.days)
    except TLSError as e:
        print(f"edgezo: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {cert} and {key}\n"
          f"guide.toml:  [server] tls_cert = \"{cert}\"  tls_key = \"{key}\"\n"
          f"each edge:   edgezo train ... --guide HOST:PORT --ca {cert}")
    return 0
