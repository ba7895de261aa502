"""A frame fuzzer for :func:`protocol.decode`: random and mutated frames, the only allowed outcome being a
decoded message or a :class:`~protocol.errors.ProtocolError`.

Used by the bounded test in the suite and by the longer harness in ``fuzz/``. Mutations are byte-level
(bit flips, interesting bytes, truncation, insertion, splicing, header rewrites) and structure-aware
(decode the msgpack tree of a valid frame, replace / delete / add one node, re-pack), so both the framing
and every schema branch are exercised.
"""

from __future__ import annotations

import struct
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from protocol.constants import DEFAULT_LIMITS, EXT_NDARRAY, LAMBDA_ONLINE, Limits
from protocol.errors import ProtocolError
from protocol.messages import decode, encode
from protocol.samples import sample_messages

INTERESTING = bytes([0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9,
                     0xCA, 0xCB, 0xCF, 0xD3, 0xD4, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x9F,
                     0x80, 0x8F, 0xA0, 0xBF, 0xE0])
INTERESTING_INTS = [0, -1, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1, 255, 256, 65535]


def corpus(seed: int = 0, sets: int = 8) -> list[bytes]:
    """Valid frames: ``sets`` random instances of every message type."""
    rng = np.random.default_rng(seed)
    return [encode(m) for _ in range(sets) for m in sample_messages(rng)]


def _reframe(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _random_leaf(rng: np.random.Generator) -> Any:
    k = int(rng.integers(14))
    if k == 0:
        return INTERESTING_INTS[int(rng.integers(len(INTERESTING_INTS)))]
    if k == 1:
        return float(rng.choice([np.nan, np.inf, -np.inf, -0.0, 1e308, -1.0, 0.5]))
    if k == 2:
        return "x" * int(rng.choice([0, 1, 200, 5000, 70000]))
    if k == 3:
        return bytes(rng.integers(0, 256, int(rng.choice([0, 1, 31, 32, 33, 100])), dtype=np.uint8))
    if k == 4:
        return None
    if k == 5:
        return bool(rng.integers(2))
    if k == 6:
        return [_random_leaf(rng) for _ in range(int(rng.integers(4)))]
    if k == 7:
        return {str(rng.integers(5)): _random_leaf(rng) for _ in range(int(rng.integers(3)))}
    if k == 8:  # ndarray ext with a random (often inconsistent) header
        ndim = int(rng.integers(0, 4))
        dims = [int(rng.choice([0, 1, 3, 64, 2**31, 2**32 - 1])) for _ in range(ndim)]
        code = int(rng.integers(0, 15))
        payload = bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8))
        return msgpack.ExtType(EXT_NDARRAY, struct.pack(f"<BB{ndim}I", code, ndim, *dims) + payload)
    if k == 9:
        return msgpack.ExtType(int(rng.integers(-128, 128)), b"\x00" * int(rng.integers(4)))
    if k == 10:  # deep nesting
        v: Any = []
        for _ in range(int(rng.integers(1, 60))):
            v = [v]
        return v
    if k == 11:
        return int(rng.integers(-(2**40), 2**40))
    if k == 12:
        return LAMBDA_ONLINE
    return [0] * int(rng.integers(0, 300))


def _nodes(obj: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _nodes(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _nodes(v, path + (i,))
    return out


def _structural(frame: bytes, rng: np.random.Generator) -> bytes:
    obj = msgpack.unpackb(frame[4:], raw=False, strict_map_key=False)
    nodes = _nodes(obj)
    path = nodes[int(rng.integers(len(nodes)))]
    if not path:
        return _reframe(msgpack.packb(_random_leaf(rng)))
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    op = int(rng.integers(5))
    if op == 0 and isinstance(parent, dict):
        del parent[last]
    elif op == 1 and isinstance(parent, dict):
        parent[f"extra{rng.integers(3)}"] = _random_leaf(rng)
    elif op == 2 and isinstance(parent[last], msgpack.ExtType):  # corrupt an array's header or data
        e = parent[last]
        data = bytearray(e.data)
        if data:
            data[int(rng.integers(min(len(data), 12)))] = int(rng.integers(256))
        parent[last] = msgpack.ExtType(e.code, bytes(data))
    elif op == 3 and isinstance(parent, list) and parent:
        parent.append(parent[0])
    else:
        parent[last] = _random_leaf(rng)
    return _reframe(msgpack.packb(obj, use_bin_type=True))


def mutate(frame: bytes, rng: np.random.Generator, others: list[bytes]) -> bytes:
    """One random mutation of a valid frame (header fixed up to the new body length most of the time)."""
    op = int(rng.integers(14))
    body = bytearray(frame[4:])
    if op == 0 and body:  # bit flips
        for _ in range(int(rng.integers(1, 8))):
            i = int(rng.integers(len(body)))
            body[i] ^= 1 << int(rng.integers(8))
    elif op == 1 and body:  # interesting bytes
        for _ in range(int(rng.integers(1, 4))):
            body[int(rng.integers(len(body)))] = INTERESTING[int(rng.integers(len(INTERESTING)))]
    elif op == 2:  # truncate (header left claiming the full length)
        return frame[: int(rng.integers(len(frame) + 1))]
    elif op == 3:  # insert random bytes
        i = int(rng.integers(len(body) + 1))
        body[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8))
    elif op == 4 and body:  # delete a slice
        i = int(rng.integers(len(body)))
        del body[i : i + int(rng.integers(1, 32))]
    elif op == 5:  # splice with another frame
        other = others[int(rng.integers(len(others)))][4:]
        body = body[: int(rng.integers(len(body) + 1))] + other[int(rng.integers(len(other) + 1)) :]
    elif op == 6:  # header lies about the length
        n = int(rng.choice([0, 1, len(body) - 1, len(body) + 1, 2**31, 2**32 - 1, int(rng.integers(2**32))]))
        return struct.pack(">I", max(0, n)) + bytes(body)
    elif op >= 7 and op != 9:  # structure-aware: half of all mutations
        try:
            return _structural(frame, rng)
        except (ValueError, TypeError, msgpack.UnpackException):
            pass
    elif op == 9:  # pure random bytes, framed
        return _reframe(bytes(rng.integers(0, 256, int(rng.integers(0, 256)), dtype=np.uint8)))
    return _reframe(bytes(body))


@dataclass
class FuzzReport:
    """Outcome counts of a fuzz run; ``failures`` holds (frame hex, traceback) of any non-ProtocolError."""

    frames: int = 0
    seconds: float = 0.0
    max_frame_seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def run_fuzz(n: int, seed: int = 0, *, limits: Limits = DEFAULT_LIMITS, time_limit: float | None = None,
             on_progress: Callable[[FuzzReport], None] | None = None) -> FuzzReport:
    """Decode ``n`` fuzzed frames (90% mutated valid frames, 10% random bytes); stop early at ``time_limit``."""
    rng = np.random.default_rng(seed)
    frames = corpus(seed)
    rep = FuzzReport()
    t_start = time.perf_counter()
    for i in range(n):
        if rng.random() < 0.1:
            data = bytes(rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8))
        else:
            data = frames[int(rng.integers(len(frames)))]
            for _ in range(int(rng.integers(1, 3))):
                data = mutate(data, rng, frames)
        t0 = time.perf_counter()
        try:
            msg = decode(data, limits=limits)
            rep.outcomes["decoded:" + type(msg).__name__] += 1
        except ProtocolError as e:
            rep.outcomes[type(e).__name__] += 1
        except BaseException as e:  # noqa: BLE001 - exactly what the fuzzer exists to catch
            if isinstance(e, KeyboardInterrupt):
                raise
            rep.failures.append((data.hex(), traceback.format_exc()))
        dt = time.perf_counter() - t0
        rep.max_frame_seconds = max(rep.max_frame_seconds, dt)
        rep.frames += 1
        if on_progress is not None and (i + 1) % 10_000 == 0:
            rep.seconds = time.perf_counter() - t_start
            on_progress(rep)
        if time_limit is not None and time.perf_counter() - t_start > time_limit:
            break
    rep.seconds = time.perf_counter() - t_start
    return rep
