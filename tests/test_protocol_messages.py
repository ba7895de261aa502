"""Messages and frames: hypothesis round trips of every type, each error class, limits, upload cost."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import codecs as C
from protocol import messages as M
from protocol.arrays import packb
from protocol.constants import PROTOCOL_VERSION, Limits
from protocol.errors import (
    ERROR_CLASSES,
    FrameTooLarge,
    LimitExceeded,
    MalformedFrame,
    ProtocolError,
    SchemaError,
    TruncatedFrame,
    UnknownMessageType,
    VersionMismatch,
)
from protocol.samples import random_guidance, random_steps, sample_messages, tiny_spec
from protocol.spec import AdapterSpec, ModelDims
from protocol.zo import Group, Schedule, StepRecord, replay

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEC = tiny_spec()
D = SPEC.d


def _first_round_start(msgs):
    """The first RoundStart among the samples (a large message with arrays, nested types and λ)."""
    return next(m for m in msgs if type(m).__name__ == "RoundStart")


def frame_of(obj) -> bytes:
    body = packb(obj)
    return struct.pack(">I", len(body)) + body


def roundtrip(msg: M.Message) -> M.Message:
    f = protocol.encode(msg)
    back = protocol.decode(f)
    assert type(back) is type(msg)
    assert protocol.encode(back) == f  # the wire form is canonical: decode∘encode is the identity on it
    return back


def assert_steps_equal(a: list[StepRecord], b: list[StepRecord]) -> None:
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        assert sa.lam == sb.lam and len(sa.groups) == len(sb.groups)
        for ga, gb in zip(sa.groups, sb.groups, strict=True):
            assert (ga.start, ga.stop) == (gb.start, gb.stop)
            np.testing.assert_array_equal(ga.seeds, gb.seeds)
            np.testing.assert_array_equal(ga.grads, gb.grads)
            assert gb.seeds.dtype == np.uint64 and gb.grads.dtype == np.float32


# ---- strategies --------------------------------------------------------------------------------------
ids = st.text(min_size=1, max_size=40)
texts = st.text(max_size=60)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
nonneg = st.floats(0, 1e12, allow_nan=False)
unit = st.floats(0, 1, allow_nan=False)
u63 = st.integers(0, 2**63 - 1)


@st.composite
def groups(draw, d: int = D):
    n = draw(st.integers(0, 6))
    start = draw(st.integers(0, d - 1))
    stop = draw(st.one_of(st.just(-1), st.integers(start + 1, d)))
    seeds = np.array(draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n)), np.uint64)
    grads = np.array(draw(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=n, max_size=n)),
                     np.float32)
    return Group(seeds, grads, start, stop)


@st.composite
def step_lists(draw, d: int = D):
    n = draw(st.integers(0, 5))
    same_lam = draw(st.booleans())
    lam = draw(unit)
    return [StepRecord(groups=draw(st.lists(groups(d), max_size=3)), lam=lam if same_lam else draw(unit))
            for _ in range(n)]


schedules = st.builds(Schedule, lr=st.floats(0, 1, allow_nan=False), eps=st.floats(1e-6, 1, allow_nan=False),
                      momentum=st.floats(0, 0.99, allow_nan=False), warmup=st.integers(0, 100),
                      decay=st.sampled_from(["constant", "cosine", "linear"]), total_steps=st.integers(0, 10**6),
                      min_ratio=unit, eps_decay=st.floats(0, 10, allow_nan=False))
hypers = st.builds(M.Hyper, schedule=schedules, q=st.integers(1, 64), local_steps=st.integers(1, 1000),
                   batch_size=st.integers(1, 256), first_step=st.integers(0, 10**6), split_layer=st.integers(-1, 1),
                   p1=st.integers(0, 8), p2=st.integers(0, 8), seed_base=st.integers(0, 2**64 - 1),
                   seed_pool=st.integers(0, 2**24))
specs = st.builds(AdapterSpec, kind=st.sampled_from(["lora", "control"]),
                  dims=st.just(ModelDims(n_layers=2, hidden=16, intermediate=32, n_heads=2, n_kv_heads=1)),
                  rank=st.integers(1, 4), alpha=st.floats(0.5, 64), train=st.sampled_from(["AB", "B"]),
                  targets=st.sampled_from([("q_proj",), ("q_proj", "v_proj"), ("down_proj", "k_proj")]))
codec_cfgs = st.sampled_from(["fp32", "fp16", "q2", "q3", "q4", "q8", C.TopKConfig(ratio=0.1),
                              C.AdaptiveConfig(target=0.1, chunk=64), C.AdaptiveConfig(budget=10_000)])


@st.composite
def round_starts(draw):
    spec = draw(specs)
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    guidance = draw(st.one_of(st.none(), st.just(None).map(lambda _: random_guidance(rng, spec.d))))
    if draw(st.booleans()):
        theta = C.encode(rng.standard_normal(spec.d).astype(np.float32), draw(codec_cfgs))
    else:
        form = draw(st.sampled_from(["updates", "c", "delta"]))
        if form == "updates":
            rr = M.ReplayRound(round_id=draw(u63), schedule=draw(schedules), guidance=guidance,
                               updates=[M.ReplayUpdate(weight=draw(unit), first_step=draw(st.integers(0, 100)),
                                                       steps=draw(step_lists(spec.d)))])
        elif form == "c":  # a subspace round's c-space move, in guidance the receiver holds
            rr = M.ReplayRound(round_id=draw(u63), guide_id=draw(st.text(max_size=16)),
                               c=rng.standard_normal(int(rng.integers(1, 17))).tolist())
        else:  # a compressed θ delta
            rr = M.ReplayRound(round_id=draw(u63),
                               delta=C.encode(rng.standard_normal(spec.d).astype(np.float32), draw(codec_cfgs)))
        theta = M.ThetaReplay(rounds=[rr] * draw(st.integers(0, 2)))
    lam = draw(st.one_of(st.just(0.0), unit, st.just("online"))) if guidance is not None else 0.0
    return M.RoundStart(round_id=draw(u63), base_round=draw(st.integers(-1, 10)), spec=spec, theta=theta,
                        theta_digest=draw(st.text(max_size=16)), guidance=guidance, lam=lam, hyper=draw(hypers),
                        deadline=draw(nonneg))


messages = st.one_of(
    st.builds(M.Hello, client_id=ids, versions=st.lists(st.integers(0, 100), max_size=5), software=texts),
    st.builds(M.Challenge, nonce=st.binary(min_size=32, max_size=32), server_id=texts),
    st.builds(M.Auth, client_id=ids, nonce=st.binary(min_size=32, max_size=32),
              mac=st.binary(min_size=32, max_size=32)),
    st.builds(M.Welcome, client_id=ids, session_id=texts, server_time=nonneg),
    st.builds(M.RoundRequest, last_round=st.integers(-1, 2**63 - 1), theta_digest=texts),
    round_starts(),
    st.builds(M.Update, round_id=u63, client_id=ids, steps=step_lists(), first_step=st.integers(0, 10**9),
              n_examples=u63, loss=st.builds(M.LossStats, mean=finite, min=finite, max=finite, last=finite),
              guide_id=texts, theta_digest=texts, duration_s=nonneg),
    st.builds(M.Ack, round_id=u63, accepted=st.booleans(), reason=texts),
    st.builds(M.Error, code=ids, message=texts, fatal=st.booleans()),
    st.builds(M.Bye, reason=texts),
    st.builds(M.StatusRequest),
    st.builds(M.Status, server_id=texts, round_id=st.integers(-1, 100), phase=ids,
              clients_connected=st.integers(0, 10**6), deadline=st.one_of(st.none(), nonneg),
              extra=st.dictionaries(st.text(max_size=10), st.one_of(st.integers(-(2**63), 2**63 - 1), finite,
                                                                    texts, st.booleans()), max_size=5)),
)


@SETTINGS
@given(msg=messages)
def test_every_message_roundtrips(msg):
    back = roundtrip(msg)
    if isinstance(msg, M.Update):
        assert_steps_equal(msg.steps, back.steps)
        assert back.n_perturbations == msg.n_perturbations
    if isinstance(msg, M.RoundStart):
        assert back.spec == msg.spec and back.spec.d == msg.spec.d
        assert back.hyper.schedule == msg.hyper.schedule
        if isinstance(msg.theta, C.EncodedArray):
            np.testing.assert_array_equal(back.theta.decode(), msg.theta.decode())


def test_every_type_covered_by_samples():
    msgs = sample_messages(np.random.default_rng(0))
    assert {type(m) for m in msgs} == set(M.MESSAGE_TYPES.values())
    for m in msgs:
        roundtrip(m)


def test_envelope():
    f = protocol.encode(M.Bye(reason="x"))
    (n,) = struct.unpack(">I", f[:4])
    assert n == len(f) - 4
    body = msgpack.unpackb(f[4:])
    assert body == {"v": PROTOCOL_VERSION, "type": "bye", "reason": "x"}


# ---- each failure has its own class -----------------------------------------------------------------
def test_error_classes_are_distinct_and_protocol_errors():
    assert len(set(ERROR_CLASSES.values())) == len(ERROR_CLASSES)
    for cls in ERROR_CLASSES.values():
        assert issubclass(cls, ProtocolError)


def test_wrong_version():
    with pytest.raises(VersionMismatch, match="version 2"):
        protocol.decode(frame_of({"v": 2, "type": "bye"}))
    with pytest.raises(SchemaError, match="version"):
        protocol.decode(frame_of({"type": "bye"}))


def test_unknown_type():
    with pytest.raises(UnknownMessageType, match="teleport"):
        protocol.decode(frame_of({"v": 1, "type": "teleport"}))


def test_truncated_and_oversize_and_malformed():
    f = protocol.encode(_first_round_start(sample_messages(np.random.default_rng(1))))
    for cut in (0, 2, 4, 10, len(f) - 1):
        with pytest.raises(TruncatedFrame):
            protocol.decode(f[:cut])
    with pytest.raises(FrameTooLarge, match="limit is 100"):
        protocol.decode(f, limits=Limits(max_frame=100))
    with pytest.raises(FrameTooLarge):
        protocol.decode(struct.pack(">I", 2**32 - 1) + b"x")  # refused on the header alone
    with pytest.raises(MalformedFrame, match="extra"):
        protocol.decode(f + b"\x00")
    with pytest.raises(MalformedFrame):
        protocol.decode(struct.pack(">I", 3) + b"\xc1\xc1\xc1")  # 0xc1 is never valid msgpack
    with pytest.raises(MalformedFrame):
        protocol.decode(struct.pack(">I", 0))
    with pytest.raises(MalformedFrame):
        protocol.decode("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"reason": 3}, "Bye.reason: expected str"),
        ({"reason": "x", "extra": 1}, "unknown field"),
        ({"round_id": 1, "accepted": True, "reason": "x" * 5000}, "length"),
    ],
)
def test_schema_errors_name_the_field(fields, match):
    t = "ack" if "accepted" in fields else "bye"
    with pytest.raises(SchemaError, match=match):
        protocol.decode(frame_of({"v": 1, "type": t, **fields}))


def test_schema_missing_and_range():
    with pytest.raises(SchemaError, match="missing field 'accepted'"):
        protocol.decode(frame_of({"v": 1, "type": "ack", "round_id": 1}))
    with pytest.raises(SchemaError, match="out of range"):
        protocol.decode(frame_of({"v": 1, "type": "ack", "round_id": -5, "accepted": True}))
    with pytest.raises(SchemaError, match="expected bool"):
        protocol.decode(frame_of({"v": 1, "type": "ack", "round_id": 1, "accepted": 1}))
    with pytest.raises(SchemaError, match="32 bytes"):
        protocol.decode(frame_of({"v": 1, "type": "challenge", "nonce": b"short"}))


def _update_wire(steps, **loss):
    u = M.Update(round_id=1, client_id="c", steps=steps, n_examples=1,
                 loss=M.LossStats(mean=1.0, min=1.0, max=1.0, last=1.0))
    w = u.to_wire()
    w["loss"].update(loss)
    return w


def test_non_finite_policy():
    """Documented: non-finite floats are refused in every message field and in Update grads."""
    bad = [StepRecord(groups=[Group(np.array([1], np.uint64), np.array([np.nan], np.float32))])]
    with pytest.raises(SchemaError, match="non-finite"):
        protocol.encode(M.Update(round_id=1, client_id="c", steps=bad, n_examples=1,
                                 loss=M.LossStats(mean=1.0, min=1.0, max=1.0, last=1.0)))
    with pytest.raises(SchemaError, match="non-finite"):
        protocol.decode(frame_of(_update_wire(bad)))
    with pytest.raises(SchemaError, match="finite"):
        protocol.decode(frame_of(_update_wire([], mean=float("inf"))))
    with pytest.raises(SchemaError, match="finite"):
        protocol.decode(frame_of({"v": 1, "type": "welcome", "client_id": "c", "server_time": float("nan")}))


def test_cross_field_checks():
    rng = np.random.default_rng(2)
    hyper = M.Hyper(schedule=Schedule(), q=1, local_steps=1, batch_size=1)
    wrong_d = C.encode(np.zeros(D + 1, np.float32), "q8")
    with pytest.raises(SchemaError, match="d="):
        protocol.encode(M.RoundStart(round_id=1, spec=SPEC, theta=wrong_d, hyper=hyper, deadline=0.0))
    dense = C.encode(np.zeros(D, np.float32), "q8")
    with pytest.raises(SchemaError, match="cloud gradient"):
        protocol.encode(M.RoundStart(round_id=1, spec=SPEC, theta=dense, hyper=hyper, deadline=0.0, lam="online"))
    g = random_guidance(rng, D + 3)
    with pytest.raises(SchemaError, match="guidance"):
        protocol.encode(M.RoundStart(round_id=1, spec=SPEC, theta=dense, hyper=hyper, deadline=0.0, guidance=g))
    outside = [StepRecord(groups=[Group(np.array([1], np.uint64), np.array([1.0]), D, D + 10)])]
    rr = M.ReplayRound(round_id=0, schedule=Schedule(), updates=[M.ReplayUpdate(weight=1.0, steps=outside)])
    with pytest.raises(SchemaError, match="span"):
        protocol.encode(M.RoundStart(round_id=1, spec=SPEC, theta=M.ThetaReplay(rounds=[rr]), hyper=hyper,
                                     deadline=0.0))


def test_absurd_sizes_refused_before_allocation():
    # raw ndarray ext declaring (2^32-1)^2 float64 elements in a 20-byte payload
    ext = msgpack.ExtType(1, struct.pack("<BBII", 12, 2, 2**32 - 1, 2**32 - 1) + b"\x00" * 8)
    w = _update_wire([])
    w["steps"]["seeds"] = ext
    with pytest.raises(LimitExceeded, match="elements"):
        protocol.decode(frame_of(w))
    # a compact step list claiming 10^6 steps × 10^6 groups with no data
    w = _update_wire([])
    w["steps"].update(n_steps=10**6, n_groups=10**6)
    with pytest.raises(LimitExceeded):
        protocol.decode(frame_of(w))
    # msgpack array header claiming 2^32-1 items
    with pytest.raises(MalformedFrame):
        protocol.decode(struct.pack(">I", 5) + b"\xdd\xff\xff\xff\xff")
    # a spec with a billion layers is bounded before AdapterSpec is built
    rs = _first_round_start(sample_messages(np.random.default_rng(3))).to_wire()
    rs["spec"]["dims"]["n_layers"] = 10**9
    with pytest.raises(SchemaError, match="n_layers"):
        protocol.decode(frame_of(rs))
    # deep nesting
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ProtocolError):
        protocol.decode(frame_of({"v": 1, "type": "bye", "reason": deep}))


def test_limits_validation():
    with pytest.raises(ValueError):
        Limits(max_frame=0)
    with pytest.raises(ValueError):
        Limits(max_frame=2**32)


# ---- upload cost --------------------------------------------------------------------------------------
@pytest.mark.parametrize("q,split", [(1, False), (2, False), (4, False), (16, False), (64, False), (2, True),
                                     (8, True)])
def test_upload_costs_at_most_16_bytes_per_perturbation(q, split):
    """An Update of 100 steps × q perturbations: frame bytes / perturbations ≤ 16 (seed 8 B + grad 4 B + overhead)."""
    rng = np.random.default_rng(q)
    d = 460_800
    steps = random_steps(rng, 100, q, d, split=d // 2 if split else None, lam=0.3)
    up = M.Update(round_id=7, client_id="raspberry-pi-4-kitchen", steps=steps, first_step=1200, n_examples=800,
                  loss=M.LossStats(mean=2.1, min=1.7, max=2.6, last=1.9), guide_id="0123456789abcdef",
                  theta_digest="fedcba9876543210", duration_s=512.25)
    f = protocol.encode(up)
    per = len(f) / up.n_perturbations
    assert per <= 16.0, per
    assert_steps_equal(steps, protocol.decode(f).steps)


def test_upload_with_varying_lambda_and_groups_still_compact():
    rng = np.random.default_rng(11)
    steps = random_steps(rng, 100, 8, 1000)  # λ differs per step: float64 array
    steps[3].groups.append(Group(np.array([5], np.uint64), np.array([0.5]), 10, 20))
    up = M.Update(round_id=1, client_id="c", steps=steps, n_examples=1,
                  loss=M.LossStats(mean=1.0, min=1.0, max=1.0, last=1.0))
    f = protocol.encode(up)
    assert len(f) / up.n_perturbations <= 14.0
    assert_steps_equal(steps, protocol.decode(f).steps)


# ---- replay through the wire -----------------------------------------------------------------------
def test_replay_round_matches_direct_replay():
    rng = np.random.default_rng(4)
    theta0 = rng.standard_normal(D).astype(np.float32) * 0.01
    guidance = random_guidance(rng, D)
    guide = guidance.to_guide()
    sched = Schedule(lr=1e-3, momentum=0.5)
    ups = [M.ReplayUpdate(weight=0.25, first_step=3, steps=random_steps(rng, 3, 4, D, lam=0.2)),
           M.ReplayUpdate(weight=0.75, first_step=3, steps=random_steps(rng, 2, 4, D, split=D // 2, lam=0.0))]
    rr = M.ReplayRound(round_id=0, schedule=sched, guidance=guidance, updates=ups)
    msg = M.RoundStart(round_id=1, base_round=0, spec=SPEC, theta=M.ThetaReplay(rounds=[rr]), guidance=guidance,
                       hyper=M.Hyper(schedule=sched, q=4, local_steps=3, batch_size=2), deadline=0.0)
    got = protocol.decode(protocol.encode(msg)).theta.apply(theta0)
    t0 = theta0.astype(np.float64)
    want = t0.copy()
    for u in ups:
        want += u.weight * (replay(theta0, u.steps, sched, guide, 3).astype(np.float64) - t0)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    # one client with weight 1: exactly that client's θ (what the edge itself computed)
    one = M.ReplayUpdate(weight=1.0, first_step=3, steps=ups[0].steps)
    solo = M.ReplayRound(round_id=0, schedule=sched, guidance=guidance, updates=[one]).apply(theta0)
    np.testing.assert_array_equal(solo, replay(theta0, ups[0].steps, sched, guide, 3))
    assert guidance.digest() == guidance.guide_id == protocol.decode(protocol.encode(msg)).guidance.digest()


def test_replay_round_matches_cloud_aggregate_if_present():
    """ReplayRound.apply must be bit-identical to the cloud's aggregation (else edge replay drifts)."""
    agg = pytest.importorskip("cloud.aggregate")
    rng = np.random.default_rng(5)
    theta0 = rng.standard_normal(D).astype(np.float32) * 0.01
    sched = Schedule(lr=1e-3)
    try:
        plan = agg.RoundPlan(round_id=0, basis_id="", theta=theta0, guide=None, schedule=sched, lam=0.0,
                             local_steps=3)
        uploads = [agg.Upload(client=f"c{i}", round_id=0, basis_id="", steps=random_steps(rng, 2, 3, D, lam=0.0),
                              examples=10 * (i + 1)) for i in range(3)]
        cloud_theta = agg.aggregate(plan, uploads)
        w = agg.weights(sorted(uploads, key=lambda u: u.client))
    except (TypeError, AttributeError) as e:  # the cloud API moved: this check needs updating, not a failure here
        pytest.skip(f"cloud.aggregate API changed: {e}")
    rr = M.ReplayRound(round_id=0, schedule=sched, updates=[
        M.ReplayUpdate(weight=float(wi), steps=u.steps) for wi, u in zip(w, sorted(uploads, key=lambda u: u.client), strict=True)])
    np.testing.assert_array_equal(protocol.decode(protocol.encode(M.RoundStart(
        round_id=1, base_round=0, spec=SPEC, theta=M.ThetaReplay(rounds=[rr]),
        hyper=M.Hyper(schedule=sched, q=3, local_steps=2, batch_size=1), deadline=0.0))).theta.apply(theta0),
        cloud_theta)


def test_error_message_maps_back_to_class():
    e = M.Error.from_exception(VersionMismatch("v9"))
    back = protocol.decode(protocol.encode(e))
    assert back.code == "version_mismatch" and isinstance(back.exception(), VersionMismatch)
    assert isinstance(M.Error(code="whatever").exception(), ProtocolError)
    assert M.Error.from_exception(RuntimeError("boom")).code == "internal"


def test_protocol_imports_no_torch():
    import subprocess
    import sys

    code = "import protocol, protocol.auth, protocol.samples, sys; " \
           "assert 'torch' not in sys.modules and 'llama_cpp' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sender_side_limits_and_span_check():
    big = M.Bye(reason="x" * 3000)
    with pytest.raises(FrameTooLarge):
        protocol.encode(big, limits=Limits(max_frame=1000))
    msgs = sample_messages(np.random.default_rng(8))
    rs = _first_round_start(msgs)  # dense θ + guidance: three arrays of about d elements
    with pytest.raises(LimitExceeded, match="in all"):
        protocol.decode(protocol.encode(rs), limits=Limits(max_total_elements=2 * D))
    up = M.Update(round_id=1, client_id="c", n_examples=1, loss=M.LossStats(mean=1.0, min=1.0, max=1.0, last=1.0),
                  steps=[StepRecord(groups=[Group(np.array([1], np.uint64), np.array([1.0]), 0, D + 1)])])
    back = protocol.decode(protocol.encode(up))  # d is unknown to decode ...
    back.check_spans(D + 1)
    with pytest.raises(SchemaError, match="span"):
        back.check_spans(D)  # ... the receiver checks it against its own d


def test_round_start_names_prefetched_guidance_by_id():
    # Prepare: a RoundStart that carries its guidance, and the same round naming it by id only
    rs = _first_round_start(sample_messages(np.random.default_rng(4)))
    gid = rs.guidance.guide_id
    by_ref = M.RoundStart(round_id=rs.round_id, spec=rs.spec, theta=rs.theta, guidance=None, guidance_id=gid,
                          lam=0.5, hyper=rs.hyper, deadline=rs.deadline)
    # Execute / Assert: by-reference λ > 0 is valid, and much smaller on the wire
    back = protocol.decode(protocol.encode(by_ref))
    assert back.guidance is None and back.guidance_id == gid
    assert len(protocol.encode(by_ref)) < len(protocol.encode(rs)) - rs.guidance.basis.nbytes // 2
    with pytest.raises(SchemaError, match="needs guidance"):
        protocol.encode(M.RoundStart(round_id=1, spec=rs.spec, theta=rs.theta, lam=0.5, hyper=rs.hyper, deadline=0.0))
    with pytest.raises(SchemaError, match="guidance_id"):
        protocol.encode(M.RoundStart(round_id=1, spec=rs.spec, theta=rs.theta, guidance=rs.guidance,
                                     guidance_id="not-its-id", lam=0.5, hyper=rs.hyper, deadline=0.0))
    with pytest.raises(SchemaError):
        protocol.encode(M.RoundRequest(guide_ids=[f"g{i}" for i in range(20)]))  # at most MAX_GUIDE_IDS
