"""Bytes per round per client, each way: the adaptive wire against all-fp32, on SmolLM2's adapter (d = 460,800, k = 16).

    nice .venv/bin/python bench/wire_bytes.py --json docs/bench/wire_bytes.json

Every figure is the length of a real frame (``cloud.engine.round_start`` / ``Update`` through ``protocol.encode``),
so headers, keys and codec parameters are counted. The subspace U is the leading cloud's own (``cloud.lead``: the
packaged SmolLM2-135M Q4_1 dequantized to fp32, a short AdamW warm start on the packaged public set, then one
trajectory direction and k − 1 public gradients, exactly what ``guide serve`` sends), and θ'_t − θ_t is one more
AdamW step of it; ``--basis gaussian`` replaces U by an orthonormal Gaussian basis of the same shape, for contrast.

Rows (downlink = one RoundStart carrying the round's guidance; uplink = one Update of local_steps × q records):

* ``fp32``: θ dense float32 + U float32 (the uncompressed wire).
* ``q8``: θ dense + U q8 (the guide's default until ``[wire] guidance = "adaptive"`` became it).
* ``adaptive_replay``: U adaptive at its default (mode A, ``cloud.config.BASIS_TARGET``) + θ as the previous
  round's c-space move
  (k float64 numbers): a subspace round with ``[cloud] round_steps = 0``, the default, to an edge that trained in
  it. This is what ``guide serve`` sends by default.
* ``adaptive_dense``: the same U + θ dense: an edge that missed the previous round.
* ``adaptive_delta``: the same U + θ as an adaptive delta (``[wire] theta = "adaptive"``, default target): a round
  after the cloud's own AdamW step, which no exact record reaches.

Deterministic for a given model and seed (torch on CPU, one thread).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cloud.config import GuideConfig, TrainConfig, WireConfig  # noqa: E402
from cloud.engine import plan_round, round_start  # noqa: E402
from cloud.theta_wire import wire_start  # noqa: E402
from protocol.codecs import AdaptiveConfig, chunk_errors  # noqa: E402
from protocol.messages import Guidance as WireGuidance  # noqa: E402
from protocol.messages import LossStats, ReplayRound, ThetaReplay, Update, encode  # noqa: E402
from protocol.samples import random_steps  # noqa: E402
from protocol.spec import AdapterSpec  # noqa: E402
from protocol.zo import Guide, orthonormal_basis  # noqa: E402


def model_round(model: str, *, k: int, warm_steps: int, batch: int, seed: int) -> tuple[AdapterSpec, np.ndarray,
                                                                                         np.ndarray, Guide, dict]:
    """(spec, θ_t, θ'_t, the round's subspace guide, info) from the leading cloud on ``model`` (one AdamW step per
    round, so θ'_t ≠ θ_t and the round's θ needs a delta)."""
    import torch

    from cloud.cli import build_source

    torch.set_num_threads(1)  # the machine is shared; and one thread keeps the figures reproducible
    with tempfile.TemporaryDirectory(prefix="wire-bytes-") as tmp:
        cfg = GuideConfig.from_dict({
            "server": {"state_dir": tmp, "insecure": True},
            "model": {"path": model, "device": "cpu"},
            "data": {"public_n": 4 * batch, "batch": batch, "seed": seed},
            "train": {"kind": "subspace", "k": k},
            "cloud": {"warm_steps": warm_steps, "batch": batch, "round_steps": 1}})
        t0 = time.perf_counter()
        spec, theta0, lead, _ = build_source(cfg)
        try:
            g = lead.guidance(theta0, 0)
        finally:
            lead.close()
        info = {"model": Path(model).name, "warm_steps": warm_steps, "batch": batch, "seconds": time.perf_counter() - t0,
                "subspace": {k2: v for k2, v in g.info.items() if k2.startswith("subspace_") and k2 != "subspace_seconds"}}
        return spec, np.asarray(theta0, np.float32), np.asarray(g.theta, np.float32), g.guide, info


def subspace_quality(guide: Guide, wire: WireGuidance) -> dict:
    """What compression did to U: relative L2 error (all of U, and the worst chunk), the worst column's cosine to
    its original, and the largest principal angle between span(U) and span(Û) in degrees (the edge searches
    span(Û); both sides use Û, so replay stays exact whatever these are)."""
    u = guide.basis.astype(np.float64)
    v = wire.to_guide().basis.astype(np.float64)
    cos_cols = (u * v).sum(0) / (np.linalg.norm(u, axis=0) * np.linalg.norm(v, axis=0))
    qu, _ = np.linalg.qr(u)
    qv, _ = np.linalg.qr(v)
    sv = np.clip(np.linalg.svd(qu.T @ qv, compute_uv=False), -1.0, 1.0)
    bits = wire.basis.parts["b"] if wire.basis.codec == "adaptive" else None
    return {"rel_error": float(np.linalg.norm(v - u) / np.linalg.norm(u)),
            "max_chunk_error": float(chunk_errors(guide.basis, wire.basis).max()),
            "min_column_cosine": float(cos_cols.min()),
            "max_principal_angle_deg": float(np.degrees(np.arccos(sv.min()))),
            **({} if bits is None else {"bits_per_chunk": {int(b): int((bits == b).sum()) for b in np.unique(bits)}})}


def frame_rows(spec: AdapterSpec, theta: np.ndarray, theta_next: np.ndarray, guide: Guide, *, seed: int,
               local_steps: int, q: int, targets: tuple[float, ...] = ()) -> dict:
    """Every row's downlink and uplink bytes for one round (see the module docstring)."""
    rng = np.random.default_rng(seed)
    train = TrainConfig(kind="subspace", k=guide.k, local_steps=local_steps, q=q)
    ada_basis, _ = WireConfig(guidance="adaptive").codec()
    theta_codec = WireConfig(theta="adaptive").theta_codec()
    wires = {"fp32": WireGuidance.from_guide(guide, "fp32", "fp32"), "q8": WireGuidance.from_guide(guide, "q8", "q8"),
             "adaptive": WireGuidance.from_guide(guide, ada_basis, ada_basis)}
    # the round's θ as the previous round's c-space move (any k numbers: its size does not depend on their values)
    c_move = ReplayRound(round_id=0, guide_id="0" * 16, c=rng.standard_normal(guide.k).tolist())
    delta = wire_start(theta_next, prev_round=0, prev_theta=theta, prev_guide=None, prev_guide_id="", prev_move=None,
                       codec=theta_codec)
    cases = {"fp32": ("fp32", None), "q8": ("q8", None), "adaptive_replay": ("adaptive", ThetaReplay(rounds=[c_move])),
             "adaptive_dense": ("adaptive", None), "adaptive_delta": ("adaptive", ThetaReplay(rounds=[delta.move]))}
    up = encode(Update(round_id=1, client_id="pi-kitchen", steps=random_steps(rng, local_steps, q, spec.d, lam=0.0),
                       first_step=local_steps, n_examples=local_steps * 8,
                       loss=LossStats(mean=0.7, min=0.6, max=0.8, last=0.6), guide_id="0" * 16))
    rows = {}
    for name, (wire_name, moves) in cases.items():
        wire = wires[wire_name]
        plan = plan_round(round_id=1, theta=delta.theta if name == "adaptive_delta" else theta_next, guidance=None,
                          guide=wire.to_guide(), basis_id=wire.guide_id, train=train, total_rounds=10)
        rs = round_start(plan, spec=spec, train=train, guidance=wire, deadline=0.0, theta=moves,
                         base_round=0 if moves is not None else -1)
        rows[name] = {"down_bytes": len(encode(rs)), "up_bytes": len(up),
                      "guidance_bytes": len(encode(rs)) - len(encode(round_start(
                          plan, spec=spec, train=train, guidance=None, deadline=0.0, theta=moves,
                          base_round=0 if moves is not None else -1)))}
    for t in targets:  # the same replay-θ round with U at other mode-A targets: bytes against what U loses
        wire = WireGuidance.from_guide(guide, AdaptiveConfig(target=t), AdaptiveConfig(target=t))
        plan = plan_round(round_id=1, theta=theta_next, guidance=None, guide=wire.to_guide(), basis_id=wire.guide_id,
                          train=train, total_rounds=10)
        rs = round_start(plan, spec=spec, train=train, guidance=wire, deadline=0.0,
                         theta=ThetaReplay(rounds=[c_move]), base_round=0)
        n = len(encode(rs))
        rows[f"adaptive_replay_target_{t:g}"] = {"down_bytes": n, "up_bytes": len(up), **subspace_quality(guide, wire)}
    base = rows["fp32"]
    for r in rows.values():
        r["down_vs_fp32"] = round(base["down_bytes"] / r["down_bytes"], 2)
        r["both_ways_vs_fp32"] = round((base["down_bytes"] + base["up_bytes"]) / (r["down_bytes"] + r["up_bytes"]), 2)
    err = chunk_errors(guide.basis, wires["adaptive"].basis)
    bits = wires["adaptive"].basis.parts["b"]
    dl = delta.move.delta
    quality = {
        **{f"guidance_adaptive_{k2}": v for k2, v in subspace_quality(guide, wires["adaptive"]).items()},
        "guidance_adaptive_max_chunk_error": float(err.max()),
        "guidance_adaptive_bits_per_chunk": {int(b): int((bits == b).sum()) for b in np.unique(bits)},
        "theta_delta_norm": float(np.linalg.norm(theta_next.astype(np.float64) - theta)),
        "theta_delta_max_chunk_error": float(chunk_errors((theta_next.astype(np.float64) - theta).astype(np.float32),
                                                          dl).max()),
        "theta_delta_bits_per_chunk": {int(b): int((dl.parts["b"] == b).sum()) for b in np.unique(dl.parts["b"])},
    }
    return {"rows": rows, "quality": quality}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF folder or GGUF (default: the packaged SmolLM2-135M Q4_1)")
    p.add_argument("--basis", choices=("model", "gaussian"), default="model")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--warm-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--q", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", default="0.02,0.05,0.1,0.15",
                   help="more mode-A targets for U, comma-separated (the replay-θ row at each)")
    p.add_argument("--basis-cache", default="", help="an .npz to keep U and θ in (reused when present: no model run)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    out: dict = {"command": "python bench/wire_bytes.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "python": platform.python_version(), "k": a.k, "local_steps": a.local_steps, "q": a.q}
    targets = tuple(float(x) for x in a.targets.split(",") if x.strip())
    cache = Path(a.basis_cache) if a.basis_cache else None
    if a.basis == "model" and cache is not None and cache.exists():
        from protocol.spec import ModelDims

        with np.load(cache) as z:
            theta, theta_next = z["theta"], z["theta_next"]
            guide = Guide(z["basis"], 1.0, None, "subspace")
            out["cloud"] = json.loads(str(z["info"]))
        spec = AdapterSpec(kind="lora", dims=ModelDims(30, 576, 1536, 9, 3), rank=8, targets=("q_proj", "v_proj"))
    elif a.basis == "model":
        from edge.models import smollm2_path

        spec, theta, theta_next, guide, info = model_round(a.model or str(smollm2_path()), k=a.k,
                                                           warm_steps=a.warm_steps, batch=a.batch, seed=a.seed)
        out["cloud"] = info
        if cache is not None:
            np.savez(cache, theta=theta, theta_next=theta_next, basis=guide.basis, info=json.dumps(info))
    else:
        from protocol.spec import ModelDims

        spec = AdapterSpec(kind="lora", dims=ModelDims(30, 576, 1536, 9, 3), rank=8, targets=("q_proj", "v_proj"))
        rng = np.random.default_rng(a.seed)
        theta = (rng.standard_normal(spec.d) * 0.02).astype(np.float32)
        theta_next = (theta + rng.standard_normal(spec.d) * 1e-3).astype(np.float32)
        guide = Guide(orthonormal_basis(list(rng.standard_normal((a.k, spec.d)))), 1.0, None, "subspace")
    out["d"] = spec.d
    out["basis"] = a.basis
    out.update(frame_rows(spec, theta, theta_next, guide, seed=a.seed, local_steps=a.local_steps, q=a.q,
                          targets=targets))
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
