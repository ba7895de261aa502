"""Random *valid* messages of every type: the seed corpus for fuzzing, and fixtures for tests and docs.

Pure functions of a ``numpy.random.Generator``; small by default (a tiny adapter), so thousands per second.
"""

from __future__ import annotations

import numpy as np

from protocol.codecs import AdaptiveConfig, QuantConfig, TopKConfig
from protocol.codecs import encode as encode_array
from protocol.messages import (
    Ack,
    Auth,
    Bye,
    Challenge,
    Error,
    Guidance,
    GuidanceNext,
    GuidanceRequest,
    Hello,
    Hyper,
    LossStats,
    Message,
    ReplayRound,
    ReplayUpdate,
    RoundRequest,
    RoundStart,
    Status,
    StatusRequest,
    ThetaReplay,
    Update,
    Welcome,
)
from protocol.spec import AdapterSpec, ModelDims
from protocol.zo import Group, Guide, Schedule, StepRecord, orthonormal_basis

TINY_DIMS = ModelDims(n_layers=2, hidden=16, intermediate=32, n_heads=2, n_kv_heads=1)


def tiny_spec(kind: str = "lora") -> AdapterSpec:
    """A small adapter (d = a few hundred) for tests."""
    return AdapterSpec(kind=kind, dims=TINY_DIMS, rank=2, targets=("q_proj", "v_proj"))


def random_steps(rng: np.random.Generator, n_steps: int, q: int, d: int, split: int | None = None,
                 lam: float | None = None) -> list[StepRecord]:
    """``n_steps`` StepRecords of ``q`` perturbations each (two groups per step when ``split`` is given)."""
    out = []
    for _ in range(n_steps):
        if split is None:
            groups = [Group(rng.integers(0, 2**63, q, dtype=np.uint64), rng.standard_normal(q), 0, -1)]
        else:
            groups = [Group(rng.integers(0, 2**63, q, dtype=np.uint64), rng.standard_normal(q), 0, split),
                      Group(rng.integers(0, 2**63, 2 * q, dtype=np.uint64), rng.standard_normal(2 * q), split, d)]
        out.append(StepRecord(groups=groups, lam=float(rng.uniform(0, 1)) if lam is None else lam))
    return out


def random_guidance(rng: np.random.Generator, d: int, k: int = 2) -> Guidance:
    q = orthonormal_basis([rng.standard_normal(d) for _ in range(k)])
    codec = [QuantConfig(bits=8), QuantConfig(bits=4, block=32), "fp16", AdaptiveConfig(target=0.05),
             "q4s"][rng.integers(5)]
    return Guidance.from_guide(Guide(q, float(rng.uniform(0.1, 1.0)), rng.standard_normal(d).astype(np.float32)),
                               basis_codec=codec, grad_codec="q8")


def sample_messages(rng: np.random.Generator) -> list[Message]:
    """One random valid instance of every message type (RoundStart four times: dense θ, guidance by id,
    replayed records, and a c-space move followed by a compressed delta)."""
    spec = tiny_spec()
    d = spec.d
    guidance = random_guidance(rng, d)
    hyper = Hyper(schedule=Schedule(lr=float(rng.uniform(0, 1e-3)), momentum=0.5, decay="cosine", total_steps=100),
                  q=int(rng.integers(1, 8)), local_steps=int(rng.integers(1, 20)), batch_size=4)
    dense = encode_array(rng.standard_normal(d).astype(np.float32),
                         [TopKConfig(ratio=0.1), "q4", "fp32", AdaptiveConfig(budget=d)][rng.integers(4)])
    rr = ReplayRound(round_id=3, schedule=Schedule(), guidance=guidance,
                     updates=[ReplayUpdate(weight=0.5, first_step=2, steps=random_steps(rng, 2, 3, d, lam=0.0)),
                              ReplayUpdate(weight=0.5, steps=random_steps(rng, 1, 2, d, split=d // 2, lam=0.25))])
    moves = ThetaReplay(rounds=[  # the round-v2 forms: a c-space move in a held subspace, then a compressed delta
        ReplayRound(round_id=3, guide_id=guidance.guide_id, c=rng.standard_normal(2).tolist()),
        ReplayRound(round_id=4, delta=encode_array(rng.standard_normal(d).astype(np.float32),
                                                   AdaptiveConfig(target=0.05)))])
    loss = LossStats(mean=1.5, min=1.0, max=2.0, last=1.2)
    return [
        Hello(client_id=f"pi-{rng.integers(100)}", software="edgezo 0.1"),
        Challenge(nonce=rng.bytes(32), server_id="guide"),
        Auth(client_id="pi-1", nonce=rng.bytes(32), mac=rng.bytes(32)),
        Welcome(client_id="pi-1", session_id="s1", server_time=1.7e9),
        RoundRequest(last_round=int(rng.integers(-1, 10)), theta_digest="ab" * 8,
                     guide_ids=[guidance.guide_id][: int(rng.integers(2))]),
        GuidanceRequest(round_id=int(rng.integers(0, 10))),
        GuidanceNext(round_id=6, ready=True, guidance=guidance),
        GuidanceNext(round_id=6, ready=bool(rng.integers(2)), guidance=None),
        RoundStart(round_id=5, base_round=-1, spec=spec, theta=dense, guidance=guidance,
                   lam=float(rng.uniform(0, 1)), hyper=hyper, deadline=1.7e9 + 60),
        RoundStart(round_id=6, spec=spec, theta=dense, guidance=None, guidance_id=guidance.guide_id,
                   lam=float(rng.uniform(0, 1)), hyper=hyper, deadline=1.7e9 + 60),
        RoundStart(round_id=4, base_round=3, spec=spec, theta=ThetaReplay(rounds=[rr]), guidance=None,
                   lam=0.0, hyper=hyper, deadline=1.7e9),
        RoundStart(round_id=5, base_round=3, spec=spec, theta=moves, theta_digest="cd" * 8, guidance=guidance,
                   lam=0.0, hyper=hyper, deadline=1.7e9),
        Update(round_id=5, client_id="pi-1", steps=random_steps(rng, int(rng.integers(0, 5)), 4, d),
               first_step=10, n_examples=64, loss=loss, guide_id=guidance.guide_id, duration_s=3.5),
        Ack(round_id=5, accepted=bool(rng.integers(2)), reason="ok"),
        Error(code="schema", message="bad field"),
        Bye(reason="done"),
        StatusRequest(),
        Status(server_id="guide", round_id=5, phase="round", clients_connected=3, deadline=1.7e9,
               extra={"lr": 1e-4, "note": "x", "ok": True, "n": 3}),
    ]
