"""θ on the wire: each edge gets the round's θ as replay records when it can rebuild it exactly from what it holds,
else dense float32; with ``[wire] theta = "adaptive"`` a round whose θ no exact record reaches is made the previous
round's θ plus an adaptively compressed delta. Pure functions and a small cache; no I/O, no torch.

Every round t has one θ the edges start from, θ^w_t (the plan's θ), and at most one *move* that gives θ^w_t from
θ^w_{t-1} (a :class:`protocol.payloads.ReplayRound`):

* form "c": round t-1 was a subspace round and θ'_t (where round t starts, before the wire) is exactly
  subspace_theta(θ^w_{t-1}, U_{t-1}, m_{t-1}), m_{t-1} its merge's c-space move (``[cloud] round_steps = 0``, the
  default). θ^w_t = θ'_t, lossless; the move is k float64 numbers (128 B at k = 16).
* form "delta" (``theta = "adaptive"`` only, when no "c" move reaches θ'_t: the cloud stepped, a guided-kind round):
  θ^w_t = θ^w_{t-1} + decode(encode(θ'_t − θ^w_{t-1})) in float32, and the carry θ'_t − θ^w_t goes into the plan;
  the merge adds it back (error feedback, :func:`cloud.aggregate.aggregate`), so compression delays part of the
  cloud's step by a round instead of dropping it.
* none: θ^w_t = θ'_t, sent dense.

An edge that holds θ^w_b (the θ its last round started from, checked by digest) and the guidance every "c" move
after b needs gets the moves b+1..t (:func:`choose_theta`); when they are larger than dense θ, or it holds
nothing, dense float32 of θ^w_t.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from protocol.arrays import packb
from protocol.codecs import CodecConfig, EncodedArray
from protocol.codecs import encode as encode_array
from protocol.messages import ReplayRound, ThetaReplay, theta_digest
from protocol.payloads import ThetaT
from protocol.zo import Guide, subspace_theta

F32 = np.float32
MAX_CHAIN = 8  # rounds of moves one RoundStart may carry (beyond that the guidance they need is long gone)


@dataclass(frozen=True)
class WireStart:
    """Where a round starts as the edges see it: ``theta`` (θ^w_t, the plan's θ), the ``move`` from θ^w_{t-1}
    (None: the edges get θ^w_t dense), and the ``carry`` a lossy delta left out (θ'_t − θ^w_t; None: none)."""

    theta: np.ndarray
    move: ReplayRound | None
    carry: np.ndarray | None

    @property
    def form(self) -> str:
        """"c", "delta" or "dense": how an edge that held the previous θ can get this one."""
        return "dense" if self.move is None else self.move.form


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal as float32 bit patterns (np.array_equal calls -0.0 and 0.0 equal; their digests differ)."""
    a32, b32 = np.ascontiguousarray(a, F32), np.ascontiguousarray(b, F32)
    return a32.shape == b32.shape and bool(np.array_equal(a32.view(np.uint32), b32.view(np.uint32)))


def wire_start(start: np.ndarray, *, prev_round: int, prev_theta: np.ndarray | None, prev_guide: Guide | None,
               prev_guide_id: str, prev_move: np.ndarray | None, codec: CodecConfig | None,
               rng: np.random.Generator | None = None) -> WireStart:
    """Round ``prev_round + 1``'s θ^w from θ'_t = ``start``.

    ``prev_theta``/``prev_guide``/``prev_guide_id``: round t-1's plan θ (θ^w_{t-1}) and decoded guidance (None when
    there is no previous round); ``prev_move``: the c-space move its merge made (cloud.aggregate.subspace_move; None
    when it was not a subspace round). ``codec``: the θ delta's codec (``[wire] theta = "adaptive"``), or None for
    exact θ only. ``rng``: only for a stochastic-rounding codec.
    """
    start = np.asarray(start, F32)
    if prev_theta is None:
        return WireStart(start.copy(), None, None)
    if prev_move is not None and prev_guide is not None and prev_guide.subspace:
        rebuilt = subspace_theta(prev_theta, prev_guide.basis, prev_move)
        if same_bits(rebuilt, start):
            move = ReplayRound(round_id=prev_round, guide_id=prev_guide_id,
                               c=[float(x) for x in np.asarray(prev_move, np.float64)])
            return WireStart(rebuilt, move, None)
    if codec is None:
        return WireStart(start.copy(), None, None)
    prev = np.asarray(prev_theta, F32)
    delta = (start.astype(np.float64) - prev.astype(np.float64)).astype(F32)
    enc = encode_array(delta, codec, rng=rng)
    move = ReplayRound(round_id=prev_round, delta=enc)
    theta = move.apply(prev)  # the edge's very operation: θ^w_{t-1} + decode(delta) in float32
    carry = (start.astype(np.float64) - theta.astype(np.float64)).astype(F32)
    return WireStart(theta, move, carry if np.any(carry) else None)


def move_bytes(move: ReplayRound) -> int:
    """Bytes a move adds to a RoundStart, near enough (payload plus a bound on keys and params; not packed here:
    the guide asks for every client's RoundRequest)."""
    if move.delta is not None:
        return move.delta.nbytes + 256
    return 9 * len(move.c or []) + 48


def choose_theta(*, round_id: int, theta: np.ndarray, base_round: int, base_digest: str, held: Collection[str],
                 history: Callable[[int], tuple[str, ReplayRound | None] | None]) -> tuple[int, ThetaReplay | None]:
    """(base_round, moves) to send an edge that says it holds θ^w of ``base_round`` with ``base_digest`` and the
    decoded guidance ``held``; (-1, None) means dense θ.

    ``history(r)`` gives round r's (θ^w_r digest, move into θ^w_r) or None when unknown. The moves go when every
    "c" one's guidance is held and they are smaller than dense float32; the digest is checked first, so an edge whose
    θ differs (a restarted or a forked one) gets dense θ, never a wrong one.
    """
    if base_round < 0 or base_round > round_id or round_id - base_round > MAX_CHAIN or not base_digest:
        return -1, None
    if base_round == round_id:
        ok = base_digest == theta_digest(theta)
        return (round_id, ThetaReplay(rounds=[])) if ok else (-1, None)
    base = history(base_round)
    if base is None or base[0] != base_digest:
        return -1, None
    moves: list[ReplayRound] = []
    for r in range(base_round + 1, round_id + 1):
        h = history(r)
        if h is None or h[1] is None:
            return -1, None
        move = h[1]
        if move.form == "c" and move.guide_id not in held:
            return -1, None
        moves.append(move)
    if sum(move_bytes(m) for m in moves) >= 4 * int(np.asarray(theta).size):
        return -1, None
    return base_round, ThetaReplay(rounds=moves)


def field_bytes(theta: EncodedArray | ThetaReplay) -> int:
    """Bytes of a RoundStart's θ field on the wire (dense or moves), for the round log."""
    return len(packb(ThetaT().dump(theta)))


def dense_theta(theta: np.ndarray) -> EncodedArray:
    """θ as exact float32 (the form every edge can take)."""
    return encode_array(np.asarray(theta, F32), "fp32")
