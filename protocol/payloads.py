"""The payloads messages carry: guidance (compressed basis + gradient, with the digest the receiver checks),
round hyper-parameters, loss statistics, and θ as replay records (a round's records, its c-space move, or a compressed
delta); plus the digests of θ and guidance."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol.codecs import CodecConfig, EncodedArray
from protocol.codecs import encode as encode_array
from protocol.constants import (
    MAX_ID_LEN,
    MAX_SPEC_LAYERS,
)
from protocol.errors import (
    SchemaError,
)
from protocol.schema import (
    I64,
    U64,
    EncT,
    FloatT,
    IntT,
    ListT,
    NestedT,
    OptT,
    ScheduleT,
    StrT,
    WireType,
    _dump_fields,
    _load_fields,
    _tname,
    wf,
)
from protocol.steps import StepsT
from protocol.zo import GUIDE_KINDS, Guide, Schedule, StepRecord, replay, subspace_theta


def array_digest(*arrays: np.ndarray, extra: bytes = b"") -> str:
    """A short hex digest (sha256, 16 hex chars) of arrays' dtypes, shapes and bytes: θ and guide ids."""
    h = hashlib.sha256(extra)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def theta_digest(theta: np.ndarray) -> str:
    """Digest of θ (float32): lets edge and cloud check they hold the same bits after a replay."""
    return array_digest(np.asarray(theta, np.float32))


@dataclass(kw_only=True)
class Guidance:
    """Cloud guidance of one round on the wire: basis Q (d, k), cloud gradient g_B (d,) or None, mixing α.

    Q and g_B are compressed, so they are lossy: **both sides must use the decoded arrays** (``to_guide()``),
    the cloud included when it replays uploads, or replay stops being exact. ``guide_id`` is the digest of the
    decoded arrays and α (:meth:`from_guide` computes it); the edge echoes it in :class:`Update`.
    """

    basis: EncodedArray = wf(EncT(2))
    grad: EncodedArray | None = wf(OptT(EncT(1)), default=None)
    alpha: float = wf(FloatT(0.0, 1.0, open_lo=True), default=0.5)
    guide_id: str = wf(StrT(MAX_ID_LEN), default="")
    kind: str = wf(StrT(16, choices=GUIDE_KINDS), default="guided")  # "subspace": θ = θ_t + Q·c (round v2)

    def check(self, path: str) -> None:
        d, k = self.basis.shape
        if k < 1 or d < k:
            raise SchemaError(f"{path}.basis: shape {self.basis.shape} must be (d, k) with d >= k >= 1")
        if self.grad is not None and self.grad.shape != (d,):
            raise SchemaError(f"{path}.grad: shape {self.grad.shape} != ({d},)")

    @property
    def d(self) -> int:
        return int(self.basis.shape[0])

    def to_guide(self) -> Guide:
        """The :class:`~protocol.zo.Guide` both sides use (decoded, float32)."""
        grad = None if self.grad is None else self.grad.decode().astype(np.float32)
        return Guide(self.basis.decode().astype(np.float32), self.alpha, grad, self.kind)

    @classmethod
    def from_guide(cls, guide: Guide, basis_codec: str | CodecConfig = "q8",
                   grad_codec: str | CodecConfig = "q8") -> Guidance:
        """Compress a Guide and stamp the digest of what the receiver will decode."""
        basis = encode_array(guide.basis, basis_codec)
        grad = None if guide.grad is None else encode_array(guide.grad, grad_codec)
        g = cls(basis=basis, grad=grad, alpha=float(guide.alpha), kind=guide.kind)
        g.guide_id = g.digest()
        return g

    def digest(self) -> str:
        """Digest of the decoded basis, gradient, α and kind."""
        arrays = [self.basis.decode().astype(np.float32)]
        if self.grad is not None:
            arrays.append(self.grad.decode().astype(np.float32))
        extra = struct.pack("<d", self.alpha) + (b"" if self.kind == "guided" else self.kind.encode())
        return array_digest(*arrays, extra=extra)


@dataclass(kw_only=True)
class Hyper:
    """Hyper-parameters of a round. ``schedule``: lr/ε/momentum schedule (t = ``first_step`` + local step);
    ``q``: perturbations per step; ``local_steps``: τ; ``batch_size``: examples per loss;
    ``split_layer``/``p1``/``p2``: FedSPZO split (-1: no split); ``seed_base``: the edge draws its seeds
    from a counter starting here (the cloud gives clients disjoint ranges); ``seed_pool``: 0 = each edge draws
    fresh 64-bit seeds; K > 0 = every perturbation seed of the round is one of K seeds shared by all clients of the
    round (FedKSeed, edge.zo.pool_seeds of ``first_step``), so the guide's merge generates at most K directions
    per span."""

    schedule: Schedule = wf(ScheduleT())
    q: int = wf(IntT(1, 1 << 16))
    local_steps: int = wf(IntT(1, 1 << 20))
    batch_size: int = wf(IntT(1, 1 << 20))
    first_step: int = wf(IntT(0, 1 << 40), default=0)
    split_layer: int = wf(IntT(-1, MAX_SPEC_LAYERS), default=-1)
    p1: int = wf(IntT(0, 1 << 16), default=0)
    p2: int = wf(IntT(0, 1 << 16), default=0)
    seed_base: int = wf(IntT(0, U64 - 1), default=0)
    seed_pool: int = wf(IntT(0, 1 << 24), default=0)


@dataclass(kw_only=True)
class LossStats:
    """Loss statistics over a client's round: mean, min, max and the last measured value."""

    mean: float = wf(FloatT())
    min: float = wf(FloatT())
    max: float = wf(FloatT())
    last: float = wf(FloatT())


@dataclass(kw_only=True)
class ReplayUpdate:
    """One accepted client upload of a past round, with its aggregation weight."""

    weight: float = wf(FloatT(0.0, 1.0))
    first_step: int = wf(IntT(0, 1 << 40), default=0)
    steps: list[StepRecord] = wf(StepsT(), default_factory=list)


MAX_C = 4096  # numbers in a c-space move (a subspace round's k, at most 128 today)


@dataclass(kw_only=True)
class ReplayRound:
    """How θ moved in round ``round_id``: θ_{r+1} from θ_r, in one of three exact forms.

    * ``updates`` (the first design, d-space): θ_{r+1} = θ_r + edge_weight·Σ_i w_i (replay_i(θ_r) − θ_r).
    * ``c`` (a subspace round, round v2): the merge's move in c-space, edge_weight·Σ_i w_i c_i as k float64
      numbers; θ_{r+1} = subspace_theta(θ_r, U_r, c), the very call the guide's merge makes (cloud.aggregate).
    * ``delta`` (a compressed θ, ``[wire] theta = "adaptive"``): θ_{r+1} = θ_r + decode(delta) in float32; the
      guide made that sum the round's θ, so the edge lands on it bit for bit.

    The first two need the round's decoded guidance: ``guidance`` itself, or ``guide_id`` naming one the
    receiver holds (it trained in that round or prefetched its guidance).
    """

    round_id: int = wf(IntT(0, I64 - 1))
    schedule: Schedule = wf(ScheduleT(), default_factory=Schedule)
    guidance: Guidance | None = wf(OptT(NestedT(Guidance)), default=None)
    updates: list[ReplayUpdate] = wf(ListT(NestedT(ReplayUpdate)), default_factory=list)
    guide_id: str = wf(StrT(MAX_ID_LEN), default="")
    edge_weight: float = wf(FloatT(0.0, 4.0), default=1.0)
    c: list[float] | None = wf(OptT(ListT(FloatT(), MAX_C)), default=None)
    delta: EncodedArray | None = wf(OptT(EncT(1)), default=None)

    def check(self, path: str) -> None:
        forms = sum((bool(self.updates), self.c is not None, self.delta is not None))
        if forms > 1:
            raise SchemaError(f"{path}: a round moves θ by updates, c or delta: one of them, got {forms}")
        if self.c is not None and self.guidance is not None and self.guidance.basis.shape[1] != len(self.c):
            raise SchemaError(f"{path}.c: {len(self.c)} numbers for a basis of k={self.guidance.basis.shape[1]}")
        if self.guidance is not None and self.guide_id and self.guide_id != self.guidance.guide_id:
            raise SchemaError(f"{path}.guide_id: {self.guide_id!r} is not the id of the guidance sent")

    @property
    def form(self) -> str:
        """"c", "delta" or "updates" (no updates at all: θ did not move)."""
        return "c" if self.c is not None else "delta" if self.delta is not None else "updates"

    def apply(self, theta: np.ndarray, guide: Guide | None = None) -> np.ndarray:
        """θ after this round (a new float32 array). THE function of each form the guide computes its θ_{r+1}
        with (same float ops, same order), so the result is bit-exact. ``guide``: the round's decoded guidance
        (default: ``guidance`` decoded); a ``c`` or ``updates`` form that needs one and has none: ValueError."""
        theta = np.asarray(theta, np.float32)
        if self.delta is not None:
            if self.delta.shape != theta.shape:
                raise ValueError(f"round {self.round_id}: delta of shape {self.delta.shape} for θ of {theta.shape}")
            return np.add(theta, self.delta.decode().astype(np.float32), dtype=np.float32)
        if guide is None and self.guidance is not None:
            guide = self.guidance.to_guide()
        if self.c is not None:
            if guide is None or not guide.subspace or guide.k != len(self.c) or guide.d != theta.shape[0]:
                raise ValueError(f"round {self.round_id}: a c-space move needs that round's subspace "
                                 f"(k={len(self.c)}, d={theta.shape[0]})")
            return subspace_theta(theta, guide.basis, np.asarray(self.c, np.float64))
        if not self.updates:
            return theta.copy()
        # float64 accumulation in list order, like cloud.aggregate.aggregate (the cloud lists updates in
        # the order it summed them): Δ_i = θ_i − θ_t is exact in float64, one rounding at the end.
        base = theta.astype(np.float64)
        acc = np.zeros(theta.shape, np.float64)
        for u in self.updates:
            theta_i = replay(theta, u.steps, self.schedule, guide, u.first_step)
            acc += u.weight * (theta_i.astype(np.float64) - base)
        return (base + self.edge_weight * acc).astype(np.float32)


@dataclass(kw_only=True)
class ThetaReplay:
    """θ as replay records: apply ``rounds`` in order to the θ the client holds for ``RoundStart.base_round``
    (no rounds: θ is the one it holds)."""

    rounds: list[ReplayRound] = wf(ListT(NestedT(ReplayRound)), default_factory=list)

    def needs(self) -> list[str]:
        """Guide ids the receiver must hold: rounds that move in c-space or by updates without their guidance."""
        return [r.guide_id for r in self.rounds if r.guidance is None and r.guide_id and r.delta is None]

    def apply(self, theta: np.ndarray, guides: Mapping[str, Guide] | None = None) -> np.ndarray:
        """θ after every round (a new array). ``guides``: decoded guidance the receiver holds, by guide id.
        Raises ValueError when a round needs guidance that is neither sent nor held."""
        theta = np.array(theta, np.float32, copy=True)
        held = guides or {}
        for r in self.rounds:
            guide = None
            if r.guidance is None and r.guide_id and r.delta is None:
                guide = held.get(r.guide_id)
                if guide is None:
                    raise ValueError(f"round {r.round_id} moves θ in guidance {r.guide_id!r}, which is not held")
            theta = r.apply(theta, guide)
        return theta


class ThetaT(WireType):
    """θ: ``{"dense": EncodedArray}`` or ``{"replay": ThetaReplay}``."""

    def dump(self, v):
        if isinstance(v, EncodedArray):
            return {"dense": v.to_wire()}
        if isinstance(v, ThetaReplay):
            return {"replay": _dump_fields(v)}
        raise SchemaError(f"theta must be an EncodedArray or a ThetaReplay, got {_tname(v)}")

    def load(self, o, ctx, path):
        if type(o) is not dict or len(o) != 1 or next(iter(o)) not in ("dense", "replay"):
            raise SchemaError(f"{path}: expected {{'dense': array}} or {{'replay': records}}")
        if "dense" in o:
            return EncT(1).load(o["dense"], ctx, f"{path}.dense")
        return _load_fields(ThetaReplay, o["replay"], ctx, f"{path}.replay")
