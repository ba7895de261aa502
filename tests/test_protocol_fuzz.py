"""Bounded fuzzing in the suite: ≥ 100,000 random and mutated frames through ``decode``; only ProtocolError,
no hang, bounded memory. The long run is ``fuzz/fuzz_decode.py``."""

from __future__ import annotations

import numpy as np
import psutil
import pytest

from protocol import ProtocolError, decode
from protocol.constants import Limits
from protocol.fuzzing import corpus, mutate, run_fuzz

N_FRAMES = 100_000


def test_fuzz_decode_100k_frames():
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    rep = run_fuzz(N_FRAMES, seed=20261122, time_limit=55.0)
    rss1 = proc.memory_info().rss
    assert rep.ok, f"{len(rep.failures)} non-ProtocolError exceptions; first frame {rep.failures[0][0][:200]}\n" \
                   f"{rep.failures[0][1]}"
    assert rep.frames == N_FRAMES, f"only {rep.frames} frames within the time limit"
    assert rep.max_frame_seconds < 1.0, f"one frame took {rep.max_frame_seconds:.2f} s"
    assert rss1 - rss0 < 200 << 20, f"RSS grew by {(rss1 - rss0) >> 20} MiB"
    # the fuzzer must reach deep: schema and codec checks, not only msgpack syntax errors
    for outcome in ("SchemaError", "CodecError", "LimitExceeded", "TruncatedFrame", "FrameTooLarge",
                    "MalformedFrame", "VersionMismatch", "UnknownMessageType", "decoded:Update",
                    "decoded:RoundStart"):
        assert rep.outcomes[outcome] > 0, (outcome, rep.outcomes)


def test_fuzz_with_tight_limits():
    """Small limits make the limit paths fire often; still nothing but ProtocolError."""
    rep = run_fuzz(10_000, seed=7, limits=Limits(max_frame=1500, max_str=64, max_bin=512, max_list=64, max_map=16,
                                                 max_depth=4, max_elements=300, max_total_elements=600))
    assert rep.ok, rep.failures[0][1]
    assert rep.outcomes["FrameTooLarge"] > 0 and rep.outcomes["LimitExceeded"] > 0


def test_mutations_of_every_frame_only_raise_protocol_errors():
    rng = np.random.default_rng(3)
    frames = corpus(3, sets=2)
    for f in frames:
        for _ in range(100):
            try:
                decode(mutate(f, rng, frames))
            except ProtocolError:
                pass


@pytest.mark.parametrize("n", range(0, 9))
def test_all_short_inputs(n):
    """Every 0..8-byte input (sampled beyond 2 bytes) is a ProtocolError."""
    rng = np.random.default_rng(n)
    inputs = [bytes([a, b]) for a in range(256) for b in range(256)] if n == 2 else \
        [bytes(rng.integers(0, 256, n, dtype=np.uint8)) for _ in range(3000)]
    for data in inputs[:70_000]:
        with pytest.raises(ProtocolError):
            decode(data)
